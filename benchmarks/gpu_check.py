"""Everything the CPU sessions cannot measure, in one command for a machine with one NVIDIA GPU (< 10 minutes).

    python benchmarks/gpu_check.py --out gpu_check.json      # on the GPU machine, after `pip install --no-deps -e .`
    python benchmarks/gpu_check.py --dry-run                  # anywhere: tiny sizes on the CPU (a CI test runs it)

1. ``tests``: the ``gpu``-marked tests (compiled Triton kernels, bf16, layer-wise compression on the GPU);
2. ``kernels``: one adapted linear at Llama-3-8B shapes, M = 1, 16, 4096, 16384 tokens, r = 16 and 64:
   ours (int4 g128 packed + LoRA through PackedLoraMatmul) against bf16 ``nn.Linear`` + PEFT LoRA and
   bitsandbytes NF4 + PEFT LoRA (when bitsandbytes is installed), with the kernel issue's targets
   (M >= 4096: fwd+bwd within 1.10x of bf16 and 1.2x faster than NF4; M <= 16: int4 fwd 2.5x faster than bf16);
3. ``crossover``: the fused small-M forward against dequantize + matmul at M = 1 .. 64 per shape, and the
   value for ``kernels/configs.py:SMALL_M_MAX_TOKENS`` on this GPU;
4. ``fixes``: the kernel fixes of issue #34 (``benchmarks/kernel_checks.py``): launches inside the data's
   device guard (and on ``cuda:1`` with ``cuda:0`` current, given two GPUs), the pure-torch fallback
   where Triton cannot run against Triton's results, the 2:4 rebuild old vs new, fused forward/backward
   at ranks 16, 128, 512 against the unfused path, the autotuned dequantization against 64 x 64 tiles;
5. ``model``: two Llama-3-8B-shaped decoder layers (random bf16 weights, the model on the CPU): GPTQ 4-bit
   g128 + EoRA r16 layer by layer on the GPU, 20 bf16 training steps of the adapters, evaluation loss;
   time and peak GPU memory per stage;
6. ``fsdp2``: on a machine with more than one GPU, ``benchmarks/fsdp2_check.py`` on every GPU (up to 8):
   each rank's share of the packed base under FSDP2, peak memory, and the sharded losses against one
   unsharded process (the dry run: 2 CPU ranks over gloo).

Needs only the repository and its install (no trl, datasets or deepspeed; bitsandbytes optional). Prints
one markdown table per part and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    # no GPU: Triton's kernels run in its interpreter, which is chosen when triton is first imported (any
    # import below may pull it in), else its first launch fails with "0 active drivers"
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
GPU_TEST_FILES = ["tests/kernels/test_dequant_triton.py", "tests/kernels/test_fused_triton.py",
                  "tests/kernels/test_lora_matmul.py", "tests/init/test_sequential.py",
                  "tests/kernels/test_launch.py", "tests/kernels/test_sparse24.py",
                  # issue #34 item 4 (refinement: checkpointing + bf16 autocast on CUDA) and item 9 (the in-place
                  # Hessian chain's CUDA peak and its agreement with the CPU)
                  "tests/init/test_refine_memory.py", "tests/compress/test_obs_memory.py"]
LLAMA3_8B_SHAPES = ["4096x4096", "4096x1024", "4096x14336", "14336x4096", "4096x6144", "4096x28672"]
TARGETS = {"large_m_vs_bf16": 1.10, "large_m_vs_nf4": 1.2, "small_m_vs_bf16": 2.5}
FSDP2_TIMEOUT_S = 600


def run_gpu_tests(dry_run: bool) -> dict:
    """``pytest -m gpu`` over the files holding gpu tests (collected alone: no trl or datasets needed)."""
    if dry_run:
        return {"skipped": "dry run (no GPU)"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {"returncode": proc.returncode, "summary": summary[-1] if summary else proc.stdout[-500:],
            "seconds": round(time.perf_counter() - start, 1), "failures": proc.stdout[-4000:] if proc.returncode else ""}


def run_kernels(dry_run: bool, device: str, repeats: int) -> list[dict]:
    from kernel_bench import measure

    shapes = ["256x768", "768x256"] if dry_run else LLAMA3_8B_SHAPES
    tokens = [1, 16, 64] if dry_run else [1, 16, 4096, 16384]
    ranks = [16] if dry_run else [16, 64]
    rows = []
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        for m in tokens:
            for rank in ranks:
                for kind in ("packed", "dense", "nf4"):
                    try:
                        row = measure(kind, k, n, m, rank, device, repeats)
                    except ImportError as err:  # bitsandbytes is optional on the GPU machine
                        row = {"kind": kind, "shape": shape, "tokens": m, "rank": rank, "error": str(err)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def kernel_table(rows: list[dict], judge: bool = True) -> str:
    """One line per shape x M x r: times in ms, the ratios the targets are stated in, and (``judge``, on a
    GPU) whether the target of that M is met."""
    def get(kind, shape, m, rank, key):
        row = next((r for r in rows if r["kind"] == kind and r["shape"] == shape and r["tokens"] == m
                    and r["rank"] == rank), {})
        return row.get(key)

    lines = ["| shape | M | r | packed fwd | packed fwd+bwd | bf16 fwd | bf16 fwd+bwd | nf4 fwd+bwd | "
             "fwd+bwd packed/bf16 | fwd+bwd nf4/packed | fwd bf16/packed | target met |", "|" + "---|" * 12]
    for shape, m, rank in sorted({(r["shape"], r["tokens"], r["rank"]) for r in rows}):
        p_fwd, p_both = get("packed", shape, m, rank, "fwd_ms"), get("packed", shape, m, rank, "fwd_bwd_ms")
        d_fwd, d_both = get("dense", shape, m, rank, "fwd_ms"), get("dense", shape, m, rank, "fwd_bwd_ms")
        q_both = get("nf4", shape, m, rank, "fwd_bwd_ms")
        vs_bf16 = p_both / d_both if p_both and d_both else None
        vs_nf4 = q_both / p_both if q_both and p_both else None
        fwd_gain = d_fwd / p_fwd if p_fwd and d_fwd else None
        if not judge:
            met = None
        elif m >= 4096:
            met = (vs_bf16 is not None and vs_bf16 <= TARGETS["large_m_vs_bf16"]) and (
                vs_nf4 is None or vs_nf4 >= TARGETS["large_m_vs_nf4"])
        elif m <= 16:
            met = fwd_gain is not None and fwd_gain >= TARGETS["small_m_vs_bf16"]
        else:
            met = None
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {shape} | {m} | {rank} | {fmt(p_fwd)} | {fmt(p_both)} | {fmt(d_fwd)} | {fmt(d_both)} | "
                     f"{fmt(q_both)} | {fmt(vs_bf16)} | {fmt(vs_nf4)} | {fmt(fwd_gain)} | "
                     f"{'-' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines)


def run_crossover(dry_run: bool, device: str, repeats: int) -> dict:
    """Fused small-M forward vs dequantize + matmul; the largest M at which fused still wins, per shape."""
    from kernel_bench import _time

    from eora_ft.compress import RTN
    from eora_ft.kernels.lora_matmul import Packed, packed_lora_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = ["256x768"] if dry_run else ["4096x4096", "4096x1024", "4096x14336", "14336x4096"]
    result = {}
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        layer = RTN(bits=4, group_size=128).compress(torch.randn(n, k) * 0.02).to_module(None, dtype).to(device)
        packed = Packed(layer.qweight, layer.scales, layer.zeros, 4, 128, k)
        a = torch.randn(16, k, device=device, dtype=dtype) * 0.02
        b = torch.randn(n, 16, device=device, dtype=dtype) * 0.02
        times = {}
        for m in ([1, 4, 16] if dry_run else [1, 2, 4, 8, 16, 32, 64]):
            x = torch.randn(m, k, device=device, dtype=dtype)
            timed = {}
            for fused in (True, False):
                def step(fused=fused):
                    with torch.no_grad():
                        packed_lora_linear(x, layer.transient_weight, a, b, 1.0, None, packed if fused else None,
                                           force_fused=fused)
                timed["fused" if fused else "dequant_matmul"] = _time(step, device, repeats)
            times[m] = timed
        wins = [m for m, t in times.items() if t["fused"] < t["dequant_matmul"]]
        result[shape] = {"ms": times, "fused_wins_up_to": max(wins) if wins else 0}
        print(json.dumps({"crossover": shape, **result[shape]}), flush=True)
    return result


def run_fsdp2(dry_run: bool) -> dict:
    """``benchmarks/fsdp2_check.py`` under torchrun on every GPU (at most 8); skipped with one GPU."""
    gpus = 0 if dry_run else torch.cuda.device_count()
    if not dry_run and gpus < 2:
        return {"skipped": f"{gpus} GPU: FSDP2 shards over more than one"}
    nproc = 2 if dry_run else min(gpus, 8)
    env = dict(os.environ, OMP_NUM_THREADS="1") if dry_run else dict(os.environ)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp2_check.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "benchmarks/fsdp2_check.py", "--out", str(out)] + (["--dry-run"] if dry_run else [])
        try:  # a hang in a collective must not take the whole check with it
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=FSDP2_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            return {"returncode": 124, "failures": f"timed out after {FSDP2_TIMEOUT_S} s: {str(err.stderr)[-3000:]}"}
        if proc.returncode or not out.exists():
            return {"returncode": proc.returncode or 1, "failures": proc.stderr[-4000:]}
        report = json.loads(out.read_text())
    return report | {"returncode": 0, "seconds_total": round(time.perf_counter() - start, 1)}


def run_model(dry_run: bool, device: str, steps: int) -> dict:
    """Two decoder layers: compress + EoRA on the device (model on the CPU), train, evaluate."""
    from scale_bench import build_model

    from eora_ft.compress import make_compressor
    from eora_ft.init.sequential import compress_model
    from eora_ft.adapters.peft_bridge import build_lora_model, lora_config

    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    vocab, seq = (512, 64) if dry_run else (32000, 512)
    stages = {}

    def stage(name, start):
        stages[name] = {"seconds": round(time.perf_counter() - start, 2)}
        if cuda:
            torch.cuda.synchronize()
            stages[name]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps({"model_stage": name, **stages[name]}), flush=True)

    start = time.perf_counter()
    model = build_model("tiny" if dry_run else "8b", 2, vocab).to(dtype)
    calib = torch.randint(0, vocab, (4 if dry_run else 16, seq), generator=torch.Generator().manual_seed(0))
    stage("build (CPU)", start)
    start = time.perf_counter()
    result = compress_model(model, calib, make_compressor("gptq", bits=4, group_size=128), ["eora"], rank=16,
                            target_modules=linears, batch_size=4, execution_device=device, progress=False)
    stage("compress + EoRA (layer-wise)", start)
    stages["compress + EoRA (layer-wise)"]["per_stage_seconds"] = {k: round(v, 1) for k, v in result.stage_seconds.items()}
    start = time.perf_counter()
    factors = {path: per_init["eora"] for path, per_init in result.factors.items()}
    peft_model = build_lora_model(model, factors, lora_config(16, 16, 0.0, linears)).to(device)
    stage("PEFT wrap + to device", start)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    peft_model.train()
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, seq), generator=generator).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(float(loss.detach()), 4))
    stage(f"{steps} training steps (4 x {seq} tokens)", start)
    stages[f"{steps} training steps (4 x {seq} tokens)"].update(
        losses=losses, tokens_per_second=round(steps * 4 * seq / stages[f"{steps} training steps (4 x {seq} tokens)"]["seconds"]))
    peft_model.eval()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        ids = torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(2)).to(device)
        eval_loss = float(peft_model(input_ids=ids, labels=ids).loss)
    stage("evaluation (4 sequences)", start)
    stages["evaluation (4 sequences)"]["loss"] = round(eval_loss, 4)
    return stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    parser.add_argument("--parts", nargs="+", default=["tests", "kernels", "crossover", "fixes", "model", "fsdp2"],
                        choices=["tests", "kernels", "crossover", "fixes", "model", "fsdp2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON file for every number")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    device = "cpu" if args.dry_run else "cuda"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = "not installed"
    steps = min(args.steps, 2) if args.dry_run else args.steps
    begin = time.perf_counter()
    if "tests" in args.parts:
        report["tests"] = run_gpu_tests(args.dry_run)
        print(json.dumps({"tests": report["tests"]}), flush=True)
    if "kernels" in args.parts:
        report["kernels"] = run_kernels(args.dry_run, device, 2 if args.dry_run else args.repeats)
    if "crossover" in args.parts:
        report["crossover"] = run_crossover(args.dry_run, device, 2 if args.dry_run else args.repeats)
    if "fixes" in args.parts:
        from kernel_checks import run_checks

        report["fixes"] = run_checks(args.dry_run, device, 2 if args.dry_run else args.repeats)
        print(json.dumps({"fixes": report["fixes"]}, default=str), flush=True)
    if "model" in args.parts:
        report["model"] = run_model(args.dry_run, device, steps)
    if "fsdp2" in args.parts:
        report["fsdp2"] = run_fsdp2(args.dry_run)
        print(json.dumps({"fsdp2": {k: v for k, v in report["fsdp2"].items() if k != "sharded"}}), flush=True)
    report["seconds"] = round(time.perf_counter() - begin, 1)

    print(f"\n## gpu_check: {report['device']}, torch {report['torch']}, triton {report['triton']}, {report['date']}")
    if "tests" in report:
        print(f"\ngpu tests: {report['tests']}")
    if "kernels" in report:
        print("\n" + kernel_table(report["kernels"], judge=device == "cuda"))
    if "crossover" in report:
        print("\n| shape | fused faster up to M | " + " | ".join(f"M={m} fused/dequant ms" for m in
                                                          next(iter(report["crossover"].values()))["ms"]) + " |")
        print("|---|---|" + "---|" * len(next(iter(report["crossover"].values()))["ms"]))
        for shape, row in report["crossover"].items():
            cells = [f"{t['fused']:.3f}/{t['dequant_matmul']:.3f}" for t in row["ms"].values()]
            print(f"| {shape} | {row['fused_wins_up_to']} | " + " | ".join(cells) + " |")
        if device == "cuda":
            crossover = min(row["fused_wins_up_to"] for row in report["crossover"].values())
            print(f"\nset SMALL_M_MAX_TOKENS[{torch.cuda.get_device_capability()}] = {crossover} in kernels/configs.py")
    if "fixes" in report:
        from kernel_checks import checks_table

        print("\n" + checks_table(report["fixes"]))
    if "model" in report:
        print("\n| stage | seconds | peak GPU GiB | notes |\n|---|---|---|---|")
        for name, row in report["model"].items():
            notes = {k: v for k, v in row.items() if k not in ("seconds", "peak_gpu_gib")}
            print(f"| {name} | {row['seconds']} | {row.get('peak_gpu_gib', '-')} | {json.dumps(notes) if notes else ''} |")
    if "fsdp2" in report:
        fsdp2 = report["fsdp2"]
        if "packed_share_per_rank" in fsdp2:
            print(f"\nFSDP2 x{fsdp2['world_size']}: packed base share per rank {fsdp2['packed_share_per_rank']}, peak GiB "
                  f"per rank {[r['peak_gib_training'] for r in fsdp2['sharded']['ranks']]} (unsharded "
                  f"{fsdp2['unsharded']['peak_gib']}), losses vs one process: max relative difference "
                  f"{fsdp2['max_relative_loss_difference']:.2e}")
        else:
            print(f"\nFSDP2: {fsdp2}")
    print(f"\ntotal {report['seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    failed_tests = report.get("tests", {}).get("returncode") not in (None, 0) \
        or report.get("fsdp2", {}).get("returncode") not in (None, 0)
    if "fixes" in report:
        from kernel_checks import all_ok

        failed_tests = failed_tests or not all_ok(report["fixes"])
    return 1 if failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
