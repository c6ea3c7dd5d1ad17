"""Base and init entries apart: what each key covers, one base serving several adapters, LoftQ's own base,
the uncompressed ceiling."""

import copy
import dataclasses

import pytest
import torch

from eora_ft.run.artifacts import (base_directory, base_key_parts, build_base, build_init, compressed_base_name,
                                   init_key_parts, load_artifacts)
from eora_ft.run.cache import cache_key, ensure_entry
from eora_ft.config import AdapterInitArguments, CompressionArguments, EoraModelConfig

TARGETS = ["q_proj", "down_proj"]


@pytest.fixture(scope="module")
def setting(nano_model_and_tokenizer, assets_dir):
    model, tokenizer = nano_model_and_tokenizer
    model_args = EoraModelConfig(model_name_or_path=str(assets_dir / "models" / "nano-llama-5m"), lora_r=4,
                                 lora_alpha=4, lora_target_modules=TARGETS)
    compress_args = CompressionArguments(compress_method="gptq", bits=2, group_size=64, calib_batch_size=4)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randint(0, tokenizer.vocab_size, (4, 64), generator=generator)
    adapter_calib = torch.randint(0, tokenizer.vocab_size, (4, 64), generator=generator)
    return model, tokenizer, model_args, compress_args, calib, adapter_calib


def test_base_key_covers_the_compressor_only_and_init_key_its_own_inputs(setting):
    model, _, model_args, compress_args, calib, adapter_calib = setting
    base = cache_key(base_key_parts(model, model_args, compress_args, calib, model_args.model_name_or_path))
    # where and how calibration text was chosen is not in the key: the tokens are
    moved = dataclasses.replace(compress_args, calib_seed=5, execution_device="cpu", calib_batch_size=2)
    assert cache_key(base_key_parts(model, model_args, moved, calib, model_args.model_name_or_path)) == base
    for changed in (dataclasses.replace(compress_args, bits=3), calib[:2]):
        args, tokens = (changed, calib) if isinstance(changed, CompressionArguments) else (compress_args, changed)
        assert cache_key(base_key_parts(model, model_args, args, tokens, model_args.model_name_or_path)) != base

    eora = AdapterInitArguments(init_method="eora")
    key = cache_key(init_key_parts(base, model_args, eora, adapter_calib, seed=0))
    assert cache_key(init_key_parts(base, model_args, eora, adapter_calib, seed=1)) == key  # eora draws nothing
    assert cache_key(init_key_parts(base, model_args, eora, adapter_calib[:2], seed=0)) != key
    assert cache_key(init_key_parts("other", model_args, eora, adapter_calib, seed=0)) != key
    qlora = AdapterInitArguments(init_method="qlora")
    assert (cache_key(init_key_parts(base, model_args, qlora, adapter_calib, seed=0))
            != cache_key(init_key_parts(base, model_args, qlora, adapter_calib, seed=1)))


def test_one_base_serves_several_adapters_and_loftq_brings_its_own(setting, tmp_path):
    model, tokenizer, model_args, compress_args, calib, adapter_calib = setting
    builds = []

    def base_build(tmp):
        builds.append("base")
        return build_base(tmp, copy.deepcopy(model), tokenizer, calib, model_args, compress_args, progress=False)

    base_key = cache_key(base_key_parts(model, model_args, compress_args, calib, model_args.model_name_or_path))
    entries = {}
    for init in ("eora", "loftq", "pissa"):
        base_entry, _ = ensure_entry(tmp_path, base_key, base_build)
        init_args = AdapterInitArguments(init_method=init, loftq_iters=2)
        key = cache_key(init_key_parts(base_key, model_args, init_args, adapter_calib, 0))
        entries[init], built = ensure_entry(tmp_path, key, lambda tmp: build_init(
            tmp, base_entry, lambda: copy.deepcopy(model), tokenizer, adapter_calib, model_args, compress_args,
            init_args, 0, progress=False, entry=tmp_path / key))
        assert built
    assert builds == ["base"]  # the second adapter found the compressed base
    assert base_directory(entries["eora"]) == tmp_path / base_key / "base"
    assert base_directory(entries["loftq"]) == entries["loftq"] / "base"
    assert base_directory(entries["pissa"]) == entries["pissa"] / "base"
    # a comparison scores each compressed base once, by this name: LoftQ's rewritten base is not the shared one
    names = {init: compressed_base_name(entry, model_args.model_name_or_path) for init, entry in entries.items()}
    assert names == {"eora": str(tmp_path / base_key / "base"), "loftq": str(entries["loftq"] / "base"),
                     "pissa": str(entries["pissa"] / "base")}

    ids = adapter_calib[:2]
    eora = load_artifacts(entries["eora"], torch.float32, "cpu", trainable=False)
    with torch.no_grad():
        with eora.disable_adapter():
            plain = eora(input_ids=ids).logits
        corrected = eora(input_ids=ids).logits
        original = model(input_ids=ids).logits
    # EoRA's adapter, fitted on the adapter calibration, brings these tokens' logits closer to the original's
    assert (corrected - original).norm() < (plain - original).norm()
    # PiSSA's adapter holds each linear's principal part: without it the residual base is far from the model
    pissa = load_artifacts(entries["pissa"], torch.float32, "cpu", trainable=False)
    with torch.no_grad():
        with pissa.disable_adapter():
            residual_only = pissa(input_ids=ids).logits
        whole = pissa(input_ids=ids).logits
    assert 3 * (whole - original).norm() < (residual_only - original).norm()


def test_uncompressed_ceiling_starts_as_the_original_model(setting, tmp_path):
    model, tokenizer, model_args, _, _, _ = setting
    none = CompressionArguments(compress_method="none")
    base_key = cache_key(base_key_parts(model, model_args, none, None, model_args.model_name_or_path))
    base_entry, _ = ensure_entry(tmp_path, base_key, lambda tmp: build_base(tmp, model, tokenizer, None, model_args,
                                                                            none))
    init_args = AdapterInitArguments(init_method="qlora")
    key = cache_key(init_key_parts(base_key, model_args, init_args, None, 0))
    entry, _ = ensure_entry(tmp_path, key, lambda tmp: build_init(tmp, base_entry, lambda: copy.deepcopy(model),
                                                                  tokenizer, None, model_args, none, init_args, 0,
                                                                  entry=tmp_path / key))
    assert base_directory(entry) is None and not (base_entry / "base").exists()
    assert compressed_base_name(entry, "org/model") == "org/model (uncompressed)"
    lora = load_artifacts(entry, torch.float32, "cpu")
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert any(p.requires_grad for p in lora.parameters())


def _gptqmodel_style_adapter(directory, base_entry, rank: int = 8) -> dict:
    """An adapter as GPTQModel writes its EoRA: plain PEFT files, fp16 factors, lora_alpha = r, keys
    ``base_model.model.model.layers.N.<proj>.lora_A.weight``; random factors for the test."""
    import json

    from safetensors.torch import save_file

    from eora_ft.compress.io import load_compressed

    base = load_compressed(base_entry / "base")
    tensors, generator = {}, torch.Generator().manual_seed(3)
    for path, module in base.named_modules():
        if path.split(".")[-1] in TARGETS and hasattr(module, "dequantize"):
            tensors[f"base_model.model.{path}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) * 0.05).half()
            tensors[f"base_model.model.{path}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.05).half()
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": "gptqmodel/quantized-base",
        "inference_mode": True}))
    return tensors


def test_init_from_an_existing_adapter_keeps_its_factors_and_scaling(setting, tmp_path):
    model, tokenizer, model_args, compress_args, calib, _ = setting
    base_key = cache_key(base_key_parts(model, model_args, compress_args, calib, model_args.model_name_or_path))
    base_entry, _ = ensure_entry(tmp_path / "cache", base_key, lambda tmp: build_base(
        tmp, copy.deepcopy(model), tokenizer, calib, model_args, compress_args, progress=False))
    tensors = _gptqmodel_style_adapter(tmp_path / "eora_adapter", base_entry)
    init_args = AdapterInitArguments(init_from_adapter=str(tmp_path / "eora_adapter"))
    key = cache_key(init_key_parts(base_key, model_args, init_args, None, seed=0))
    entry, _ = ensure_entry(tmp_path / "cache", key, lambda tmp: build_init(
        tmp, base_entry, lambda: pytest.fail("an existing adapter needs no uncompressed model"), tokenizer, None,
        model_args, compress_args, init_args, 0, progress=False, entry=tmp_path / "cache" / key))
    peft_model = load_artifacts(entry, torch.float32, "cpu")
    path = "model.layers.1.mlp.down_proj"
    module = peft_model.base_model.model.get_submodule(path)
    assert module.scaling["default"] == 1.0  # GPTQModel's alpha = r, not our run's lora_alpha / lora_r
    a = tensors[f"base_model.model.{path}.lora_A.weight"].float()
    b = tensors[f"base_model.model.{path}.lora_B.weight"].float()
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        correction = module(x) - module.base_layer(x)
    assert torch.allclose(correction, x @ a.t() @ b.t(), rtol=1e-5, atol=1e-6)
    assert {p.dtype for n, p in peft_model.named_parameters() if p.requires_grad} == {torch.float32}
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == sum(t.numel() for t in tensors.values())


def test_an_adapter_for_another_base_is_refused_by_name(setting, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokenizer, model_args, compress_args, calib, _ = setting
    base_key = cache_key(base_key_parts(model, model_args, compress_args, calib, model_args.model_name_or_path))
    base_entry, _ = ensure_entry(tmp_path / "cache", base_key, lambda tmp: build_base(
        tmp, copy.deepcopy(model), tokenizer, calib, model_args, compress_args, progress=False))
    _gptqmodel_style_adapter(tmp_path / "other", base_entry)
    weights = tmp_path / "other" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("down_proj.lora_A.weight"))
    tensors[key] = torch.zeros(8, 512, dtype=torch.float16)
    save_file(tensors, str(weights))
    init_args = AdapterInitArguments(init_from_adapter=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"has shape \(8, 512\) but .*down_proj is a 768 -> 256 linear"):
        build_init(tmp_path / "init", base_entry, None, tokenizer, None, model_args, compress_args, init_args, 0,
                   entry=tmp_path / "init")


def _rtn4_entry(setting, tmp_path, sym: bool, init_method: str):
    """(base entry, init entry) of the nano model compressed by 4-bit g64 RTN, in ``tmp_path / "cache"``."""
    model, tokenizer, model_args, _, calib, adapter_calib = setting
    compress_args = CompressionArguments(compress_method="rtn", bits=4, group_size=64, sym=sym)
    base_key = cache_key(base_key_parts(model, model_args, compress_args, calib, model_args.model_name_or_path))
    base_entry, _ = ensure_entry(tmp_path / "cache", base_key, lambda tmp: build_base(
        tmp, copy.deepcopy(model), tokenizer, calib, model_args, compress_args, progress=False))
    init_args = AdapterInitArguments(init_method=init_method)
    key = cache_key(init_key_parts(base_key, model_args, init_args, adapter_calib, seed=0))
    entry, _ = ensure_entry(tmp_path / "cache", key, lambda tmp: build_init(
        tmp, base_entry, lambda: copy.deepcopy(model), tokenizer, adapter_calib, model_args, compress_args, init_args, 0,
        progress=False, entry=tmp_path / "cache" / key))
    return base_entry, entry


@pytest.mark.parametrize("sym,expected", [(True, "compressed-tensors"), (False, "eora_ft")])
def test_adapters_name_an_exported_base_that_loads_with_our_logits(setting, tmp_path, sym, expected):
    from peft import AutoPeftModelForCausalLM

    from eora_ft.run.artifacts import export_base
    from eora_ft.adapters.peft_bridge import load_pretrained, save_adapter

    tokenizer = setting[1]
    base_entry, entry = _rtn4_entry(setting, tmp_path, sym, "eora")
    path, kind = export_base(entry, tmp_path / "run" / "base", tokenizer)
    assert kind == expected and path == str((tmp_path / "run" / "base").resolve())
    ours = load_artifacts(entry, torch.float32, "cpu", trainable=False)
    save_adapter(ours, tmp_path / "run" / "adapter", path)
    ids = torch.randint(1, 8192, (2, 24), generator=torch.Generator().manual_seed(5))
    loaders = [load_pretrained]
    if kind == "compressed-tensors":  # plain PEFT + transformers, no eora_ft code in the path
        from transformers import CompressedTensorsConfig

        # PEFT wraps dense weights: compressed-tensors decompresses on load with run_compressed=False
        loaders.append(lambda adapter: AutoPeftModelForCausalLM.from_pretrained(
            adapter, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)))
    else:  # hard links into the sealed cache entry: no second copy on disk
        assert (tmp_path / "run" / "base" / "model.safetensors").stat().st_ino == \
            (base_entry / "base" / "model.safetensors").stat().st_ino
    with torch.no_grad():
        expected_logits = ours(ids).logits
        for load in loaders:
            assert torch.equal(load(tmp_path / "run" / "adapter")(ids).logits, expected_logits)


def test_the_exported_base_and_the_trained_model_take_the_runs_dtype_and_attention(setting, tmp_path):
    """A bf16 run exports a bf16 checkpoint (config and every float tensor: fp32 would double the embeddings and
    lm_head a server loads), and the model it trains is built with the attention kernel the run asked for."""
    import json

    from safetensors import safe_open

    from eora_ft.run.artifacts import export_base

    tokenizer = setting[1]
    _, entry = _rtn4_entry(setting, tmp_path, True, "qlora")
    path, kind = export_base(entry, tmp_path / "base", tokenizer, dtype=torch.bfloat16)
    assert kind == "compressed-tensors"
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert "BF16" in dtypes and "F32" not in dtypes, dtypes
    for attention in ("eager", "sdpa"):
        loaded = load_artifacts(entry, torch.bfloat16, "cpu", trainable=False, attn_implementation=attention)
        assert loaded.base_model.model.config._attn_implementation == attention


def test_a_rank_budget_spends_the_uniform_parameters_where_the_error_drops_most(setting, tmp_path):
    import json

    model, tokenizer, model_args, compress_args, calib, adapter_calib = setting
    base_key = cache_key(base_key_parts(model, model_args, compress_args, calib, model_args.model_name_or_path))
    base_entry, _ = ensure_entry(tmp_path / "cache", base_key, lambda tmp: build_base(
        tmp, copy.deepcopy(model), tokenizer, calib, model_args, compress_args, progress=False))
    metas = {}
    for allocation in ("uniform", "budget"):
        init_args = AdapterInitArguments(init_method="eora", rank_allocation=allocation)
        key = cache_key(init_key_parts(base_key, model_args, init_args, adapter_calib, seed=0))
        entry, _ = ensure_entry(tmp_path / "cache", key, lambda tmp: build_init(
            tmp, base_entry, lambda: copy.deepcopy(model), tokenizer, adapter_calib, model_args, compress_args,
            init_args, 0, progress=False, entry=tmp_path / "cache" / key))
        metas[allocation] = (json.loads((entry / "meta.json").read_text()), load_artifacts(entry, torch.float32, "cpu"))
    (uniform, uniform_model), (budget, budget_model) = metas["uniform"], metas["budget"]
    report = budget["rank_budget"]
    assert report["spent"] <= report["budget"] == 4 * sum(256 + 256 if "q_proj" in p else 768 + 256
                                                          for p in report["ranks"])
    assert len(set(report["ranks"].values())) > 1 and max(report["ranks"].values()) <= 16  # 4 x lora_r
    params = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (uniform_model, budget_model)]
    assert params[1] == report["spent"] <= params[0]  # the adapter really has those ranks (rank_pattern)
    squared = [sum(row["rel_out_err/eora"] ** 2 for row in meta["layers"]) for meta in (uniform, budget)]
    assert squared[1] < squared[0]  # the objective the greedy pass spends the budget on
    saved = json.loads((tmp_path / "cache" / key / "init" / "adapter_config.json").read_text())
    assert {k.replace("\\", "") for k in saved["rank_pattern"]} <= set(report["ranks"])


def test_refine_steps_run_with_the_init_and_are_cached_with_it(setting, tmp_path):
    import json

    model, tokenizer, model_args, compress_args, calib, adapter_calib = setting
    base_key = cache_key(base_key_parts(model, model_args, compress_args, calib, model_args.model_name_or_path))
    base_entry, _ = ensure_entry(tmp_path / "cache", base_key, lambda tmp: build_base(
        tmp, copy.deepcopy(model), tokenizer, calib, model_args, compress_args, progress=False))
    plain = AdapterInitArguments(init_method="eora")
    refined = AdapterInitArguments(init_method="eora", refine_steps=20, refine_learning_rate=1e-3)
    variants = (plain, refined, AdapterInitArguments(init_method="eora", refine_target="layers"),
                AdapterInitArguments(init_method="eora", refine_steps=20, refine_learning_rate=1e-3,
                                     refine_target="layers"))
    keys = [cache_key(init_key_parts(base_key, model_args, a, adapter_calib, seed=0)) for a in variants]
    assert keys[0] != keys[1]  # cached with the init: a refined adapter is its own entry
    assert keys[2] == keys[0] and keys[3] != keys[1]  # refine_target matters only while refine_steps > 0
    entry, _ = ensure_entry(tmp_path / "cache", keys[1], lambda tmp: build_init(
        tmp, base_entry, lambda: copy.deepcopy(model), tokenizer, adapter_calib, model_args, compress_args, refined, 0,
        progress=False, entry=tmp_path / "cache" / keys[1]))
    report = json.loads((entry / "meta.json").read_text())["refine"]
    assert report["steps"] == 20 and report["loss_last"] < report["loss_first"]
    assert len(report["losses"]) == 2  # every 10th step is kept in the entry's metadata
