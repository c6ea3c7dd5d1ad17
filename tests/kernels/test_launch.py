"""Every Triton launch runs on its data's device, and Triton's infrastructure failures fall back to torch.

Issue #34, items 1 and 2: Triton launches on the current CUDA device (a layer on cuda:1 would be read
with cuda:0 current), and a host without a C compiler fails at the first launch."""

import ast
import os
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eora_ft.kernels import launch
from eora_ft.kernels.packing import pack_codes
from eora_ft.kernels.reference import dequantize as reference_dequantize

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
LINEAR = Path(__file__).resolve().parents[2] / "eora_ft" / "compress" / "linear.py"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                  reason="Triton needs a GPU or TRITON_INTERPRET=1 set before import")
NO_COMPILER = RuntimeError("Failed to find C compiler. Please specify via CC environment variable or set "
                           "triton.knobs.build.impl.")  # triton/runtime/build.py, word for word


def _subscript_calls(path: Path) -> list[tuple[str, int]]:
    """``x[...](...)`` calls (how a Triton kernel is launched) in ``path``: (innermost enclosing function, line)."""
    tree = ast.parse(path.read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)]

    def owner(call):
        around = [f for f in functions if f.lineno <= call.lineno <= f.end_lineno]
        return max(around, key=lambda f: f.lineno).name if around else "<module>"

    return [(owner(call), call.lineno) for call in calls]


def test_every_triton_launch_goes_through_the_one_helper():
    sources = sorted(KERNELS.glob("*.py")) + [LINEAR]
    assert len(sources) > 8
    outside = {str(p.name): calls for p in sources if p.name != "launch.py" and (calls := _subscript_calls(p))}
    assert outside == {}, f"kernel[grid](...) outside kernels/launch.py: {outside}"
    assert [name for name, _ in _subscript_calls(KERNELS / "launch.py")] == ["launch"]
    # and the launching modules do call it
    for name in ("dequant.py", "fused.py", "sparse24_triton.py"):
        assert "launch(" in (KERNELS / name).read_text(), name


class _Recorder:
    """Stands in for ``torch.cuda.device``: records the device entered and whether the kernel ran inside."""

    def __init__(self):
        self.entered, self.inside = [], False

    def __call__(self, device):
        recorder = self

        class Guard:
            def __enter__(self):
                recorder.entered.append(device)
                recorder.inside = True

            def __exit__(self, *exc):
                recorder.inside = False

        return Guard()


def test_launch_enters_the_device_guard_of_the_tensor(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", recorder)
    ran_inside = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: ran_inside.append((grid, recorder.inside, args, kwargs))

    on_second_gpu = SimpleNamespace(device=torch.device("cuda", 1))  # what the guard reads of a tensor
    launch.launch(Kernel(), (3,), on_second_gpu, 7, BLOCK=16)
    assert recorder.entered == [torch.device("cuda", 1)]
    assert ran_inside == [((3,), True, (7,), {"BLOCK": 16})]


def test_cpu_tensors_need_no_guard(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda device: pytest.fail(f"guard entered for {device}"))
    ran = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args: ran.append(args)

    launch.launch(Kernel(), (1,), torch.zeros(1), 5)
    assert ran == [(5,)]


@pytest.mark.parametrize("err,infrastructure", [
    (NO_COMPILER, True),
    (RuntimeError("0 active drivers ([]). There should only be one."), True),
    (subprocess.CalledProcessError(1, ["gcc", "cuda_utils.c"]), True),  # e.g. no Python.h
    (PermissionError("~/.triton/cache"), True),
    (ImportError("libcuda.so.1"), True),
    (ValueError("out must be a contiguous [32, 64] buffer"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (TypeError("missing argument"), False),
])
def test_only_infrastructure_failures_count(err, infrastructure):
    assert launch.is_infrastructure_failure(err) is infrastructure


class _NoCompiler:
    """A kernel whose launch fails as Triton's does on a host without a C compiler."""

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            raise NO_COMPILER
        return run


@pytest.fixture
def fresh_process(monkeypatch):
    """No failure recorded and no warning given yet, as in a new process (restored afterwards)."""
    monkeypatch.setattr(launch, "_failure", None)
    monkeypatch.setattr(launch, "_warned", False)


def _packed(bits=4, k=128, n=64, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    scales = torch.rand(k // group, n, generator=g) + 0.05
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=g).to(torch.uint8)
    return pack_codes(codes, bits), scales, zeros


@needs_triton
def test_dequantize_falls_back_to_the_reference_with_one_warning(monkeypatch, fresh_process):
    from eora_ft.kernels import dequant, fallback

    monkeypatch.setattr(dequant, "_dequant_kernel", _NoCompiler())
    qweight, scales, zeros = _packed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fallback.dequantize(qweight, scales, zeros, 4, 32, 128, dtype=torch.float32)
        second = fallback.dequantize(qweight, scales, zeros, 4, 32, 128, dtype=torch.float16)
    assert torch.equal(first, reference_dequantize(qweight, scales, zeros, 4, 32, 128, dtype=torch.float32))
    assert torch.equal(second, reference_dequantize(qweight, scales, zeros, 4, 32, 128, dtype=torch.float16))
    fallbacks = [w for w in caught if issubclass(w.category, launch.TritonFallbackWarning)]
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert "Failed to find C compiler" in message and "slower" in message  # why, and what it costs
    assert isinstance(launch.unavailable(), RuntimeError)


@needs_triton
def test_a_kernel_error_is_not_hidden_by_the_fallback(fresh_process):
    from eora_ft.kernels import fallback

    qweight, scales, zeros = _packed()
    with pytest.raises(ValueError, match=r"contiguous \[64, 128\] buffer"):
        fallback.dequantize(qweight, scales, zeros, 4, 32, 128, out=torch.empty(128, 64))
    assert launch.unavailable() is None


@needs_triton
def test_fused_lora_falls_back_to_dequantize_and_matmul(monkeypatch, fresh_process):
    from eora_ft.kernels import fused
    from eora_ft.kernels.lora_matmul import Packed, packed_lora_linear

    qweight, scales, zeros = _packed(seed=3)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 128, generator=g) * 0.1, torch.randn(64, 8, generator=g) * 0.1
    packed = Packed(qweight, scales, zeros, 4, 32, 128)
    weight_fn = lambda dtype: reference_dequantize(qweight, scales, zeros, 4, 32, 128, dtype=dtype)  # noqa: E731
    x = torch.randn(2, 128, generator=g, requires_grad=True)

    def run(force_fused):
        a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = packed_lora_linear(x, weight_fn, a_, b_, 2.0, None, packed, force_fused=force_fused)
        return (y, *torch.autograd.grad(y.square().sum(), (x, a_, b_)))

    unfused = run(False)
    monkeypatch.setattr(fused, "_fused_forward_kernel", _NoCompiler())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fell_back = [run(True), run(True)]
    for result in fell_back:
        for got, want in zip(result, unfused):
            assert torch.equal(got, want)
    assert len([w for w in caught if issubclass(w.category, launch.TritonFallbackWarning)]) == 1
