"""The driver over unfused mixture-of-experts experts (issue #35 items 2-3): each expert compressed on the tokens
routed to it, counted; experts the calibration barely routes to calibrated on every token; EoRA per expert."""

import logging

import pytest
import torch

from eora_ft.compress import make_compressor
from eora_ft.compress.experts import unfuse_experts
from eora_ft.compress.linear import CompressedLinear
from eora_ft.compress.result import SparseWeight
from eora_ft.init.coverage import compression_coverage
from eora_ft.init.sequential import _stages_of, compress_model
from tests.compress.test_experts import mixtral, qwen3_moe

# Qwen-MoE's experts are gate_proj/up_proj/down_proj, Mixtral's w1/w3/w2 (their original checkpoints' names)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"]


class _Identity:
    """Stores every weight as it is (a pruned layer that prunes nothing): the compressed model is the model."""

    needs_stats = True

    def compress(self, weight, stats):
        return SparseWeight(weight.clone(), torch.ones_like(weight, dtype=torch.bool))


def _calib(tokens=(4, 32), seed=0):
    return torch.randint(0, 128, tokens, generator=torch.Generator().manual_seed(seed))


def _routing_of_layer0(model, calib):
    """The MoE block input of decoder layer 0 and the router's choice, from the model as it is."""
    captured = []
    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(
        lambda module, args: captured.append((args[0].detach().clone(), args[1].clone())))
    with torch.no_grad():
        model(calib)
    handle.remove()
    return torch.cat([c[0] for c in captured]), torch.cat([c[1] for c in captured])


def test_an_identity_compressor_keeps_the_moe_model_exactly():
    model = mixtral()
    ids = _calib((2, 16), seed=3)
    with torch.no_grad():
        fused = model(ids).logits  # transformers' own MoE block
        unfuse_experts(model, LINEARS)
        reference = model(ids).logits
    torch.testing.assert_close(reference, fused, rtol=1e-5, atol=1e-5)  # fp32: the same sums, blocked differently
    compress_model(model, _calib(), _Identity(), [], target_modules=LINEARS, progress=False)
    layer = model.model.layers[1]
    assert all(isinstance(layer.mlp.experts[e].w2, CompressedLinear) for e in range(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_each_expert_is_compressed_on_exactly_the_tokens_routed_to_it():
    model = mixtral()
    unfuse_experts(model, LINEARS)
    calib = _calib()
    hidden, chosen = _routing_of_layer0(model, calib)  # layer 0's MoE input is computed before anything compresses
    result = compress_model(model, calib, make_compressor("rtn", bits=4, group_size=32), [],
                            target_modules=LINEARS, keep_stats=True, progress=False, expert_min_share=0.0)
    for expert in range(4):
        routed = (chosen == expert).any(dim=-1)
        x = hidden[routed].double()
        stats = result.stats[f"model.layers.0.mlp.experts.{expert}.w1"]
        assert stats.tokens == int(routed.sum())
        # one fp32 product per batch, summed in fp64: each entry within n * eps32 of the sum of |products|
        bound = x.shape[0] * torch.finfo(torch.float32).eps * (x.abs().t() @ x.abs())
        assert ((stats.xtx - x.t() @ x).abs() <= bound).all()
        assert result.stats[f"model.layers.0.mlp.experts.{expert}.w3"] is stats  # gate and up share the input
    for report in result.expert_routing:  # every token goes to top_k = 2 experts
        assert sum(report["routed_tokens"]) == 2 * calib.numel() and report["all_token_experts"] == []
    rows = {row["layer"]: row for row in result.layers}
    assert rows["model.layers.1.mlp.experts.2.w2"]["routed_tokens"] == result.expert_routing[1]["routed_tokens"][2]
    assert compression_coverage(model, LINEARS).left_dense == {"mlp.gate.weight": 2 * 4 * 64}  # the router only


@pytest.mark.parametrize("true_sequential", [False, True])
def test_experts_the_calibration_barely_routes_to_are_calibrated_on_every_token(true_sequential, caplog):
    model = qwen3_moe()  # 8 experts, 2 per token: 6 calibration tokens leave some experts with none
    unfuse_experts(model, LINEARS)
    calib = _calib((1, 6), seed=5)
    with caplog.at_level(logging.WARNING, logger="eora_ft"):
        result = compress_model(model, calib, make_compressor("gptq", bits=4, group_size=32), ["eora"], rank=4,
                                target_modules=LINEARS, keep_stats=True, progress=False, true_sequential=true_sequential)
    for report in result.expert_routing:
        counts, under = report["routed_tokens"], report["all_token_experts"]
        assert sum(counts) == 2 * 6 and report["threshold"] == pytest.approx(0.1 * 12 / 8)
        assert under == [e for e, count in enumerate(counts) if count == 0] and under  # some expert saw no token
        for expert in range(8):
            prefix = f"model.layers.{report['layer']}.mlp.experts.{expert}"
            tokens = {result.stats[f"{prefix}.{proj}"].tokens for proj in ("gate_proj", "down_proj")}
            assert tokens == ({6} if expert in under else {counts[expert]})
            assert isinstance(model.get_submodule(f"{prefix}.down_proj"), CompressedLinear)
            assert set(result.factors[f"{prefix}.down_proj"]) == {"eora"}
    assert any("their statistics come from every token" in message for message in caplog.messages)
    assert all(not layer.mlp.experts.route_all for layer in model.model.layers)  # routed again afterwards


def test_eora_corrects_each_experts_error_on_its_own_tokens():
    model = mixtral()
    unfuse_experts(model, LINEARS)
    result = compress_model(model, _calib((8, 32)), make_compressor("gptq", bits=2, group_size=32), ["eora"], rank=8,
                            target_modules=LINEARS, progress=False)
    expert_rows = [row for row in result.layers if ".experts." in row["layer"]]
    assert len(expert_rows) == 2 * 4 * 3
    assert all(row["rel_out_err/eora"] < row["rel_out_err/compressed"] for row in expert_rows)


def test_the_experts_of_a_block_make_one_stage_per_projection():
    shared = [object() for _ in range(6)]
    stats = {"self_attn.q_proj": shared[0], "self_attn.k_proj": shared[0], "self_attn.o_proj": shared[1],
             "mlp.experts.0.gate_proj": shared[2], "mlp.experts.0.up_proj": shared[2],
             "mlp.experts.0.down_proj": shared[3], "mlp.experts.2.gate_proj": shared[4],
             "mlp.experts.2.up_proj": shared[4], "mlp.experts.2.down_proj": shared[5]}
    names = [*stats, "mlp.experts.1.gate_proj", "mlp.experts.1.up_proj", "mlp.experts.1.down_proj"]
    assert _stages_of(stats, names) == [
        ["self_attn.q_proj", "self_attn.k_proj"], ["self_attn.o_proj"],
        ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.2.gate_proj", "mlp.experts.2.up_proj",
         "mlp.experts.1.gate_proj", "mlp.experts.1.up_proj"],
        ["mlp.experts.0.down_proj", "mlp.experts.2.down_proj", "mlp.experts.1.down_proj"]]
