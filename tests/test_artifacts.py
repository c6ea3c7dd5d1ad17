"""Base and init entries apart: what each key covers, one base serving several adapters, LoftQ's own base,
the uncompressed ceiling."""

import copy
import dataclasses

import pytest
import torch

from eora_ft.artifacts import base_directory, base_key_parts, build_base, build_init, init_key_parts, load_artifacts
from eora_ft.cache import cache_key, ensure_entry
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
    for init in ("eora", "loftq"):
        base_entry, _ = ensure_entry(tmp_path, base_key, base_build)
        init_args = AdapterInitArguments(init_method=init, loftq_iters=2)
        key = cache_key(init_key_parts(base_key, model_args, init_args, adapter_calib, 0))
        entries[init], built = ensure_entry(tmp_path, key, lambda tmp: build_init(
            tmp, base_entry, lambda: copy.deepcopy(model), tokenizer, adapter_calib, model_args, compress_args,
            init_args, 0, progress=False))
        assert built
    assert builds == ["base"]  # the second adapter found the compressed base
    assert base_directory(entries["eora"]) == tmp_path / base_key / "base"
    assert base_directory(entries["loftq"]) == entries["loftq"] / "base"

    ids = adapter_calib[:2]
    eora = load_artifacts(entries["eora"], torch.float32, "cpu", trainable=False)
    with torch.no_grad():
        with eora.disable_adapter():
            plain = eora(input_ids=ids).logits
        corrected = eora(input_ids=ids).logits
        original = model(input_ids=ids).logits
    # EoRA's adapter, fitted on the adapter calibration, brings these tokens' logits closer to the original's
    assert (corrected - original).norm() < (plain - original).norm()


def test_uncompressed_ceiling_starts_as_the_original_model(setting, tmp_path):
    model, tokenizer, model_args, _, _, _ = setting
    none = CompressionArguments(compress_method="none")
    base_key = cache_key(base_key_parts(model, model_args, none, None, model_args.model_name_or_path))
    base_entry, _ = ensure_entry(tmp_path, base_key, lambda tmp: build_base(tmp, model, tokenizer, None, model_args,
                                                                            none))
    init_args = AdapterInitArguments(init_method="qlora")
    entry, _ = ensure_entry(tmp_path, cache_key(init_key_parts(base_key, model_args, init_args, None, 0)),
                            lambda tmp: build_init(tmp, base_entry, lambda: copy.deepcopy(model), tokenizer, None,
                                                   model_args, none, init_args, 0))
    assert base_directory(entry) is None and not (base_entry / "base").exists()
    lora = load_artifacts(entry, torch.float32, "cpu")
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert any(p.requires_grad for p in lora.parameters())
