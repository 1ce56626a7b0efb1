"""The benchmark harness behind `fastdit bench` (and `pytest bench`).

For every registered op and case: every fastdit backend that runs on the device plus every
installed baseline (the op's `baselines()`), timed with `triton.testing.do_bench` (CUDA events,
median and p20/p80), with FLOPs and bytes, % of the device's peak measured in the same run (a large
bf16 matmul and a large device copy), and the max error vs a float64 reference. A provider that
fails the correctness rule gets no speedup. On a machine without a GPU nothing is timed: the ops
run at small sizes (the check cases, Triton through the interpreter) for correctness only.

Results: one JSON per run, a markdown table and a PNG plot. GPU runs go to `bench/results/`; CPU
runs go to `bench/results/local/` (git-ignored) and are labelled CPU.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

from fastdit._dispatch import available_backends
from fastdit._registry import Case, OpSpec, Provider, all_ops, get_op

RESULTS_SCHEMA = 1


class BenchError(ValueError):
    """Bad benchmark request (unknown op/provider, unreadable results)."""


def repo_root() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(here, "setup.py")) and os.path.isdir(os.path.join(here, "bench")):
        return here
    return None


def default_results_dir(gpu: bool) -> str:
    root = repo_root()
    base = os.path.join(root, "bench", "results") if root else os.path.join(os.getcwd(), "fastdit_results")
    return base if gpu else os.path.join(base, "local")


def git_commit() -> str:
    root = repo_root()
    if root is None:
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> Dict[str, str]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["kind"] = "gpu"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        env["kind"] = "cpu"
    return env


# ---------------------------------------------------------------------------------------------
# Providers


def fastdit_providers(spec: OpSpec, device_type: str) -> List[Provider]:
    out = []
    for backend in available_backends(spec.name, device_type):
        if device_type == "cuda" and backend == "reference":
            continue  # the reference is not a speed contender on GPU

        def fn(_backend=backend, **kw):
            return spec.fn(**kw, backend=_backend)

        out.append(Provider(f"fastdit-{backend}", fn, is_fastdit=True))
    return out


def providers_for(spec: OpSpec, device_type: str, names: Optional[Sequence[str]] = None) -> List[Provider]:
    provs = fastdit_providers(spec, device_type) + list(spec.baselines())
    if names:
        return [p for p in provs if p.name in names]
    return provs


def all_provider_names(device_type: str) -> List[str]:
    names = set()
    for spec in all_ops():
        names.update(p.name for p in providers_for(spec, device_type))
        names.update(f"fastdit-{b}" for b in spec.backends)
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Measurement


def measure_peaks() -> Dict[str, float]:
    """Measured (not datasheet) peaks of this GPU: bf16 matmul TFLOP/s and copy GB/s."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.randn(256 * 2 ** 20, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200)
    gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": round(tflops, 1), "copy_gbps": round(gbps, 1)}


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for x in out:
            t = _first_tensor(x)
            if t is not None:
                return t
    return None


def _call_fn(provider: Provider, case: Case, inputs: Dict):
    """A zero-argument callable running one forward (or forward + backward) of the case."""
    if not case.backward:
        return lambda: provider.fn(**inputs)
    leaves = {k: v for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and k in case.grad_inputs}
    ins = dict(inputs)
    for k, v in leaves.items():
        ins[k] = v.detach().requires_grad_(True)
    probe = _first_tensor(provider.fn(**ins))
    cot = torch.randn_like(probe)

    def run():
        out = _first_tensor(provider.fn(**ins))
        torch.autograd.grad(out, [ins[k] for k in leaves], cot, allow_unused=True)

    return run


def _check(provider: Provider, case: Case, inputs, ref64, base):
    from fastdit.testing import compare

    with torch.no_grad():
        out = _first_tensor(provider.fn(**inputs))
    c = compare("out", out, ref64, base, case.dtype)
    return c


def _to(inputs, dtype=None, device=None):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device or v.device, dtype=dtype if (dtype and v.is_floating_point()) else v.dtype)
        elif isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
            v = type(v)(x.to(device=device or x.device,
                             dtype=dtype if (dtype and x.is_floating_point()) else x.dtype) for x in v)
        out[k] = v
    return out


def run_case_gpu(case: Case, providers: List[Provider], peaks: Dict[str, float], seed: int = 0) -> Dict:
    import triton.testing

    inputs = case.make_inputs(device="cuda", seed=seed)
    row = _case_row(case)
    try:
        with torch.no_grad():
            ref64 = _first_tensor(case.reference(**_to(inputs, torch.float64)))
            base = _first_tensor(case.reference(**inputs))
    except torch.cuda.OutOfMemoryError:
        ref64 = base = None
        torch.cuda.empty_cache()
    for p in providers:
        entry = {"provider": p.name, "fastdit": p.is_fastdit}
        ok_avail, why = p.available()
        if not ok_avail or not p.supports(case):
            entry.update(skipped=why or "does not support this case")
            row["providers"].append(entry)
            continue
        try:
            if ref64 is not None and p.checks_correctness:
                c = _check(p, case, inputs, ref64, base)
                entry.update(max_err=c.err, limit=c.limit, ok=c.ok, unwritten=c.unwritten)
            else:
                entry.update(ok=None)
            fn = _call_fn(p, case, inputs)
            med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
            secs = med * 1e-3
            entry.update(median_ms=med, p20_ms=p20, p80_ms=p80)
            if case.flops:
                entry["tflops"] = case.flops / secs / 1e12
            if case.bytes:
                entry["gbps"] = case.bytes / secs / 1e9
            fracs = []
            if case.flops and peaks.get("bf16_matmul_tflops"):
                fracs.append(entry["tflops"] / peaks["bf16_matmul_tflops"])
            if case.bytes and peaks.get("copy_gbps"):
                fracs.append(entry["gbps"] / peaks["copy_gbps"])
            if fracs:
                entry["pct_peak"] = 100.0 * max(fracs)
        except torch.cuda.OutOfMemoryError:
            entry.update(skipped="out of memory")
            torch.cuda.empty_cache()
        except Exception as exc:  # a provider crashing is a result to report
            entry.update(error=f"{type(exc).__name__}: {str(exc)[:200]}", ok=False)
        row["providers"].append(entry)
    _speedups(row)
    return row


def run_case_cpu(case: Case, providers: List[Provider], seed: int = 0) -> Dict:
    """Correctness only (no timing) at check-case sizes."""
    from fastdit.testing import run_case

    row = _case_row(case)
    for p in providers:
        entry = {"provider": p.name, "fastdit": p.is_fastdit}
        ok_avail, why = p.available()
        if not ok_avail or not p.supports(case):
            entry.update(skipped=why or "does not support this case")
        elif not p.checks_correctness:
            entry.update(skipped="different op (timing context only)")
        else:
            try:
                if p.is_fastdit:  # every output and gradient, as the tests do
                    res = run_case(case, None, device="cpu", seed=seed, fn=p.fn)
                    entry.update(ok=res.ok, max_err=res.max_err,
                                 limit=min(c.limit for c in res.comparisons))
                else:  # a baseline returns the primary output only: compare that, as on GPU
                    inputs = case.make_inputs(device="cpu", seed=seed)
                    with torch.no_grad():
                        ref64 = _first_tensor(case.reference(**_to(inputs, torch.float64)))
                        base = _first_tensor(case.reference(**inputs))
                    c = _check(p, case, inputs, ref64, base)
                    entry.update(ok=c.ok, max_err=c.err, limit=c.limit)
            except Exception as exc:
                entry.update(error=f"{type(exc).__name__}: {str(exc)[:200]}", ok=False)
        row["providers"].append(entry)
    return row


def _case_row(case: Case) -> Dict:
    return {"op": case.op, "label": case.label, "mode": case.mode, "group": case.group,
            "dtype": str(case.dtype).replace("torch.", ""), "size": case.size,
            "size_label": case.size_label, "flops": case.flops, "bytes": case.bytes,
            "extra": case.extra, "providers": []}


def _speedups(row: Dict) -> None:
    """Speedup of each correct provider over the first correct non-fastdit baseline."""
    timed = [p for p in row["providers"] if "median_ms" in p]
    base = next((p for p in timed if not p["fastdit"] and p.get("ok")), None)
    if base is None:
        return
    row["speedup_baseline"] = base["provider"]
    for p in timed:
        if p.get("ok"):
            p["speedup"] = base["median_ms"] / p["median_ms"]


# ---------------------------------------------------------------------------------------------
# The run


def select(ops: Optional[Sequence[str]], providers: Optional[Sequence[str]], device_type: str):
    specs = all_ops()
    if ops:
        known = {s.name for s in specs}
        unknown = [o for o in ops if o not in known]
        if unknown:
            raise BenchError(f"unknown op(s) {', '.join(unknown)}; registered ops: {', '.join(sorted(known))}")
        specs = [get_op(o) for o in ops]
    if providers:
        known = set(all_provider_names(device_type))
        unknown = [p for p in providers if p not in known]
        if unknown:
            raise BenchError(f"unknown provider(s) {', '.join(unknown)}; known providers: "
                             f"{', '.join(sorted(known))}")
    return specs


def run(ops=None, providers=None, out_dir=None, plot=True, quick=False, progress=True,
        tests_junit: Optional[str] = None) -> Dict:
    """Runs the benchmark and writes JSON + markdown (+ PNG). Returns the results dict."""
    gpu = torch.cuda.is_available()
    device_type = "cuda" if gpu else "cpu"
    specs = select(ops, providers, device_type)
    env = environment()
    results = {"schema": RESULTS_SCHEMA, **env, "peaks": {}, "cases": []}
    if gpu:
        results["peaks"] = measure_peaks()
    work = []
    for spec in specs:
        cases = spec.bench_cases() if gpu else spec.check_cases()
        if quick:
            cases = cases[:: max(1, len(cases) // 4)]
        provs = providers_for(spec, device_type, providers)
        work += [(c, provs) for c in cases]
    bar = _progress(len(work), "fastdit bench", progress)
    for case, provs in work:
        row = run_case_gpu(case, provs, results["peaks"]) if gpu else run_case_cpu(case, provs)
        results["cases"].append(row)
        bar.update(1)
    bar.close()
    if any(s.name == "local_window_attention" for s in specs):
        from fastdit.distributed.comm_model import comm_model_table

        results["comm_model"] = comm_model_table()  # a model: the same on every device
    if tests_junit:
        results["tests"] = junit_summary(tests_junit, [s.name for s in specs])
    write_results(results, out_dir or default_results_dir(gpu), plot=plot)
    return results


def _progress(total, desc, enabled):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def junit_summary(path: str, ops: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """Per-op pass/fail/skip counts from a pytest junit XML (tests named after their op)."""
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as exc:
        raise BenchError(f"cannot read test results {path}: {exc}") from exc
    out = {op: {"passed": 0, "failed": 0, "skipped": 0} for op in ops}
    for tc in tree.iter("testcase"):
        ident = f"{tc.get('classname', '')}.{tc.get('name', '')}"
        for op in ops:
            if op in ident:
                if tc.find("failure") is not None or tc.find("error") is not None:
                    out[op]["failed"] += 1
                elif tc.find("skipped") is not None:
                    out[op]["skipped"] += 1
                else:
                    out[op]["passed"] += 1
    return out


# ---------------------------------------------------------------------------------------------
# Output


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()[:40]


def write_results(results: Dict, out_dir: str, plot: bool = True) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    stamp = results["date"].replace(":", "").replace("-", "")[:13]
    dev = "cpu" if results["kind"] == "cpu" else _slug(results["device"])
    base = os.path.join(out_dir, f"{stamp}-{dev}-{results['commit']}")
    paths = {"json": base + ".json", "md": base + ".md"}
    for p in paths.values():
        if os.path.exists(p):
            raise BenchError(f"{p} exists; refusing to overwrite")
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    if plot and results["kind"] == "gpu":
        png = base + ".png"
        if render_plot(results, png):
            paths["png"] = png
    results["_paths"] = paths
    return paths


def _fmt(x, spec="{:.3g}"):
    return "-" if x is None else spec.format(x)


def markdown(results: Dict) -> str:
    gpu = results["kind"] == "gpu"
    head = (f"# fastdit bench: {results['device']}\n\n"
            f"torch {results['torch']}, triton {results['triton']}, CUDA {results['cuda']}, "
            f"commit {results['commit']}, {results['date']}\n\n")
    if gpu:
        pk = results.get("peaks", {})
        head += (f"Measured peaks: bf16 matmul {pk.get('bf16_matmul_tflops')} TFLOP/s, "
                 f"copy {pk.get('copy_gbps')} GB/s. Times are medians (p20-p80) of CUDA-event timings.\n\n")
    else:
        head += ("**CPU run: correctness only.** No GPU here, so nothing was timed; fastdit's Triton "
                 "kernels ran through the Triton interpreter at small sizes.\n\n")
    lines = [head]
    for op in sorted({c["op"] for c in results["cases"]}):
        lines.append(f"## {op}\n")
        if gpu:
            lines.append("| case | mode | provider | median ms (p20-p80) | TFLOP/s | GB/s | % peak | max err | correct | speedup |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|")
        else:
            lines.append("| case | mode | provider | max err | limit | correct |")
            lines.append("|---|---|---|---|---|---|")
        for c in [c for c in results["cases"] if c["op"] == op]:
            extra = "; ".join(f"{k}={v}" for k, v in c.get("extra", {}).items())
            label = c["label"] + (f" ({extra})" if extra else "")
            for p in c["providers"]:
                if "skipped" in p:
                    status = f"skipped: {p['skipped']}"
                elif "error" in p:
                    status = f"ERROR: {p['error']}"
                else:
                    status = {True: "yes", False: "**NO**", None: "n/a"}[p.get("ok")]
                if gpu:
                    t = (f"{p['median_ms']:.4g} ({p['p20_ms']:.4g}-{p['p80_ms']:.4g})"
                         if "median_ms" in p else "-")
                    sp = _fmt(p.get("speedup"), "{:.2f}x") if p.get("ok") else "-"
                    lines.append(f"| {label} | {c['mode']} | {p['provider']} | {t} | {_fmt(p.get('tflops'))} | "
                                 f"{_fmt(p.get('gbps'))} | {_fmt(p.get('pct_peak'), '{:.0f}%')} | "
                                 f"{_fmt(p.get('max_err'), '{:.2e}')} | {status} | {sp} |")
                else:
                    lines.append(f"| {label} | {c['mode']} | {p['provider']} | {_fmt(p.get('max_err'), '{:.2e}')} | "
                                 f"{_fmt(p.get('limit'), '{:.2e}')} | {status} |")
        lines.append("")
    if results.get("comm_model"):
        from fastdit.distributed.comm_model import comm_model_markdown

        lines.append("## Patch-parallel CLEAR: communication model (computed, not measured)\n")
        lines.append("Bytes each rank sends per attention layer (forward) for FLUX (24 heads, D=128, "
                     "512 text tokens, bf16, 16 px per token) split into bands of image rows: "
                     "fastdit.distributed's halo exchange vs all-gathering K/V vs Ulysses all-to-all; "
                     "times = bytes / link rate, no latency (fastdit/distributed/comm_model.py).\n")
        lines.append(comm_model_markdown(results["comm_model"]))
        lines.append("")
    if results.get("tests"):
        lines.append("## Test suite on this device\n")
        lines.append("| op | passed | failed | skipped |\n|---|---|---|---|")
        for op, t in results["tests"].items():
            lines.append(f"| {op} | {t['passed']} | {t['failed']} | {t['skipped']} |")
        lines.append("")
    return "\n".join(lines)


def render_plot(results: Dict, path: str) -> bool:
    """Time vs size, one line per provider, one panel per (op, group). False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastdit bench: matplotlib not installed; no plot (pip install matplotlib)")
        return False
    groups = {}
    for c in results["cases"]:
        groups.setdefault((c["op"], c["group"]), []).append(c)
    if not groups:
        return False
    n = len(groups)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, ((op, group), cases) in zip(axes.flat, sorted(groups.items())):
        series = {}
        for c in cases:
            for p in c["providers"]:
                if "median_ms" in p and p.get("ok") is not False:
                    series.setdefault(p["provider"], []).append((c["size"], p["median_ms"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op}: {group}", fontsize=9)
        ax.set_xlabel(cases[0]["size_label"])
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"fastdit bench on {results['device']} ({results['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_results(path: str) -> Dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read results file {path}: {exc}") from exc
    if not isinstance(data, dict) or "cases" not in data or "device" not in data:
        raise BenchError(f"{path} is not a fastdit results file (no 'device'/'cases')")
    return data


def gpu_verification(results_dir: Optional[str] = None) -> Dict[str, List[str]]:
    """{op: [devices]} where a committed GPU run shows every fastdit provider correct on every
    case and the op's tests passing on that device."""
    results_dir = results_dir or default_results_dir(gpu=True)
    out: Dict[str, List[str]] = {}
    if not os.path.isdir(results_dir):
        return out
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        data = load_results(os.path.join(results_dir, name))
        if data.get("kind") != "gpu":
            continue
        ops = {}
        for c in data["cases"]:
            fast = [p for p in c["providers"] if p.get("fastdit") and "skipped" not in p]
            ok = bool(fast) and all(p.get("ok") for p in fast)
            ops[c["op"]] = ops.get(c["op"], True) and ok
        tests = data.get("tests", {})
        for op, ok in ops.items():
            t = tests.get(op)
            if ok and t and t["failed"] == 0 and t["passed"] > 0:
                out.setdefault(op, [])
                if data["device"] not in out[op]:
                    out[op].append(data["device"])
    return out
