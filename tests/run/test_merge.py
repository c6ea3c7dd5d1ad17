"""Merging an adapter into its compressed base: a zero adapter merges to the very same model, masks and storage
are kept, the data-driven merge lands nearer the unmerged model than rounding, and the residual nearer still."""

import copy

import pytest
import torch

from eora_ft.adapters.peft_bridge import build_lora_model, lora_config
from eora_ft.compress import CompressedLinear, make_compressor
from eora_ft.init import LowRankFactors
from eora_ft.init.sequential import compress_model
from eora_ft.run.merge import merge_adapter

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4


@pytest.fixture(scope="module")
def calibration():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 8192, (4, 64), generator=g), torch.randint(1, 8192, (2, 64), generator=g)


def _base(nano_model_and_tokenizer, calibration, method="gptq", targets=LINEARS, **options):
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    compress_model(model, calibration[0], make_compressor(method, **options), target_modules=targets, batch_size=2,
                   progress=False)
    return model


def _adapted(base, size: float, seed: int = 0):
    """PEFT LoRA over ``base`` whose correction ``B A`` has entries of about ``size`` (0: a zero adapter)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path, module in base.named_modules():
        if isinstance(module, CompressedLinear):
            a = torch.randn(RANK, module.in_features, generator=g) / module.in_features**0.5
            b = size * torch.randn(module.out_features, RANK, generator=g) * (module.in_features / RANK) ** 0.5
            factors[path] = LowRankFactors(a, b, RANK)
    targets = sorted({path.rsplit(".", 1)[-1] for path in factors})
    return build_lora_model(copy.deepcopy(base), factors, lora_config(RANK, 2 * RANK, 0.0, targets))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def gptq_base(nano_model_and_tokenizer, calibration):
    return _base(nano_model_and_tokenizer, calibration, bits=3, group_size=128)


@pytest.mark.parametrize("how", ["recompress", "round", "regrid"])
def test_a_zero_adapter_merges_to_the_same_model(gptq_base, calibration, how):
    merged = merge_adapter(_adapted(gptq_base, 0.0), calibration[0], how=how, progress=False).model
    same = how != "regrid"  # only a fresh grid may move codes that were already on the base's grid
    for path, module in gptq_base.named_modules():
        if isinstance(module, CompressedLinear):
            twin = merged.get_submodule(path)
            assert isinstance(twin, CompressedLinear) and twin.bits == module.bits
            if same:
                assert torch.equal(twin.qweight, module.qweight) and torch.equal(twin.scales, module.scales), path
    if same:
        assert torch.equal(_logits(merged, calibration[1]), _logits(gptq_base, calibration[1]))


def test_recompress_lands_nearer_the_unmerged_model_than_rounding(gptq_base, calibration):
    adapted = _adapted(gptq_base, 0.01, seed=1)
    reference = _logits(adapted, calibration[1])
    bare = (_logits(gptq_base, calibration[1]) - reference).pow(2).mean()
    distances = {}
    for how, rank in (("round", 0), ("recompress", 8)):
        result = merge_adapter(_adapted(gptq_base, 0.01, seed=1), calibration[0], how=how, residual_rank=rank,
                               progress=False)
        distances[how, 0] = (_logits(result.model, calibration[1]) - reference).pow(2).mean()
        if rank:  # the merged base alone above, with its residual adapter here
            assert set(result.residual) == set(result.merged) and all(f.rank == rank for f in result.residual.values())
            model = build_lora_model(result.model, result.residual, lora_config(rank, rank, 0.0, LINEARS))
            distances[how, rank] = (_logits(model, calibration[1]) - reference).pow(2).mean()
    assert distances["recompress", 0] < distances["round", 0]
    assert distances["recompress", 8] < distances["recompress", 0]  # the residual gives back what re-compression lost
    assert distances["recompress", 0] < bare  # and the merge keeps some of what the adapter changed


@pytest.mark.parametrize("method, options", [("sparsegpt", {}), ("gptq+sparsegpt", {"bits": 4, "group_size": 128})])
def test_a_2_4_base_keeps_its_mask(nano_model_and_tokenizer, calibration, method, options):
    base = _base(nano_model_and_tokenizer, calibration, method, ["o_proj", "down_proj"], sparsity="2:4", **options)
    merged = merge_adapter(_adapted(base, 0.01, seed=2), calibration[0], progress=False,
                           recorded={"method": method, "options": {"sparsity": "2:4"}}).model
    for path, module in base.named_modules():
        if isinstance(module, CompressedLinear):
            twin = merged.get_submodule(path)
            before, after = module.dequantize(torch.float32), twin.dequantize(torch.float32)
            if module.bits is None:
                assert torch.equal(twin.keep_bits, module.keep_bits), path
            else:  # quantized: pruned codes at the zero point; every group of 4 keeps at most 2
                assert bool(((after != 0).reshape(after.shape[0], -1, 4).sum(-1) <= 2).all()), path
            assert not torch.equal(before, after), path


def test_what_a_merge_cannot_express_is_refused(gptq_base, calibration):
    adapted = _adapted(gptq_base, 0.01)
    adapted.add_adapter("second", lora_config(RANK, RANK, 0.0, LINEARS))
    adapted.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="exactly one active adapter"):
        merge_adapter(adapted, calibration[0], progress=False)
    with pytest.raises(ValueError, match="merge_residual_rank=-1"):
        merge_adapter(_adapted(gptq_base, 0.01), calibration[0], residual_rank=-1, progress=False)
    with pytest.raises(ValueError, match="merge_method='smooth'"):
        merge_adapter(_adapted(gptq_base, 0.01), calibration[0], how="smooth", progress=False)
    partial = build_lora_model(copy.deepcopy(gptq_base), None, _only_layer_0(lora_config(RANK, RANK, 0.0, LINEARS)))
    with pytest.raises(ValueError, match=r"no linear of decoder layers \[1, 2, 3\]"):
        merge_adapter(partial, calibration[0], progress=False)


def _only_layer_0(config):
    config.layers_to_transform = [0]
    return config


def test_the_kept_share_is_of_the_adapters_change_whichever_way_it_went():
    from eora_ft.run.merge_report import kept_share, merge_markdown

    assert kept_share(120.0, 110.0, 110.0) == 1.0 and kept_share(120.0, 110.0, 120.0) == 0.0
    assert kept_share(120.0, 110.0, 115.0) == pytest.approx(0.5)
    assert kept_share(117.0, 118.0, 117.5) == pytest.approx(0.5)  # an adapter that made the text worse
    assert kept_share(5.0, 5.0001, 5.0) is None  # no measurable change: no share
    report = {"adapter": "a", "metrics": [["ppl", "ppl", "ppl"], ["acc", "acc", "pct"]], "summary": {"k": "v"},
              "stages": {"compressed": {"ppl": 120.0, "acc": 0.25}, "base + adapter": {"ppl": 110.0, "acc": 0.25},
                         "merged (recompress)": {"ppl": 112.0, "acc": 0.25}}}
    assert "| ↳ kept of the adapter's change | 80% | – |" in merge_markdown(report)
