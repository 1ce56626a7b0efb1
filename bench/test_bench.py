"""The benchmark cases as pytest-benchmark tests:  pytest bench --benchmark-only

Same registry as `fastdit bench` (every op's bench cases x every provider). Timings need a GPU;
on a machine without one these are skipped (use `fastdit check` / `fastdit bench` there for
correctness).
"""
import pytest
import torch

from fastdit._registry import all_ops
from fastdit.benchmark import _call_fn, providers_for

GPU = torch.cuda.is_available()


def _params():
    for spec in all_ops():
        for case in spec.bench_cases():
            for prov in providers_for(spec, "cuda"):
                yield pytest.param(case, prov, id=f"{spec.name}-{prov.name}-{case.mode}-{case.label}")


@pytest.mark.skipif(not GPU, reason="timings need a CUDA GPU; none visible")
@pytest.mark.parametrize("case,provider", list(_params()))
def test_bench(benchmark, case, provider):
    ok, why = provider.available()
    if not ok or not provider.supports(case):
        pytest.skip(why or "provider does not support this case")
    fn = _call_fn(provider, case, case.make_inputs(device="cuda", seed=0))

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"{case.op} {case.group}"
    benchmark.extra_info.update(flops=case.flops, bytes=case.bytes, size=case.size)
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
