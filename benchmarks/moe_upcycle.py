"""Compression and EoRA of a mixture-of-experts model that is a real language model: the nano model upcycled.

There is no small pretrained mixture-of-experts model here, so this makes one: the nano model's dense MLP copied
into every expert of a Mixtral decoder (Mixtral's attention is Llama's), a random router choosing ``--top-k`` of
``--experts`` per token. Mixtral renormalises the chosen experts' weights to sum to one, so with identical experts
the upcycled model computes the dense model's function (checked: its perplexity is printed beside the dense one).
Each expert is then compressed on the statistics of the tokens the router sends it and gets its own EoRA
factors, against the dense model compressed and compensated the same way:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/moe_upcycle.py --settings gptq/2/128 gptq/3/128 rtn/4/128

``--expert-noise s`` adds relative Gaussian noise to each expert's copy (distinct experts; the function changes).
Prints one JSON object per model and setting and a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
from eora_ft.compress import make_compressor
from eora_ft.compress.experts import unfuse_experts
from eora_ft.config import DEFAULT_MODEL, LLAMA_LINEARS
from eora_ft.data import calibration_tokens, read_text, resolve_path
from eora_ft.eval.scoring import perplexity
from eora_ft.init.expert_calibration import describe_routing
from eora_ft.init.sequential import compress_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_ppl import C4, PPL_TEXTS, parse_setting  # noqa: E402

MIXTRAL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]


@torch.no_grad()
def upcycle(dense, experts: int, top_k: int, noise: float = 0.0, seed: int = 0) -> MixtralForCausalLM:
    """A Mixtral model whose ``experts`` experts are copies of ``dense``'s (a Llama) MLP, random router."""
    config = dense.config
    moe = MixtralForCausalLM(MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_parameters["rope_theta"],
        tie_word_embeddings=config.tie_word_embeddings, num_local_experts=experts, num_experts_per_tok=top_k,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id))
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{index}.mlp"
        gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).expand(experts, -1, -1).clone()
        down = layer.mlp.down_proj.weight.expand(experts, -1, -1).clone()
        for tensor in (gate_up, down):
            tensor += noise * tensor.std() * torch.randn(tensor.shape, generator=generator)
        state[f"{prefix}.experts.gate_up_proj"], state[f"{prefix}.experts.down_proj"] = gate_up, down
        state[f"{prefix}.gate.weight"] = torch.randn(experts, config.hidden_size, generator=generator) / config.hidden_size**0.5
    moe.load_state_dict(state, strict=False)
    moe.tie_weights()
    return moe.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-noise", type=float, default=0.0)
    parser.add_argument("--settings", nargs="+", default=["gptq/2/128"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40)
    args = parser.parse_args()

    path = resolve_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    moe = upcycle(dense, args.experts, args.top_k, args.expert_noise)
    unfuse_experts(moe, MIXTRAL_LINEARS)
    texts = {name: read_text(resolve_path(p)) for name, p in PPL_TEXTS.items()}
    calib = calibration_tokens(tokenizer, resolve_path(C4), args.calib_samples, args.calib_seq_len, seed=0)

    def ppl(model) -> dict:
        return {name: perplexity(model, tokenizer, text, window=512, max_windows=args.ppl_windows,
                                 progress=False)["ppl"] for name, text in texts.items()}

    rows = []
    for label, base, targets in (("dense", dense, LLAMA_LINEARS), (f"moe {args.experts}x top-{args.top_k}", moe,
                                                                   MIXTRAL_LINEARS)):
        rows.append({"model": label, "setting": "uncompressed", **{f"{k}": v for k, v in ppl(base).items()}})
        print(json.dumps(rows[-1]), flush=True)
        for setting in args.settings:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            result = compress_model(model, calib, make_compressor(**parse_setting(setting)), ["eora"], rank=args.rank,
                                    target_modules=targets, progress=False)
            seconds = time.perf_counter() - start
            factors = {p: f["eora"] for p, f in result.factors.items()}
            compensated = build_lora_model(copy.deepcopy(model), factors, lora_config(args.rank, args.rank, 0.0, targets))
            rows.append({"model": label, "setting": setting, **ppl(model),
                         **{f"{k}+eora": v for k, v in ppl(compensated).items()}, "seconds": round(seconds, 1),
                         "experts": describe_routing(result.expert_routing)})
            print(json.dumps(rows[-1]), flush=True)

    columns = ["model", "setting", *texts, *[f"{name}+eora" for name in texts], "seconds"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns)
              + " |")


if __name__ == "__main__":
    main()
