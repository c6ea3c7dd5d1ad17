"""What share of a decoder the run compresses, and the line that names what it leaves dense (issue #35 item 1)."""

import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from eora_ft.init.coverage import compression_coverage
from eora_ft.init.sequential import compress_model

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPES)).eval()


def _mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SHAPES, num_local_experts=4, num_experts_per_tok=2)).eval()


def test_a_dense_decoder_with_every_linear_targeted_is_fully_compressed():
    coverage = compression_coverage(_llama(), LINEARS)
    attention = 64 * 64 * 2 + 32 * 64 * 2
    mlp = 3 * 64 * 96
    assert coverage.compressed == coverage.total == 2 * (attention + mlp)  # norms (1-D) are not weights
    assert coverage.share == 1.0 and coverage.left_dense == {} and coverage.warning() is None
    assert coverage.summary() == "100.0%"


def test_linears_left_out_of_the_targets_are_named_with_their_share():
    coverage = compression_coverage(_llama(), ["q_proj", "v_proj"])
    assert set(coverage.left_dense) == {"self_attn.k_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                                        "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert coverage.compressed == 2 * (64 * 64 + 32 * 64)
    assert "matrix outside lora_target_modules" in coverage.warning()
    assert coverage.summary().startswith(f"{coverage.share:.1%} (dense: mlp.")


def test_fused_experts_are_said_to_stay_dense_with_their_share_before_any_work():
    model = _mixtral()
    coverage = compression_coverage(model, LINEARS)
    experts = 2 * 4 * (2 * 96 * 64 + 64 * 96)  # gate_up [E, 2I, H] and down [E, H, I], two layers
    router = 2 * 4 * 64
    attention = 2 * (64 * 64 * 2 + 32 * 64 * 2)
    assert coverage.compressed == attention and coverage.total == attention + experts + router
    assert coverage.left_dense == {"mlp.experts.gate_up_proj": 2 * 4 * 2 * 96 * 64,
                                   "mlp.experts.down_proj": 2 * 4 * 64 * 96, "mlp.gate.weight": router}
    warning = coverage.warning()
    assert "mlp.experts.gate_up_proj (3-D expert parameter, " in warning
    assert warning.startswith(f"only {attention / (attention + experts + router):.1%} of the decoder's weights")
    # and indeed: the driver compresses the attention linears only, the experts keep their values
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    compress_model(model, torch.randint(0, 128, (2, 16)), _rtn(), [], target_modules=LINEARS, progress=False)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, before)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "CompressedLinear"


def _rtn():
    from eora_ft.compress import make_compressor

    return make_compressor("rtn", bits=4, group_size=32)


def test_eora_ft_compress_compresses_the_experts_and_warns_when_the_targets_leave_them_out(tmp_path, capsys, caplog):
    import json
    import shutil

    from eora_ft.cli import main
    from eora_ft.compress.io import load_compressed
    from eora_ft.compress.linear import CompressedLinear

    nano = "eora_ft/assets/models/nano-llama-5m"  # its tokenizer: the model gets its vocabulary size
    model_dir = tmp_path / "mixtral"
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**{**SHAPES, "vocab_size": 8192}, num_local_experts=4,
                                     num_experts_per_tok=2)).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{nano}/{name}", model_dir / name)
    common = ["compress", "--model_name_or_path", str(model_dir), "--compress_method", "rtn", "--bits", "4",
              "--group_size", "32", "--calib_num_samples", "2", "--calib_seq_len", "16"]
    mixtral_linears = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]  # Mixtral's experts: w1, w3, w2
    with caplog.at_level(logging.WARNING, logger="eora_ft"):
        assert main([*common, "--lora_target_modules", *mixtral_linears, "--output_dir", str(tmp_path / "all")]) == 0
        everything = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert not any("stay dense" in message for message in caplog.messages)
        assert main([*common, "--output_dir", str(tmp_path / "llama_names")]) == 0  # the default: Llama's names
    warnings = [message for message in caplog.messages if "3-D expert parameter" in message]
    assert len(warnings) == 1 and "add w1, w3, w2 to lora_target_modules" in warnings[0]
    router = 2 * 4 * 64
    assert everything["decoder_weights_compressed"] == \
        f"{1 - router / (2 * (64 * 64 * 2 + 32 * 64 * 2) + 2 * 4 * 3 * 64 * 96 + router):.1%} (dense: mlp.gate.weight 0.3%)"
    loaded = load_compressed(tmp_path / "all")  # the per-expert modules load back into an unfused model
    assert isinstance(loaded.model.layers[1].mlp.experts[3].w3, CompressedLinear)
