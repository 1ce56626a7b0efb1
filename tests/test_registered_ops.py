"""Every registered op, every check case, every backend that can run here, against float64.

A new op gets these tests by registering itself (fastdit/_registry.py); nothing to add here.
"""
import pytest
import torch

from conftest import DEVICE
from fastdit._dispatch import available_backends
from fastdit._registry import all_ops
from fastdit.testing import assert_all_ok, run_case


def _params():
    for spec in all_ops():
        backends = [b for b in available_backends(spec.name, DEVICE)]
        for case in spec.check_cases():
            for backend in backends:
                yield pytest.param(case, backend, id=f"{spec.name}-{backend}-{case.label}")


@pytest.mark.parametrize("case,backend", list(_params()))
def test_matches_float64_reference(case, backend):
    result = run_case(case, backend, device=DEVICE)
    assert result.comparisons, "no outputs were compared"
    names = {c.name for c in result.comparisons}
    if case.backward:
        assert any(n.startswith("d") for n in names), "backward case compared no gradients"
    assert_all_ok(result.comparisons, f"{case.op}[{backend}] {case.label}")
