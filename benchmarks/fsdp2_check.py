"""FSDP2 over a packed base on N processes: each rank's share of the packed bytes, peak memory, and the losses
of the sharded training against one process training the same global batches unsharded.

    torchrun --nproc-per-node 8 benchmarks/fsdp2_check.py --out fsdp2.json           # on a multi-GPU machine
    torchrun --nproc-per-node 2 benchmarks/fsdp2_check.py --dry-run                 # CPU, gloo, tiny shapes

The model: ``--layers`` Llama-3-8B-shaped decoder layers (``--shape 70b``: 70B-shaped; ``--dry-run``: the nano
model's shapes) with random weights, every decoder linear RTN 4-bit g128 packed, rank-16 LoRA adapters
(QLoRA init, seeded: the same on every rank). Rank 0 first trains a copy unsharded on each whole global batch
(the reference); then every rank shards the model as ``accelerate_configs/fsdp2.yaml`` does (packed tensors
as frozen parameters, :func:`eora_ft.train.sharding.packed_as_parameters`; one ``fully_shard`` unit per
decoder layer, then the root; bf16 mixed precision on a GPU) and trains on its slice of the same batches.
Reports, per rank: packed bytes held after sharding, peak accelerator memory of each phase, the losses (the
mean over ranks of each step), and their largest relative difference from the reference. Used by
``gpu_check.py`` when the machine has more than one GPU; ``tests/test_benchmarks.py`` runs the dry run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_peft_model(shape: str, layers: int, vocab: int, dtype: torch.dtype, rank: int):
    """The packed, adapted model on the CPU (identical on every rank: seeded)."""
    from scale_bench import build_model

    from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
    from eora_ft.compress import make_compressor
    from eora_ft.init.sequential import compress_model

    model = build_model(shape, layers, vocab).to(dtype)
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    compress_model(model, ids, make_compressor("rtn", bits=4, group_size=128), [], target_modules=LINEARS,
                   batch_size=1, progress=False)
    torch.manual_seed(0)  # PEFT's Kaiming init of A
    return build_lora_model(model, None, lora_config(rank, rank, 0.0, LINEARS))


def batches(steps: int, global_batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (global_batch, seq), generator=generator) for _ in range(steps)]


def train(model, data: list[torch.Tensor], device: torch.device, lr: float, autocast: bool) -> list[float]:
    """AdamW on the trainable parameters; the loss of each step (mean over tokens of ``data[i]``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for ids in data:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (gloo)")
    parser.add_argument("--shape", default="8b", choices=["8b", "70b"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default=None, help="JSON file for every number (written by rank 0)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from eora_ft.train.sharding import packed_as_parameters, packed_bytes_here

    shape, vocab, seq = ("tiny", 512, 32) if args.dry_run else (args.shape, 32000, args.seq_len)
    dtype = torch.bfloat16 if cuda else torch.float32
    per_rank = 2
    data = batches(args.steps, per_rank * world, seq, vocab)
    model = build_peft_model(shape, args.layers, vocab, dtype, rank=16)
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)", "world_size": world,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": shape, "layers": args.layers,
              "tokens_per_rank_step": per_rank * seq}

    reference = None
    if rank == 0:  # the same global batches in one process, unsharded (while the other ranks wait)
        start = time.perf_counter()
        unsharded = copy.deepcopy(model).to(device)
        peak_gib(device)
        reference = train(unsharded, data, device, 1e-3, autocast=cuda)
        report["unsharded"] = {"losses": reference, "seconds": round(time.perf_counter() - start, 2),
                               "peak_gib": peak_gib(device),
                               "packed_bytes": packed_bytes_here(unsharded)}
        del unsharded
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()

    start = time.perf_counter()
    total_packed = packed_as_parameters(model)
    # what a bf16 recipe run gets: Accelerate's policy with eora_ft's fp32 reduction (sharding.reduce_in_fp32)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else \
        MixedPrecisionPolicy()
    for name, param in model.named_parameters():  # fp32 master weights for the adapters, as Accelerate keeps them
        if param.requires_grad:
            param.data = param.data.float()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    here = packed_bytes_here(model)
    shard_peak = peak_gib(device)
    local = [ids[rank * per_rank:(rank + 1) * per_rank] for ids in data]
    losses = train(model, local, device, 1e-3, autocast=False)  # FSDP2's policy casts; no autocast on top
    mean = torch.tensor(losses, dtype=torch.float64, device=device)
    dist.all_reduce(mean)
    mean = (mean / world).tolist()
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "packed_bytes_here": here, "packed_bytes_total": total_packed,
                                  "peak_gib_after_sharding": shard_peak, "peak_gib_training": peak_gib(device),
                                  "losses": losses})
    if rank == 0:
        report["sharded"] = {"ranks": rows, "losses": mean, "seconds": round(time.perf_counter() - start, 2)}
        report["max_relative_loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(mean, reference))
        report["packed_share_per_rank"] = [round(row["packed_bytes_here"] / row["packed_bytes_total"], 4)
                                           for row in rows]
        print(json.dumps(report, indent=1))
        print(f"\n| rank | packed MB held (of {total_packed / 1e6:.1f}) | peak GiB after sharding | peak GiB training |"
              "\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['rank']} | {row['packed_bytes_here'] / 1e6:.1f} | {row['peak_gib_after_sharding']} | "
                  f"{row['peak_gib_training']} |")
        print(f"\nunsharded (one process): peak {report['unsharded']['peak_gib']} GiB; losses "
              f"{[round(x, 4) for x in reference]} vs sharded {[round(x, 4) for x in mean]} "
              f"(max relative difference {report['max_relative_loss_difference']:.2e})")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
