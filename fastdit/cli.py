"""The `fastdit` command (also `python -m fastdit`): info, check, bench, compile-report."""
from __future__ import annotations

import argparse
import json
import sys
import warnings


def _err(msg: str, code: int = 2) -> int:
    print(f"fastdit: error: {msg}", file=sys.stderr)
    return code


def cmd_info(args) -> int:
    import torch

    import fastdit
    from fastdit import _cuda_ext
    from fastdit._dispatch import backend_status
    from fastdit._registry import all_ops
    from fastdit.benchmark import BenchError, environment, gpu_verification

    env = environment()
    try:
        verified = gpu_verification(args.results)
    except BenchError as exc:
        return _err(str(exc))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"fastdit": fastdit.__version__, **env,
            "cuda_extension": "built" if _cuda_ext.built() else _cuda_ext.status()[1], "ops": {}}
    for spec in all_ops():
        info["ops"][spec.name] = {
            "summary": spec.summary,
            "backends": {b: {"available": ok, "note": why}
                         for b, (ok, why) in backend_status(spec.name, device_type).items()},
            "gpu_verified_on": verified.get(spec.name, []),
        }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"fastdit {info['fastdit']}  (commit {env['commit']})")
    print(f"device: {env['device']}")
    print(f"python {env['python']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
    print(f"CUDA C++ extension: {info['cuda_extension']}")
    print(f"\nops on {device_type}:")
    for name, o in info["ops"].items():
        print(f"  {name}: {o['summary']}")
        for b, st in o["backends"].items():
            mark = "yes" if st["available"] else "no "
            print(f"      {b:<10} {mark}  {st['note']}")
        ver = ", ".join(o["gpu_verified_on"]) or "NOT GPU-verified yet (no committed GPU run)"
        print(f"      GPU-verified: {ver}")
    return 0


def cmd_check(args) -> int:
    import torch

    from fastdit._dispatch import available_backends
    from fastdit._registry import all_ops, get_op
    from fastdit.testing import run_case

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _err("--device cuda but no CUDA GPU is visible")
    try:
        specs = [get_op(o) for o in args.op] if args.op else all_ops()
    except KeyError as exc:
        return _err(str(exc.args[0]))
    rows, failed = [], 0
    work = []
    for spec in specs:
        backends = available_backends(spec.name, device)
        if args.backend:
            unknown = [b for b in args.backend if b not in spec.backends]
            if unknown and len(specs) == 1:
                return _err(f"unknown backend(s) {', '.join(unknown)} for {spec.name}; "
                            f"it has {', '.join(spec.backends)}")
            backends = [b for b in backends if b in args.backend]
        work += [(spec, case, b) for case in spec.check_cases() for b in backends]
    from fastdit.benchmark import _progress

    bar = _progress(len(work), "fastdit check", not args.quiet)
    for spec, case, backend in work:
        try:
            res = run_case(case, backend, device=device)
            ok, err = res.ok, f"{res.max_err:.2e}"
            detail = "" if ok else "; ".join(c.describe() for c in res.comparisons if not c.ok)
        except Exception as exc:
            ok, err, detail = False, "-", f"{type(exc).__name__}: {exc}"
        failed += not ok
        rows.append((spec.name, backend, case.label, case.mode, err, "PASS" if ok else "FAIL", detail))
        bar.update(1)
    bar.close()
    print(f"fastdit check on {device} ({'Triton via the interpreter' if device == 'cpu' else 'GPU'}):")
    widths = [max(len(str(r[i])) for r in rows + [("op", "backend", "case", "mode", "max err", "", "")])
              for i in range(6)]
    hdr = ("op", "backend", "case", "mode", "max err", "result")
    print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r[:6], widths)))
        if r[6]:
            print(f"    -> {r[6]}")
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    import torch

    from fastdit import benchmark

    if not torch.cuda.is_available():
        print("fastdit bench: no GPU on this machine: running the ops at small sizes for correctness "
              "only (Triton kernels through the interpreter); nothing is timed.")
    try:
        results = benchmark.run(ops=args.op, providers=args.provider, out_dir=args.out,
                                plot=not args.no_plot, quick=args.quick, progress=not args.quiet,
                                tests_junit=args.tests_junit)
    except benchmark.BenchError as exc:
        return _err(str(exc))
    print(benchmark.markdown(results))
    for kind, path in results["_paths"].items():
        print(f"wrote {kind}: {path}")
    bad = [p for c in results["cases"] for p in c["providers"] if p.get("fastdit") and p.get("ok") is False]
    return 1 if bad else 0


def cmd_compile_report(args) -> int:
    from fastdit import aot
    from fastdit._registry import kernel_configs

    try:
        archs = [int(a) for a in args.arch.split(",")] if args.arch else list(aot.REQUIRED_ARCHS)
    except ValueError:
        return _err(f"--arch takes comma-separated compute capabilities like 80,89,90; got {args.arch!r}")
    configs = kernel_configs()
    if args.op:
        known = {c.op for c in configs}
        if args.op not in known:
            return _err(f"no kernels registered for op {args.op!r}; ops with kernels: {', '.join(sorted(known))}")
    from fastdit.benchmark import _progress

    n = sum(1 for c in configs if not args.op or c.op == args.op) * len(archs)
    bar = _progress(n, "compiling Triton kernels", not args.quiet)
    results = aot.compile_all(archs=archs, op=args.op, jobs=args.jobs, progress=lambda r: bar.update(1))
    bar.close()
    nv = []
    if not args.no_csrc:
        files = aot.csrc_kernel_files()
        for f in files:
            for arch in aot.NVCC_ARCHS:
                nv += aot.nvcc_compile(f, arch)
    rows = results + nv
    print(f"{'kernel':<70} {'arch':<7} {'ok':<4} {'regs':>4} {'stack':>5} {'smem':>7}  tensor cores")
    for r in rows:
        print(f"{r.name[:70]:<70} {r.arch:<7} {'yes' if r.ok else 'NO':<4} {r.regs:>4} "
              f"{r.stack + r.spill_bytes:>5} {r.shared:>7}  {r.tensor_cores}"
              + (f"   error: {r.error}" if r.error else "")
              + ("   SPILLS (hot)" if r.ok and r.hot and r.spills else ""))
    if not nv and not args.no_csrc:
        print("csrc/: no CUDA C++ kernels yet (nothing to compile with nvcc)")
    errors = [r for r in rows if not r.ok and int(r.arch[3:5]) in aot.REQUIRED_ARCHS]
    spills = [r for r in rows if r.ok and r.hot and r.spills]
    print(f"\n{len(rows)} compiles: {len(errors)} errors, {len(spills)} hot kernels with spills/stack")
    if args.json:
        import dataclasses

        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 1 if errors or (args.strict and spills) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="device, versions, backends, GPU-verified status")
    s.add_argument("--json", action="store_true")
    s.add_argument("--results", help="results folder to read GPU verification from")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("check", help="run every op against its float64 reference here")
    s.add_argument("--op", action="append", help="op name (repeatable); default all")
    s.add_argument("--backend", action="append", help="backend name (repeatable); default all available")
    s.add_argument("--device", choices=["cpu", "cuda"])
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("bench", help="benchmark every op against its baselines")
    s.add_argument("--op", action="append", help="op name (repeatable); default all")
    s.add_argument("--provider", action="append", help="provider name (repeatable); default all")
    s.add_argument("--out", help="results folder (default bench/results, or bench/results/local on CPU)")
    s.add_argument("--no-plot", action="store_true")
    s.add_argument("--quick", action="store_true", help="a quarter of the cases")
    s.add_argument("--tests-junit", help="pytest junit XML of this device's test run, recorded in the results")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("compile-report", help="AOT-compile every kernel for sm_80/89/90 (and nvcc csrc/)")
    s.add_argument("--op", help="only this op's kernels")
    s.add_argument("--arch", help="comma-separated compute capabilities (default 80,89,90; 100,120 optional)")
    s.add_argument("--jobs", type=int, default=0)
    s.add_argument("--no-csrc", action="store_true", help="skip the nvcc compile of csrc/")
    s.add_argument("--json", help="also write the report as JSON here")
    s.add_argument("--strict", action="store_true", help="exit 1 if a hot kernel spills")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_compile_report)
    return p


def main(argv=None) -> int:
    from fastdit._dispatch import FastditNotice

    warnings.simplefilter("ignore", FastditNotice)
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
