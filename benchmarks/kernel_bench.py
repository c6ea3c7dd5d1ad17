"""Forward and forward+backward time (and GPU peak memory) of one adapted linear, three ways:

- ``packed``: our CompressedLinear (int4 g128 codes) + LoRA through ``PackedLoraMatmul`` (reference
  dequantize + matmul on CPU; Triton dequantize / fused small-M kernels on GPU),
- ``dense``:  ``nn.Linear`` (bf16 on GPU, fp32 on CPU) + PEFT LoRA,
- ``nf4``:    bitsandbytes ``Linear4bit`` NF4 + PEFT LoRA.

    OMP_NUM_THREADS=2 python benchmarks/kernel_bench.py --device cpu --shapes 256x768 768x256 4096x4096 --tokens 1 16 512 2048
    python benchmarks/kernel_bench.py --device cuda        # Llama-3-8B shapes, M = 1 .. 16384, r = 16 and 64

Prints one JSON object per measurement and a markdown table (times in ms, median of --repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from eora_ft.compress import RTN, make_compressor
from eora_ft.adapters.peft_bridge import build_lora_model, lora_config

LLAMA3_8B = ["4096x4096", "4096x1024", "4096x14336", "14336x4096", "4096x6144", "4096x28672"]
GPU_TOKENS = [1, 16, 128, 1024, 4096, 16384]


class _One(nn.Module):
    """A one-linear model PEFT can wrap; ``proj`` is the layer under test."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.anchor = nn.Parameter(torch.ones(()), requires_grad=False)  # PEFT places adapters by a parameter

    def forward(self, x):
        return self.proj(x)


def _build(kind: str, k: int, n: int, rank: int, dtype: torch.dtype, device: str) -> tuple[nn.Module, nn.Module]:
    """The PEFT-wrapped one-linear model and its base layer."""
    weight = torch.randn(n, k) * 0.02
    if kind == "packed":
        proj = RTN(bits=4, group_size=128).compress(weight).to_module(None, dtype)
    elif kind == "nf4":
        proj = make_compressor("nf4").compress(weight).to_module(None, dtype)
    else:
        proj = nn.Linear(k, n, bias=False, dtype=dtype)
        proj.weight.data.copy_(weight.to(dtype))
        proj.requires_grad_(False)
    model = build_lora_model(_One(proj).to(device), None, lora_config(rank, rank, 0.0, ["proj"], task_type=None))
    return model.to(device), model.get_submodule("base_model.model.proj").base_layer


def _time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and Triton compile)
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def measure(kind: str, k: int, n: int, tokens: int, rank: int, device: str, repeats: int) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, base = _build(kind, k, n, rank, dtype, device)
    x = torch.randn(tokens, k, dtype=dtype, device=device, requires_grad=True)

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        model(x).float().square().mean().backward()

    row = {"kind": kind, "shape": f"{k}x{n}", "tokens": tokens, "rank": rank, "device": device, "dtype": str(dtype)}
    row["fwd_ms"] = _time(forward, device, repeats)
    row["fwd_bwd_ms"] = _time(forward_backward, device, repeats)
    if hasattr(base, "dequantize"):  # the whole weight back to dense: what the large-M path pays per call
        row["dequant_ms"] = _time(lambda: base.dequantize(dtype), device, repeats)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", default=None, help="KxN (in x out); default: Llama-3-8B on GPU")
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--ranks", nargs="+", type=int, default=None)
    parser.add_argument("--kinds", nargs="+", default=["packed", "dense", "nf4"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    shapes = args.shapes or (LLAMA3_8B if gpu else ["256x768", "768x256", "4096x4096"])
    tokens = args.tokens or (GPU_TOKENS if gpu else [1, 16, 512, 2048])
    ranks = args.ranks or ([16, 64] if gpu else [16])
    rows = []
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        for m in tokens:
            for rank in ranks:
                for kind in args.kinds:
                    row = measure(kind, k, n, m, rank, args.device, args.repeats)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\n| shape (KxN) | M | r | " + " | ".join(f"{k} fwd | {k} fwd+bwd" for k in args.kinds) + " |")
    print("|---|---|---|" + "---|---|" * len(args.kinds))
    for shape in shapes:
        for m in tokens:
            for rank in ranks:
                cells = []
                for kind in args.kinds:
                    r = next(r for r in rows if r["kind"] == kind and r["shape"] == shape and r["tokens"] == m and r["rank"] == rank)
                    cells += [f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}"]
                print(f"| {shape} | {m} | {rank} | " + " | ".join(cells) + " |")
    if "dense" in args.kinds:
        print("\nfwd+bwd time relative to the dense layer's with the same LoRA (same run):\n")
        others = [kind for kind in args.kinds if kind != "dense"]
        print("| shape (KxN) | M | r | " + " | ".join(others) + " |\n|---|---|---|" + "---|" * len(others))
        for shape in shapes:
            for m in tokens:
                for rank in ranks:
                    at = {r["kind"]: r for r in rows if r["shape"] == shape and r["tokens"] == m and r["rank"] == rank}
                    ratios = [f"{at[kind]['fwd_bwd_ms'] / at['dense']['fwd_bwd_ms']:.2f}x" for kind in others]
                    print(f"| {shape} | {m} | {rank} | " + " | ".join(ratios) + " |")
    dequantizing = [kind for kind in args.kinds if any("dequant_ms" in r for r in rows if r["kind"] == kind)]
    if dequantizing:
        print("\nDequantize the whole weight (ms, median; same run):\n")
        print("| shape (KxN) | " + " | ".join(dequantizing) + " |\n|---|" + "---|" * len(dequantizing))
        for shape in shapes:
            cells = [f"{statistics.median(r['dequant_ms'] for r in rows if r['kind'] == kind and r['shape'] == shape):.1f}"
                     for kind in dequantizing]
            print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
