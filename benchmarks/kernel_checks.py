"""The kernel fixes of issue #34 checked where they matter, on a GPU (a part of ``gpu_check.py``; its
``--dry-run`` runs them at tiny sizes on the CPU under the Triton interpreter).

- ``device_guard`` (item 1): every launch enters ``torch.cuda.device`` of its tensor (recorded); with
  more than one GPU, a layer on ``cuda:1`` dequantizes and runs the fused kernels while ``cuda:0`` is
  current, equal to the reference.
- ``fallback`` (item 2): Triton marked unavailable as on a host without a C compiler; dequantization
  and the fused LoRA path then run in torch, equal to what Triton gave, with one warning.
- ``two_four`` (item 12): the 2:4 rebuild, ``masked_scatter_`` against the nibble path (ms, bit-equal).
- ``ranks`` (item 14): fused forward + backward at ranks 16, 128 and 512 against the unfused path.
- ``dequant_autotune`` (item 14): the autotuned dequantization against the fixed 64 x 64 tiles.
"""

from __future__ import annotations

import warnings

import torch

from two_four_bench import _time, measure as measure_two_four

from eora_ft.kernels import launch
from eora_ft.kernels.lora_matmul import Packed, packed_lora_linear
from eora_ft.kernels.packing import pack_codes
from eora_ft.kernels.reference import dequantize as reference_dequantize

NO_COMPILER = RuntimeError("Failed to find C compiler. Please specify via CC environment variable or set "
                           "triton.knobs.build.impl.")


def _layer(k: int, n: int, rank: int, dtype: torch.dtype, device: str, group: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.01 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), generator=g).to(torch.uint8)
    packed = Packed(pack_codes(codes, 4).to(device), scales.to(device), zeros.to(device), 4, group, k)
    a = (torch.randn(rank, k, generator=g) * 0.02).to(dtype).to(device)
    b = (torch.randn(n, rank, generator=g) * 0.02).to(dtype).to(device)
    return packed, a, b


def _weight_fn(p: Packed):
    return lambda dtype: reference_dequantize(p.qweight, p.scales, p.zeros, p.bits, p.group_size, p.in_features, dtype)


def _lora(x, p, a, b, fused: bool):
    """Output, dX, dA and dB of the adapted linear through the fused (or the unfused) path."""
    x = x.detach().requires_grad_(True)
    a_, b_ = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y = packed_lora_linear(x, _weight_fn(p), a_, b_, 2.0, None, p, force_fused=fused)
    return (y, *torch.autograd.grad(y.float().square().sum(), (x, a_, b_)))


def _rel(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def check_device_guard(device: str, dtype: torch.dtype, size: int) -> dict:
    from eora_ft.kernels import fallback

    p, a, b = _layer(size, size, 16, dtype, device)
    entered = []
    real = torch.cuda.device

    def recording(where):
        entered.append(str(torch.device(where)))
        return real(where)

    torch.cuda.device = recording
    try:
        got = fallback.dequantize(p.qweight, p.scales, p.zeros, 4, 128, size, dtype=dtype)
        fused = _lora(torch.randn(4, size, device=device, dtype=dtype), p, a, b, fused=True)[0]
    finally:
        torch.cuda.device = real
    want = reference_dequantize(p.qweight, p.scales, p.zeros, 4, 128, size, dtype)
    result = {"entered": sorted(set(entered)), "expected": [str(p.qweight.device)] if device == "cuda" else [],
              "dequant_equal": bool(torch.equal(got, want)), "fused_finite": bool(torch.isfinite(fused).all())}
    result["ok"] = result["entered"] == result["expected"] and result["dequant_equal"] and result["fused_finite"]
    if device == "cuda" and torch.cuda.device_count() > 1:  # the bug itself: data on cuda:1, cuda:0 current
        torch.cuda.set_device(0)
        p1, a1, b1 = _layer(size, size, 16, dtype, "cuda:1")
        x1 = torch.randn(4, size, device="cuda:1", dtype=dtype)
        got1 = fallback.dequantize(p1.qweight, p1.scales, p1.zeros, 4, 128, size, dtype=dtype)
        fused1, unfused1 = _lora(x1, p1, a1, b1, True)[0], _lora(x1, p1, a1, b1, False)[0]
        torch.cuda.synchronize("cuda:1")
        result["second_gpu"] = {"dequant_equal": bool(torch.equal(got1.cpu(), want.cpu())),
                                "fused_rel_err": _rel(fused1, unfused1)}
        result["ok"] = result["ok"] and result["second_gpu"]["dequant_equal"] and result["second_gpu"]["fused_rel_err"] < 2e-2
    else:
        result["second_gpu"] = "one device: launch on cuda:1 with cuda:0 current not possible here"
    return result


def check_fallback(device: str, dtype: torch.dtype, size: int, repeats: int) -> dict:
    from eora_ft.kernels import fallback

    p, a, b = _layer(size, size, 16, dtype, device, seed=1)
    x = torch.randn(4, size, device=device, dtype=dtype)
    run_dequant = lambda: fallback.dequantize(p.qweight, p.scales, p.zeros, 4, 128, size, dtype=dtype)  # noqa: E731
    triton_weight, triton_ms = run_dequant(), _time(run_dequant, device, repeats)
    triton_lora = _lora(x, p, a, b, fused=True)
    saved = launch._failure, launch._warned
    launch._failure, launch._warned = NO_COMPILER, False  # as the first launch on a host without gcc leaves it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch_weight, torch_ms = run_dequant(), _time(run_dequant, device, repeats)
            torch_lora = _lora(x, p, a, b, fused=True)
    finally:
        launch._failure, launch._warned = saved
    warned = [str(w.message) for w in caught if issubclass(w.category, launch.TritonFallbackWarning)]
    result = {"dequant_bit_equal": bool(torch.equal(torch_weight, triton_weight)), "dequant_triton_ms": triton_ms,
              "dequant_torch_ms": torch_ms, "lora_rel_err": max(_rel(g, w) for g, w in zip(torch_lora, triton_lora)),
              "warnings": len(warned), "warning": warned[0][:200] if warned else None}
    result["ok"] = result["dequant_bit_equal"] and result["lora_rel_err"] < 2e-2 and result["warnings"] == 1
    return result


def check_ranks(device: str, dtype: torch.dtype, size: int, ranks: list[int]) -> dict:
    out = {}
    for rank in ranks:
        p, a, b = _layer(size, size, rank, dtype, device, seed=rank)
        x = torch.randn(8, size, device=device, dtype=dtype)
        fused, unfused = _lora(x, p, a, b, True), _lora(x, p, a, b, False)
        errors = [_rel(f, u) for f, u in zip(fused, unfused)]  # y, dX, dA, dB
        out[rank] = {"rel_err_y_dx_da_db": [float(f"{e:.2e}") for e in errors], "ok": max(errors) < 2e-2}
    return out


def check_dequant_autotune(device: str, dtype: torch.dtype, shapes: list[str], repeats: int) -> dict:
    from eora_ft.kernels import dequant

    out = {}
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        p, _, _ = _layer(k, n, 16, dtype, device, seed=2)
        args = (p.qweight, p.scales, p.zeros, 4, 128, k)
        want = reference_dequantize(*args, dtype)
        tuned = lambda: dequant.dequantize_triton(*args, dtype=dtype)  # noqa: E731
        fixed = lambda: dequant.dequantize_triton(*args, dtype=dtype, block_k=64, block_n=64)  # noqa: E731
        row = {"equal": bool(torch.equal(tuned(), want) and torch.equal(fixed(), want)),
               "tuned_ms": _time(tuned, device, repeats), "fixed_64x64_ms": _time(fixed, device, repeats)}
        row["speedup"] = round(row["fixed_64x64_ms"] / row["tuned_ms"], 2)
        best = getattr(dequant._TUNED[0], "best_config", None) if dequant._TUNED else None
        row["chosen"] = str(best) if best is not None else "interpreter: first configuration"
        out[shape] = row
    return out


def run_checks(dry_run: bool, device: str, repeats: int) -> dict:
    """Every check above; ``ok`` per check (the sizes: tiny under --dry-run, Llama-3-8B shapes on a GPU)."""
    dtype = torch.float32 if dry_run else torch.bfloat16
    size = 256 if dry_run else 4096
    report = {"device_guard": check_device_guard(device, dtype, size),
              "fallback": check_fallback(device, dtype, size, repeats),
              "two_four": [measure_two_four(n, k, dt, device, repeats) for n, k in
                           ([(64, 128)] if dry_run else [(4096, 4096), (14336, 4096)])
                           for dt in ([torch.float32] if dry_run else [torch.float32, torch.bfloat16])],
              "ranks": check_ranks(device, dtype, 128 if dry_run else 4096, [16, 80, 200] if dry_run else [16, 128, 512]),
              "dequant_autotune": check_dequant_autotune(
                  device, dtype, ["128x256"] if dry_run else ["4096x4096", "4096x14336", "14336x4096"], repeats)}
    return report


def checks_table(report: dict) -> str:
    """A short markdown summary of :func:`run_checks`."""
    lines = ["| check | result |", "|---|---|"]
    guard = report["device_guard"]
    lines.append(f"| device guard | {'ok' if guard['ok'] else 'FAIL'}: entered {guard['entered']}; "
                 f"second GPU: {guard['second_gpu']} |")
    fb = report["fallback"]
    lines.append(f"| Triton fallback | {'ok' if fb['ok'] else 'FAIL'}: dequant bit-equal {fb['dequant_bit_equal']}, "
                 f"LoRA rel err {fb['lora_rel_err']:.1e}, {fb['warnings']} warning(s); dequant "
                 f"{fb['dequant_triton_ms']:.3f} ms Triton vs {fb['dequant_torch_ms']:.3f} ms torch |")
    for row in report["two_four"]:
        new = "triton" if "triton_ms" in row else "torch"
        lines.append(f"| 2:4 rebuild {row['shape']} {row['dtype']} | old {row['old_ms']} ms, {new} {row[f'{new}_ms']} ms "
                     f"({row['speedup']}x), bit-equal {row[f'{new}_bit_equal']} |")
    for rank, row in report["ranks"].items():
        lines.append(f"| fused rank {rank} | {'ok' if row['ok'] else 'FAIL'}: rel err y/dX/dA/dB "
                     f"{row['rel_err_y_dx_da_db']} |")
    for shape, row in report["dequant_autotune"].items():
        lines.append(f"| dequant autotune {shape} | equal {row['equal']}; {row['tuned_ms']:.3f} ms vs 64x64 "
                     f"{row['fixed_64x64_ms']:.3f} ms ({row['speedup']}x); {row['chosen']} |")
    return "\n".join(lines)


def all_ok(report: dict) -> bool:
    """Whether every correctness check of :func:`run_checks` passed (timings are reported, not judged)."""
    return (report["device_guard"]["ok"] and report["fallback"]["ok"]
            and all(row["ok"] for row in report["ranks"].values())
            and all(row["equal"] for row in report["dequant_autotune"].values())
            and all(v for row in report["two_four"] for key, v in row.items() if key.endswith("_bit_equal")))
