"""Real shapes without the real model: Llama-3-8B-shaped decoder layers through compression, EoRA, the PEFT
wrap and one training step, with per-layer time of each stage and peak memory.

    OMP_NUM_THREADS=2 python benchmarks/scale_bench.py --layers 1 --tokens 1024 --compress gptq --bits 4
    OMP_NUM_THREADS=2 python benchmarks/scale_bench.py --layers 1 --tokens 1024 --compress sparsegpt
    python benchmarks/scale_bench.py --device cuda --layers 2 --tokens 4096    # on a GPU: accelerator peaks too
    OMP_NUM_THREADS=2 python benchmarks/scale_bench.py --shape 30b-a3b --layers 1 --tokens 4096   # one MoE layer

The model is a ``LlamaForCausalLM`` with Llama-3-8B's decoder shapes (hidden 4096, 32 query and 8 key/value
heads, intermediate 14336; ``--shape 70b``: hidden 8192, 64/8 heads, intermediate 28672) and a cut-down
vocabulary, random weights (std 0.02), built in fp32 on the CPU. It stays there: ``compress_model`` moves one
decoder layer at a time to ``--device``. Peak host memory is the process's resident set, sampled every 20 ms;
the budget it is compared with is the model's fp32 weights + its calibration activations (fp32, inputs and
outputs of a layer) + one layer's fp64 input statistics. Prints one JSON object per stage and a markdown
summary with the projection to a 32-layer (8B) or 80-layer (70B) run.

``--shape 30b-a3b`` / ``8x7b``: a mixture-of-experts decoder with Qwen3-30B-A3B's shapes (hidden 2048, 32/4 heads of
128, 128 experts of intermediate 768, 8 per token, 48 layers) or Mixtral-8x7B's (hidden 4096, 32/8 heads, 8 experts
of 14336, 2 per token, 32 layers), its experts unfused into per-expert linears; the summary adds the tokens routed
to each expert (min / median / max) and the experts calibrated on every token. ``--plan`` adds their memory plan.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from typing import Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from eora_ft.compress import make_compressor
from eora_ft.compress.experts import expert_projection_names, unfuse_experts
from eora_ft.init.accounting import SequentialResult
from eora_ft.init.sequential import compress_model
from eora_ft.init import INITIALIZERS
from eora_ft.adapters.peft_bridge import build_lora_model, lora_config

SHAPES = {  # hidden, heads, kv heads, intermediate, layers of the real model
    "8b": (4096, 32, 8, 14336, 32),
    "70b": (8192, 64, 8, 28672, 80),
    "tiny": (256, 4, 2, 768, 4),  # the nano model's shapes: the smoke test that keeps this script working
}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# hidden, heads, kv heads, head dim, expert intermediate, experts, experts per token, layers, vocabulary
MOE_SHAPES = {
    "30b-a3b": (2048, 32, 4, 128, 768, 128, 8, 48, 151936),  # Qwen3-30B-A3B
    "8x7b": (4096, 32, 8, 128, 14336, 8, 2, 32, 32000),  # Mixtral-8x7B
    "tiny-moe": (256, 4, 2, 64, 256, 8, 2, 4, 8192),  # the smoke test's
}


class PeakRSS:
    """Resident set size of this process sampled in a thread; ``reset()`` starts a new window."""

    def __init__(self, period: float = 0.02) -> None:
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.period)

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak

    @contextlib.contextmanager
    def window(self, totals: dict[str, int], key: str) -> Iterator[None]:
        """Record into ``totals[key]`` the peak while the body runs (the overall peak is kept too)."""
        overall = self.peak
        self.peak = self.now()
        try:
            yield
        finally:
            self.peak = max(self.peak, self.now())
            totals[key] = max(totals.get(key, 0), self.peak)
            self.peak = max(overall, self.peak)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def instrument(sampler: PeakRSS, peaks: dict[str, int]) -> None:
    """Per-stage peak host memory of the driver's stages and of each initializer."""
    timed = SequentialResult.timed

    @contextlib.contextmanager
    def timed_with_peak(self, stage: str) -> Iterator[None]:
        with timed(self, stage), sampler.window(peaks, stage):
            yield

    SequentialResult.timed = timed_with_peak
    for name, init in list(INITIALIZERS.items()):
        def wrapped(*args, _init=init, _name=name, **kwargs):
            with sampler.window(peaks, f"init:{_name}"):
                return _init(*args, **kwargs)
        INITIALIZERS[name] = wrapped


def build_moe_model(shape: str, layers: int, vocab: int):
    """A Mixtral (``8x7b``) or Qwen3-MoE model with ``shape``'s decoder, random weights, experts unfused."""
    hidden, heads, kv_heads, head_dim, intermediate, experts, top_k, _, _ = MOE_SHAPES[shape]
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, num_experts_per_tok=top_k,
                  max_position_embeddings=8192, tie_word_embeddings=False, initializer_range=0.02)
    if shape == "8x7b":
        config, cls = MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts), MixtralForCausalLM
    else:
        config = Qwen3MoeConfig(**common, moe_intermediate_size=intermediate, intermediate_size=intermediate,
                                num_experts=experts, decoder_sparse_step=1, mlp_only_layers=[])
        cls = Qwen3MoeForCausalLM
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = cls(config).eval()
    unfuse_experts(model)
    return model


def target_names(model) -> list[str]:
    """The attention projections and the model's MLP (or expert) linears."""
    return [*LINEARS[:4], *expert_projection_names(model.config.model_type)]


def statistics_bytes(layer) -> int:
    """fp64 ``X^T X`` of every distinct linear input of one decoder layer: q/k/v share one, gate/up (w1/w3) one."""
    shared = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})
    seen, total = set(), 0
    for name, module in layer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        key = (parent, next((tuple(sorted(group)) for group in shared if leaf in group), leaf))
        if key not in seen:
            seen.add(key)
            total += module.in_features ** 2 * 8
    return total


def build_model(shape: str, layers: int, vocab: int) -> LlamaForCausalLM:
    if shape in MOE_SHAPES:
        return build_moe_model(shape, layers, vocab)
    hidden, heads, kv_heads, intermediate, _ = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device("cpu"):
        return LlamaForCausalLM(config).eval()


def budget_bytes(model: LlamaForCausalLM, tokens: int) -> dict[str, int]:
    """The issue's yardstick: fp32 weights + calibration activations + one layer's fp64 statistics."""
    config = model.config
    weights = sum(p.numel() for p in model.parameters()) * 4
    activations = 2 * tokens * config.hidden_size * 4  # a layer's inputs and outputs, fp32
    statistics = statistics_bytes(model.model.layers[0])
    return {"weights": weights, "activations": activations, "statistics": statistics,
            "total": weights + activations + statistics}


VOCAB = {"8b": 128256, "70b": 128256, "tiny": 8192}


def memory_plan(shape: str, tokens: int, batch_tokens: int, dtype_bytes: int = 2) -> dict[str, float]:
    """GB needed to compress + initialise one model of ``shape`` layer by layer, from its component sizes
    (the same components this script measures on the CPU at ``--layers 1``).

    Accelerator: one decoder layer in the model dtype, every calibration activation of a layer (inputs
    and outputs, model dtype), and the larger of (a) the widest input's compressor working set: its fp64
    ``X^T X`` plus the one ``K x K`` fp64 matrix the Hessian chain works in (in place) plus fp32 and fp64
    copies of the weight, and (b) one calibration batch through the layer (MLP intermediates, three of them).
    Host: the whole model in its dtype (it stays there), plus the activations when kept on the host."""
    hidden, heads, kv_heads, intermediate, layers = SHAPES[shape]
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    layer_params = attention + 3 * hidden * intermediate
    model_params = layers * layer_params + 2 * VOCAB[shape] * hidden
    widest = intermediate  # down_proj's input
    compressor = 2 * widest**2 * 8 + hidden * widest * (4 + 8)  # X^T X + the in-place Hessian chain (obs.py)
    forward = 3 * batch_tokens * intermediate * dtype_bytes
    activations = 2 * tokens * hidden * dtype_bytes
    layer = layer_params * dtype_bytes
    gb = 1e9
    return {"layer": layer / gb, "activations": activations / gb, "working_set": max(compressor, forward) / gb,
            "accelerator": (layer + activations + max(compressor, forward)) / gb,
            "accelerator_activations_on_host": (layer + 2 * batch_tokens * hidden * dtype_bytes
                                                + max(compressor, forward)) / gb,
            "host": model_params * dtype_bytes / gb, "host_activations_on_host": (model_params * dtype_bytes
                                                                                  + activations) / gb}


def print_plan(tokens: int, batch_tokens: int) -> None:
    print("| model | accelerator GB (activations there) | accelerator GB (calib_activations_device: cpu) | "
          "host GB | of which one layer / activations / working set |\n|---|---|---|---|---|")
    for shape in ("8b", "70b"):
        plan = memory_plan(shape, tokens, batch_tokens)
        print(f"| {shape} bf16, {tokens} calibration tokens | {plan['accelerator']:.1f} | "
              f"{plan['accelerator_activations_on_host']:.1f} | {plan['host']:.0f} (+{plan['activations']:.1f}) | "
              f"{plan['layer']:.2f} / {plan['activations']:.2f} / {plan['working_set']:.2f} |")
    print_host_plan(tokens)
    print_training_plan()
    print_refine_plan(tokens, batch_tokens)
    print_moe_plan(tokens, batch_tokens)


def moe_plan(shape: str, tokens: int, batch_tokens: int, dtype_bytes: int = 2, rank: int = 16,
             bits: int = 4, group_size: int = 128) -> dict[str, float]:
    """GB to compress + initialise a mixture-of-experts model of ``shape`` layer by layer, and its adapter.

    Accelerator: one decoder layer in the model dtype, the calibration activations (inputs and outputs), every
    distinct input's fp64 ``X^T X`` of the layer at once (the one statistics pass holds each expert's gate/up and
    down statistics: experts x (H^2 + I^2)), plus the largest linear's compressor working set. Host: the model in
    its dtype. Packed: GPTQ ``bits`` with a scale and a zero point per ``group_size`` weights. LoRA: rank ``rank``
    on every attention and expert linear; training state fp32 weights + gradients + Adam's two moments."""
    hidden, heads, kv_heads, head_dim, intermediate, experts, _, layers, vocab = MOE_SHAPES[shape]
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = 2 * hidden * q + 2 * hidden * kv
    expert_params = experts * 3 * hidden * intermediate
    layer_params = attention + expert_params + experts * hidden
    model_params = layers * layer_params + 2 * vocab * hidden
    statistics = (hidden**2 + q**2 + experts * (hidden**2 + intermediate**2)) * 8
    widest = max(hidden, intermediate, q)
    working = 2 * widest**2 * 8 + max(hidden, intermediate) * widest * (4 + 8)
    activations = 2 * tokens * hidden * dtype_bytes
    layer = layer_params * dtype_bytes
    lora = layers * rank * (2 * (hidden + q) + 2 * (hidden + kv) + experts * 3 * (hidden + intermediate))
    packed = layers * (attention + expert_params) * (bits + 2 * 16 / group_size) / 8
    gb = 1e9
    return {"params_b": model_params / 1e9, "layer": layer / gb, "statistics": statistics / gb,
            "activations": activations / gb, "accelerator": (layer + statistics + activations + working) / gb,
            "host": model_params * dtype_bytes / gb, "packed": packed / gb, "lora_params_m": lora / 1e6,
            "lora_training": lora * 16 / gb}


def print_moe_plan(tokens: int, batch_tokens: int) -> None:
    print(f"\n| MoE model, bf16, {tokens} calibration tokens | params B | accelerator GB (compress + init) | of which one "
          "layer / all experts' statistics / activations | host GB | packed 4-bit g128 GB | LoRA r16 on every expert: "
          "params M / fp32 + Adam GB |\n|---|---|---|---|---|---|---|")
    for shape in ("30b-a3b", "8x7b"):
        plan = moe_plan(shape, tokens, batch_tokens)
        print(f"| {shape} | {plan['params_b']:.1f} | {plan['accelerator']:.1f} | {plan['layer']:.2f} / "
              f"{plan['statistics']:.2f} / {plan['activations']:.2f} | {plan['host']:.0f} | {plan['packed']:.1f} | "
              f"{plan['lora_params_m']:.0f} / {plan['lora_training']:.1f} |")


def host_plan(shape: str, tokens: int, bits: int = 4, group_size: int = 128, rank: int = 16) -> dict[str, float]:
    """GB of host memory at the main process's peak of a cold-cache recipe run (compress, then initialise), before
    and after issue #34: the dense bf16 model, its packed copy, one packed layer, the initial adapter's fp32
    factors and the calibration activations when kept on the host (``calib_activations_device: cpu``).
    Before: the dense model was reloaded while the packed one was still referenced, and the initial adapter
    was factored with the whole packed base loaded beside the dense model. Now the packed copy is released
    before the reload and read one layer at a time (:class:`eora_ft.compress.packed_reader.PackedLinears`).
    safetensors >= 0.8 writes from the tensors' own memory (``_flatten_as_ptr``): saving adds nothing."""
    from eora_ft.train.memory_plan import llama_sizes

    hidden, heads, kv_heads, intermediate, layers = SHAPES[shape]
    sizes = llama_sizes(hidden, kv_heads * hidden // heads, intermediate, layers, VOCAB[shape], bits, group_size, rank)
    dense = memory_plan(shape, tokens, tokens)["host"]
    packed, factors = sizes.base_bytes / 1e9, 4 * sizes.trainable / 1e9
    packed_layer = (packed - 2 * VOCAB[shape] * hidden * 2 / 1e9) / layers
    activations = 2 * tokens * hidden * 2 / 1e9
    return {"dense": dense, "packed": packed, "before": dense + packed + factors,
            "after": dense + packed_layer + factors, "after_activations_on_host": dense + packed_layer + factors
            + activations, "target": 1.1 * dense}


def print_host_plan(tokens: int) -> None:
    print("\n| model (GPTQ 4-bit g128, EoRA r16) | dense bf16 GB | packed GB | host peak before GB | host peak now GB | "
          "now, activations on host GB | target (1.1 x dense) GB |\n|---|---|---|---|---|---|---|")
    for shape in ("8b", "70b"):
        plan = host_plan(shape, tokens)
        print(f"| {shape} | {plan['dense']:.0f} | {plan['packed']:.1f} | {plan['before']:.0f} | {plan['after']:.0f} | "
              f"{plan['after_activations_on_host']:.0f} | {plan['target']:.0f} |")


def print_training_plan(tokens_per_gpu: int = 4 * 1024) -> None:
    """Per-GPU memory of fine-tuning by process layout (:mod:`eora_ft.train.memory_plan`), GPTQ 4-bit g128, LoRA on
    every decoder linear, gradient checkpointing, ``tokens_per_gpu`` tokens per micro-batch."""
    from eora_ft.train.memory_plan import LAYOUTS, llama_sizes, training_memory

    print("\n| model, rank | GPUs | " + " | ".join(f"{layout} GB" for layout in LAYOUTS)
          + " | of which base (fsdp2 base) / activations GB |\n|---|---|" + "---|" * len(LAYOUTS) + "---|")
    for shape in ("8b", "70b"):
        hidden, heads, kv_heads, intermediate, layers = SHAPES[shape]
        for rank in (16, 128):
            sizes = llama_sizes(hidden, kv_heads * hidden // heads, intermediate, layers, VOCAB[shape], 4, 128, rank)
            for gpus in (1, 8):
                plans = [training_memory(sizes, layout, gpus, tokens_per_gpu) for layout in LAYOUTS]
                print(f"| {shape}, r{rank} | {gpus} | " + " | ".join(f"{p['total']:.1f}" for p in plans)
                      + f" | {plans[0]['base']:.1f} ({plans[-1]['base']:.1f}) / {plans[0]['activations']:.1f} |")


def refine_plan(shape: str, samples: int = 128, seq_len: int = 2048, batch_tokens: int = 8 * 2048,
                dtype_bytes: int = 2) -> dict[str, float]:
    """GB of the refinement (:mod:`eora_ft.init.refine`, one step of ``batch_tokens``): activations saved for the
    backward pass, and the teacher on the host for ``samples`` x ``seq_len`` calibration tokens.

    A Llama decoder layer with LoRA on every linear saves, per token (model dtype): the two norms' inputs and
    outputs (4 H: LoRA's A needs its input), q and k after rotary embeddings and v (H + 2 kv), the attention
    output (H: o_proj's LoRA input), gate, SiLU(gate), up and their product (4 I: down_proj's LoRA input), about
    7 H + 2 kv + 4 I. With checkpointing a layer keeps its input (H) and one layer at a time is recomputed whole.
    Teacher: ``final`` fp32 ``[samples, seq, H]``; ``layers`` ``[samples, layers, seq, H]`` in the model dtype."""
    hidden, heads, kv_heads, intermediate, layers = SHAPES[shape]
    kv = kv_heads * hidden // heads
    per_layer = batch_tokens * (7 * hidden + 2 * kv + 4 * intermediate) * dtype_bytes / 1e9
    layer_input = batch_tokens * hidden * dtype_bytes / 1e9
    return {"per_layer": per_layer, "saved": layers * per_layer,
            "saved_checkpointed": layers * layer_input + per_layer,
            "teacher_final": samples * seq_len * hidden * 4 / 1e9,
            "teacher_layers": samples * layers * seq_len * hidden * dtype_bytes / 1e9}


def print_refine_plan(tokens: int, batch_tokens: int, seq_len: int = 2048) -> None:
    print(f"\n| refinement, bf16, {batch_tokens} tokens a step | saved activations per layer GB | all layers GB | "
          f"with checkpointing GB | teacher final GB (fp32) | teacher layers GB (bf16; file= maps it) |"
          "\n|---|---|---|---|---|---|")
    for shape in ("8b", "70b"):
        plan = refine_plan(shape, tokens // seq_len, seq_len, batch_tokens)
        print(f"| {shape} | {plan['per_layer']:.1f} | {plan['saved']:.0f} | {plan['saved_checkpointed']:.1f} | "
              f"{plan['teacher_final']:.1f} | {plan['teacher_layers']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES | MOE_SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens (sequences of --seq-len)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--compress", default="gptq", help="gptq, rtn, sparsegpt, gptq+sparsegpt, wanda")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="execution device of each layer (cpu, cuda)")
    parser.add_argument("--train-tokens", type=int, default=512, help="tokens in the one training step")
    parser.add_argument("--plan", action="store_true",
                        help="only print the computed memory plan of an 8B and a 70B run (128 x 2048 tokens)")
    args = parser.parse_args()
    if args.plan:
        print_plan(128 * 2048, 8 * 2048)
        return

    sampler = PeakRSS()
    start_rss = sampler.reset()
    stage_peaks: dict[str, int] = {}
    instrument(sampler, stage_peaks)
    device = torch.device(args.device)
    rows: dict[str, dict] = {}

    def stage(name: str, seconds: float, **extra) -> None:
        rows[name] = {"stage": name, "seconds": round(seconds, 2), "peak_host_gb": round(sampler.peak / 1e9, 2), **extra}
        if device.type == "cuda":
            rows[name]["peak_accelerator_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            torch.cuda.reset_peak_memory_stats(device)
        print(json.dumps(rows[name]), flush=True)
        sampler.reset()

    clock = time.perf_counter()
    model = build_model(args.shape, args.layers, args.vocab)
    budget = budget_bytes(model, args.tokens)
    stage("build", time.perf_counter() - clock, model_gb=round(budget["weights"] / 1e9, 2))

    calib = torch.randint(0, args.vocab, (max(args.tokens // args.seq_len, 1), args.seq_len),
                          generator=torch.Generator().manual_seed(1))
    options = {"bits": args.bits, "group_size": args.group_size, "sparsity": "2:4"}
    clock = time.perf_counter()
    targets = target_names(model)
    result = compress_model(model, calib, make_compressor(args.compress, **options), ["eora"], rank=args.rank,
                            target_modules=targets, batch_size=1, execution_device=device, progress=False)
    per_layer = {k: round(v / args.layers, 2) for k, v in {**result.stage_seconds,
                                                          **{f"init:{n}": s for n, s in result.init_seconds.items()}}.items()}
    stage("compress+eora", time.perf_counter() - clock, per_layer_seconds=per_layer,
          peak_host_gb_by_stage={k: round(v / 1e9, 2) for k, v in stage_peaks.items()})

    clock = time.perf_counter()
    factors = {path: per_init["eora"] for path, per_init in result.factors.items()}
    peft_model = build_lora_model(model, factors, lora_config(args.rank, args.rank, 0.0, targets))
    stage("peft_wrap", time.perf_counter() - clock)

    peft_model.to(device).train()
    clock = time.perf_counter()
    ids = torch.randint(0, args.vocab, (1, args.train_tokens), generator=torch.Generator().manual_seed(2), device=device)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    stage("train_step", time.perf_counter() - clock, loss=round(float(loss.detach()), 4))
    sampler.stop()

    peak = max(row["peak_host_gb"] for row in rows.values()) * 1e9
    real_layers = MOE_SHAPES[args.shape][7] if args.shape in MOE_SHAPES else SHAPES[args.shape][4]
    layer_seconds = rows["compress+eora"]["seconds"] / args.layers
    summary = {
        "shape": args.shape, "layers": args.layers, "vocab": args.vocab, "calibration_tokens": int(calib.numel()),
        "compress": args.compress, "device": str(device), "torch_threads": torch.get_num_threads(),
        "peak_host_gb": round(peak / 1e9, 2), "start_host_gb": round(start_rss / 1e9, 2),
        "budget_gb": {k: round(v / 1e9, 2) for k, v in budget.items()},
        "peak_over_budget": round(peak / budget["total"], 2),
        "seconds_per_layer": round(layer_seconds, 1),
        f"projected_{args.shape}_hours": round(layer_seconds * real_layers / 3600, 2),
    }
    if result.expert_routing:  # tokens routed to each expert, per layer: what the experts' statistics rest on
        counts = sorted(count for report in result.expert_routing for count in report["routed_tokens"])
        summary["expert_tokens"] = {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1],
                                    "experts": len(counts), "calibrated_on_every_token":
                                        sum(len(report["all_token_experts"]) for report in result.expert_routing)}
    print(json.dumps(summary))
    print("\n| stage | seconds | peak host GB |\n|---|---|---|")
    for row in rows.values():
        print(f"| {row['stage']} | {row['seconds']} | {row['peak_host_gb']} |")
    print(f"\nper layer: {json.dumps(per_layer)}")
    print(f"peak host GB by stage: {json.dumps(rows['compress+eora']['peak_host_gb_by_stage'])}")
    print(f"peak host {summary['peak_host_gb']} GB vs budget {summary['budget_gb']['total']} GB "
          f"(weights {summary['budget_gb']['weights']} + activations {summary['budget_gb']['activations']} + "
          f"statistics {summary['budget_gb']['statistics']}): {summary['peak_over_budget']}x")


if __name__ == "__main__":
    main()
