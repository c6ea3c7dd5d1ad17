"""Dense-weight rebuild of a pruned-only 2:4 layer, before and after issue #34 item 12, in one run.

``old``: ``masked_scatter_`` of the kept values through the unpacked bool mask (what every forward,
backward and recompute paid); ``torch``: the nibble path in element-wise torch passes (CPU, and CUDA
where Triton cannot run); ``triton``: the one-pass kernel (CUDA only). Every result is checked equal to
``old`` bit for bit.

    OMP_NUM_THREADS=2 python benchmarks/two_four_bench.py                  # CPU, Llama-3-8B shapes, fp32 + bf16
    python benchmarks/two_four_bench.py --device cuda                       # adds the Triton kernel and peak memory

Prints one JSON object per shape x dtype and a markdown table (ms, median of --repeats; ratio = old / new).
"""

from __future__ import annotations

import argparse
import json

import torch

from eora_ft.kernels.packing import pack_mask
from kernel_bench import _time  # one timer for the kernel benchmarks (benchmarks/ is the script's path)
from eora_ft.kernels.sparse24 import is_two_four, masked_dense, two_four_dense_torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def two_four_layer(n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Kept values ``[N*K/2]`` and packed keep-mask ``[N, K/8]`` of a random exact 2:4 ``[N, K]`` weight."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    keep.scatter_(2, torch.rand(n, k // 4, 4, generator=g).topk(2, dim=2).indices, True)
    keep = keep.view(n, k)
    values = torch.randn(n * k // 2, generator=g).to(dtype)
    return values.to(device), pack_mask(keep).to(device)


def _peak_mib(fn, device: str) -> float | None:
    """Peak GPU memory above what was allocated before ``fn`` (its output included)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def measure(n: int, k: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Times (ms) of every rebuild of an ``N x K`` 2:4 layer, their bit-equality with ``old``, and ratios."""
    values, keep_bits = two_four_layer(n, k, dtype, device)
    assert is_two_four(keep_bits, k, values.numel())
    paths = {"old": lambda: masked_dense(values, keep_bits, n, k, dtype),
             "torch": lambda: two_four_dense_torch(values, keep_bits, n, k, dtype)}
    if device == "cuda":
        from eora_ft.kernels.sparse24_triton import two_four_dense_triton

        paths["triton"] = lambda: two_four_dense_triton(values, keep_bits, n, k, dtype)
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    want = paths["old"]().view(bits)
    row = {"shape": f"{n}x{k}", "dtype": str(dtype).replace("torch.", ""), "device": device}
    for name, fn in paths.items():
        row[f"{name}_bit_equal"] = bool(torch.equal(fn().view(bits), want))
        row[f"{name}_ms"] = round(_time(fn, device, repeats), 2)
        if device == "cuda":
            row[f"{name}_peak_mib"] = _peak_mib(fn, device)
    new = "triton" if device == "cuda" else "torch"
    row["speedup"] = round(row["old_ms"] / row[f"{new}_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"], help="NxK (out x in)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for dtype in args.dtypes:
            rows.append(measure(n, k, DTYPES[dtype], args.device, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    paths = [p for p in ("old", "torch", "triton") if f"{p}_ms" in rows[0]]
    print("\n| shape (NxK) | dtype | " + " | ".join(f"{p} ms" for p in paths) + " | old / new | bit-equal |")
    print("|---|---|" + "---|" * (len(paths) + 2))
    for row in rows:
        equal = all(row[f"{p}_bit_equal"] for p in paths)
        print(f"| {row['shape']} | {row['dtype']} | " + " | ".join(f"{row[f'{p}_ms']:.1f}" for p in paths)
              + f" | {row['speedup']:.2f}x | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
