"""The foundation: backend dispatch, the correctness helpers, poisoning, the CLI and the bench
harness (including their bad-input behaviour)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastdit
from fastdit import _memory, benchmark, cli
from fastdit._dispatch import BackendError, FastditNotice, _NOTIFIED, resolve_backend
from fastdit.testing import compare, randn, seed_for


def _qkv(n=9, d=32):
    return [randn((1, 2, n, d), seed=seed_for("foundation", i)) for i in range(3)]


# --------------------------------------------------------------------------- dispatch


def test_default_backend_on_cpu_is_reference_with_one_notice():
    _NOTIFIED.discard("linear_attention")
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fastdit.linear_attention(q, k, v)
        fastdit.linear_attention(q, k, v)
    notices = [x for x in w if issubclass(x.category, FastditNotice)]
    assert len(notices) == 1
    assert "reference" in str(notices[0].message)
    assert resolve_backend("linear_attention", None, torch.device("cpu")) == "reference"


def test_explicit_triton_on_cpu_runs_the_kernel_in_the_interpreter():
    q, k, v = _qkv()
    out_t = fastdit.linear_attention(q, k, v, backend="triton")
    out_r = fastdit.linear_attention(q, k, v, backend="reference")
    assert torch.allclose(out_t, out_r, atol=1e-5, rtol=1e-5)


def test_unknown_backend_error_names_the_choices():
    q, k, v = _qkv()
    with pytest.raises(BackendError, match="unknown backend 'cudnn'.*triton, cuda, reference"):
        fastdit.linear_attention(q, k, v, backend="cudnn")


def test_unavailable_backend_error_names_the_available_ones():
    q, k, v = _qkv()
    with pytest.raises(BackendError, match="not available on cpu.*available: triton, reference"):
        fastdit.linear_attention(q, k, v, backend="cuda")


def test_backends_report():
    rep = fastdit.backends("cpu")
    assert rep["linear_attention"]["reference"][0] is True
    assert rep["linear_attention"]["triton"][0] is True
    assert rep["linear_attention"]["cuda"][0] is False


def test_import_without_cuda_extension():
    code = "import fastdit, fastdit._cuda_ext as e; print(e.built(), e.status()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == "False"


# --------------------------------------------------------------------------- correctness helpers


def test_poisoned_outputs_are_nan():
    with fastdit.testing.poisoned_outputs():
        t = _memory.empty((3, 4), dtype=torch.float16, device="cpu")
    assert torch.isnan(t).all()
    assert not _memory.poisoning()


def test_compare_flags_unwritten_elements_and_large_errors():
    ref = randn((16,), dtype=torch.float64, seed=1)
    base = ref.float()
    good = ref.float()
    assert compare("x", good, ref, base).ok
    holes = good.clone()
    holes[3] = float("nan")
    c = compare("x", holes, ref, base)
    assert not c.ok and c.unwritten == 1
    off = good + 1e-3
    assert not compare("x", off, ref, base).ok


def test_seeds_differ_per_test_id():
    assert seed_for("a", 1) != seed_for("a", 2)
    a = randn((8,), seed=seed_for("x"))
    assert not torch.equal(a, torch.zeros(8)) and a.std() > 0.1


# --------------------------------------------------------------------------- CLI


def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastdit", *args], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_info(tmp_path):
    out = _run_cli("info", "--json", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert "linear_attention" in info["ops"]
    assert info["ops"]["linear_attention"]["gpu_verified_on"] == []


def test_cli_info_rejects_a_corrupt_results_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    out = _run_cli("info", "--results", str(tmp_path))
    assert out.returncode == 2
    assert "cannot read results file" in out.stderr
    assert bad.read_text() == "{not json"


def test_cli_unknown_names_exit_nonzero(tmp_path):
    for args, msg in [(("check", "--op", "nope"), "unknown op 'nope'"),
                      (("bench", "--op", "nope", "--out", str(tmp_path)), "unknown op"),
                      (("bench", "--provider", "nope", "--out", str(tmp_path)), "unknown provider"),
                      (("compile-report", "--op", "nope"), "no kernels registered")]:
        out = _run_cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert msg in out.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written on bad input"


def test_cli_check_one_op(capsys):
    rc = cli.main(["check", "--op", "linear_attention", "--backend", "triton", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and ", 0 failed" in out


def test_bench_on_cpu_is_correctness_only_and_never_overwrites(tmp_path):
    res = benchmark.run(ops=["linear_attention"], out_dir=str(tmp_path), quick=True, progress=False)
    assert res["kind"] == "cpu"
    paths = res["_paths"]
    md = open(paths["md"]).read()
    assert "CPU run: correctness only" in md
    data = json.load(open(paths["json"]))
    provs = [p for c in data["cases"] for p in c["providers"]]
    assert not any("median_ms" in p for p in provs), "CPU runs must not time anything"
    assert any(p["provider"] == "fastdit-triton" and p["ok"] for p in provs)
    with pytest.raises(benchmark.BenchError, match="refusing to overwrite"):
        benchmark.write_results(data, str(tmp_path), plot=False)


def test_bench_on_cpu_runs_every_provider_without_errors(tmp_path):
    res = benchmark.run(out_dir=str(tmp_path), quick=True, progress=False, plot=False)
    errors = [(c["op"], c["label"], p["provider"], p["error"]) for c in res["cases"]
              for p in c["providers"] if "error" in p]
    assert not errors, errors
    fast = [p for c in res["cases"] for p in c["providers"] if p["fastdit"] and "skipped" not in p]
    assert fast and all(p["ok"] for p in fast)
    assert {c["op"] for c in res["cases"]} == {s.name for s in fastdit._registry.all_ops()}


def _fake_gpu_results(ok=True, failed=0):
    return {"schema": 1, "kind": "gpu", "device": "NVIDIA H100 80GB HBM3", "cases": [
        {"op": "linear_attention", "providers": [
            {"provider": "fastdit-triton", "fastdit": True, "ok": ok},
            {"provider": "authors-eager", "fastdit": False, "ok": True}]}],
        "tests": {"linear_attention": {"passed": 10, "failed": failed, "skipped": 0}}}


@pytest.mark.parametrize("ok,failed,verified", [(True, 0, True), (False, 0, False), (True, 2, False)])
def test_gpu_verification_needs_correct_bench_and_passing_tests(tmp_path, ok, failed, verified):
    (tmp_path / "r.json").write_text(json.dumps(_fake_gpu_results(ok, failed)))
    got = benchmark.gpu_verification(str(tmp_path))
    assert ("linear_attention" in got) == verified


def test_markdown_gives_no_speedup_to_an_incorrect_provider():
    res = {"device": "GPU X", "kind": "gpu", "torch": "t", "triton": "t", "cuda": "c", "commit": "c",
           "date": "d", "peaks": {}, "cases": [{
               "op": "op", "label": "case", "mode": "fwd", "group": "g", "size": 1, "extra": {},
               "providers": [
                   {"provider": "base", "fastdit": False, "ok": True, "median_ms": 2.0, "p20_ms": 2, "p80_ms": 2},
                   {"provider": "fastdit-triton", "fastdit": True, "ok": False, "median_ms": 1.0,
                    "p20_ms": 1, "p80_ms": 1, "max_err": 1.0}]}]}
    benchmark._speedups(res["cases"][0])
    assert "speedup" not in res["cases"][0]["providers"][1]
    md = benchmark.markdown(res)
    line = [ln for ln in md.splitlines() if "fastdit-triton" in ln][0]
    assert "**NO**" in line and line.rstrip().endswith("| - |")


def test_junit_summary_counts_per_op(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuite><testcase classname="tests.test_linear_attention" name="test_a"/>'
        '<testcase classname="tests.test_linear_attention" name="test_b"><failure/></testcase>'
        '<testcase classname="tests.test_x" name="test_linear_attention_c"><skipped/></testcase>'
        "</testsuite>")
    s = benchmark.junit_summary(str(xml), ["linear_attention"])
    assert s["linear_attention"] == {"passed": 1, "failed": 1, "skipped": 1}
    with pytest.raises(benchmark.BenchError):
        benchmark.junit_summary(str(tmp_path / "missing.xml"), ["linear_attention"])


def test_setup_skips_cuda_build_with_a_message():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTDIT_BUILD_CUDA="0")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "skipping the CUDA C++ extension" in out.stderr
    assert out.stdout.strip().endswith("fastdit")


# --------------------------------------------------------------------------- interpreter fidelity

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastdit._triton import launch  # noqa: E402


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr):
    i = tl.arange(0, 16)
    j = tl.arange(0, 32)
    a = tl.load(a_ptr + i[:, None] * 32 + j[None, :])
    b = tl.load(b_ptr + j[:, None] * 16 + i[None, :])
    tl.store(c_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_casts_round_to_nearest_like_the_gpu(dtype):
    x = randn((1000,), seed=11)
    y = torch.empty(1000, dtype=dtype)
    launch(_cast_kernel, (1,), x, y, 1000, BLOCK=1024)
    assert torch.equal(y, x.to(dtype)), "fp32 -> 16-bit casts must round to nearest even"


def test_interpreter_bf16_dot_is_exact_products_fp32_accumulation():
    a = randn((16, 32), dtype=torch.bfloat16, seed=12)
    b = randn((32, 16), dtype=torch.bfloat16, seed=13)
    c = torch.empty(16, 16)
    launch(_dot_kernel, (1,), a, b, c)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-6)
