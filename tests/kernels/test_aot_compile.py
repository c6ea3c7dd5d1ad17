"""Every Triton kernel compiles for sm_80 and sm_90 (no GPU needed) within its resource budget, with the
dot instruction its dtype calls for: every case of kernels/aot.py (kernel x activation dtype x bit
width x block configuration), each target. Budgets (kernels/aot.py): no spills, shared memory within
the architecture's per-block limit; fp16/bf16 dots on the tensor cores (HMMA or HGMMA), fp32 dots
IEEE on the FMA units (not TF32)."""

import pytest

from eora_ft.kernels.aot import TARGETS, cases, compile_all, problems

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builds():
    return {(build.case, build.target): build for build in compile_all()}


def test_every_case_was_built_for_every_target(builds):
    assert len(builds) == len(cases()) * len(TARGETS) >= 200


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", cases(), ids=lambda case: case.label.replace(" ", "-"))
def test_build_is_within_budget(builds, case, target):
    build = builds[case, target]
    assert problems(build) == [], (case.label, target, build)
