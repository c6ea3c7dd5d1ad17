"""A model someone already compressed (``compressed_model_name_or_path``, ``eora-ft init --compressed_model``):
the factors computed from an imported checkpoint equal, bit for bit, those of the same weights built in process;
a checkpoint of another model is refused naming the first difference before any expensive work; GPTQ v1 as
GPTQModel writes it (word-level borrows, both 3-bit schemes) reads back exactly; the cache keys on the
checkpoint's files; recipes run on llm-compressor's checkpoint and on GPTQ v1/v2 and name the checkpoint as the
adapters' base.

Everything runs on the architecture of ``tests/fixtures/llmcompressor_w4a16_asym_actorder_g32`` (vocab 512,
hidden 64, 2 layers), saved with a 512-token byte-level BPE trained here, so the fixture's checkpoint has an
original to pair with.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eora_ft.adapters.peft_bridge import load_adapter, load_pretrained
from eora_ft.cli import main
from eora_ft.compress import make_compressor
from eora_ft.compress.ct_format import export_compressed_tensors
from eora_ft.compress.gptq_format import pack_gptq, unpack_gptq, zero_points
from eora_ft.compress.io import export_gptq, import_gptq, load_compressed, save_compressed
from eora_ft.compress.linear import CompressedLinear, set_module
from eora_ft.compress.packed_reader import compressed_linears
from eora_ft.config import AdapterInitArguments, EoraModelConfig
from eora_ft.init.sequential import compress_model
from eora_ft.run.cache import cache_key
from eora_ft.run.initial_adapter import initial_adapter
from eora_ft.run.precompressed import (
    build_imported_base,
    check_pair,
    describe_checkpoint,
    implied_compression,
    imported_base_key_parts,
    resolve_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "llmcompressor_w4a16_asym_actorder_g32"
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 512


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    previous = torch.get_num_threads()  # tiny models: one thread is fastest on a shared CPU
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_llama():
    """The fixture's original (tests/fixtures/make_llmcompressor_fixture.py: seed 0, rounded to bfloat16 as there;
    its checkpoint dequantizes to within 4-bit error of these weights), in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                         max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).float().eval()


def _tokenizer():
    """A byte-level BPE of 512 tokens trained on a little ARC and C4 text (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line for path in ("eora_ft/assets/data/arc/ARC-Challenge/ARC-Challenge-Train.jsonl",
                               "eora_ft/assets/data/c4/c4_en_train_calib900.jsonl")
             for line in (ROOT / path).read_text().splitlines()[:300]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("original") / "tiny-llama"
    _tiny_llama().save_pretrained(directory)
    tokenizer = _tokenizer()
    assert len(tokenizer) <= VOCAB
    tokenizer.save_pretrained(directory)
    return directory


def _ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _layers(model) -> dict[str, CompressedLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, CompressedLinear)}


def _compressed(bits: int, sym: bool, act_order_layer: str | None = None):
    """The tiny Llama compressed in process by eora_ft's GPTQ (scales rounded to fp16, what a GPTQ checkpoint
    holds); ``act_order_layer`` gets GPTQ's desc_act layout (groups of inputs chosen by a permutation, ``g_idx``)."""
    model = _tiny_llama()
    compress_model(model, _ids(4, 32, 1), make_compressor("gptq", bits=bits, group_size=32, sym=sym), [],
                   target_modules=LINEARS, progress=False)
    for layer in _layers(model).values():
        layer.scales.copy_(layer.scales.half().float())
    if act_order_layer:
        layer = model.get_submodule(act_order_layer)
        codes, _ = layer.codes_in_original_order()
        order = torch.randperm(layer.in_features, generator=torch.Generator().manual_seed(3))
        set_module(model, act_order_layer, CompressedLinear.from_codes(
            codes[order], layer.scales, layer.zeros.long(), bits, 32, (order // 32).int(), None))
        assert model.get_submodule(act_order_layer).perm is not None
    return model


def _factors(modules: dict, init_method: str = "eora") -> dict[str, torch.Tensor]:
    """The initial adapter's tensors, computed as a recipe's init entry does (build_init)."""
    peft = initial_adapter(_tiny_llama(), modules, None, _ids(4, 32, 2), AdapterInitArguments(init_method=init_method),
                           EoraModelConfig(lora_r=4, lora_alpha=4, lora_target_modules=LINEARS), 0, batch_size=2,
                           true_sequential=False, calib_seed=0, save_rewritten_base=lambda model: None,
                           progress=False).peft_model
    return {name: p.detach().clone() for name, p in peft.named_parameters() if "lora_" in name}


WRITERS = {
    "gptq v1 4-bit sym desc_act": (4, True, "model.layers.1.mlp.down_proj",
                                   lambda m, d: export_gptq(m, d, checkpoint_format="gptq")),
    "gptq v2 3-bit asym desc_act": (3, False, "model.layers.0.self_attn.o_proj",
                                    lambda m, d: export_gptq(m, d, checkpoint_format="gptq_v2")),
    "gptq v2 8-bit asym": (8, False, None, lambda m, d: export_gptq(m, d, checkpoint_format="gptq_v2")),
    "compressed-tensors 2-bit asym": (2, False, None, export_compressed_tensors),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_factors_from_an_imported_checkpoint_equal_those_computed_in_process(kind, tmp_path):
    bits, sym, act_order_layer, write = WRITERS[kind]
    model = _compressed(bits, sym, act_order_layer)
    expected = _factors(_layers(model))
    write(model, tmp_path / "checkpoint")
    checkpoint = resolve_checkpoint(str(tmp_path / "checkpoint"))
    meta = build_imported_base(tmp_path / "entry", checkpoint, torch.float32)
    assert meta["calib_tokens"] == 0 and meta["layers"] == [] and meta["compression"].startswith("imported ")
    assert implied_compression(checkpoint.directory) | {"sym": sym} == implied_compression(checkpoint.directory)
    imported = _factors(compressed_linears(tmp_path / "entry" / "base", torch.float32, LINEARS))
    assert imported.keys() == expected.keys() and len(expected) == 2 * 14
    assert all(torch.equal(imported[name], expected[name]) for name in expected), kind


def test_checkpoint_descriptions_come_from_its_config(tmp_path):
    export_gptq(_compressed(4, False, "model.layers.0.mlp.down_proj"), tmp_path / "v2", checkpoint_format="gptq_v2")
    assert describe_checkpoint(tmp_path / "v2") == "imported GPTQ 4-bit g32 asym desc_act (v2)"
    assert implied_compression(tmp_path / "v2") == {"compress_method": "gptq", "bits": 4, "group_size": 32,
                                                    "sym": False, "act_order": True, "damp_percent": 0.01}
    assert describe_checkpoint(FIXTURE) == "imported compressed-tensors W4A16 g32 asym actorder=weight"
    # llm-compressor's recipe.yaml says GPTQModifier made it: re-compressing would use GPTQ on that grid
    assert implied_compression(FIXTURE) == {"compress_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                            "act_order": True}


# ---- GPTQ v1 as GPTQModel writes it ----------------------------------------------------------------------------

def _gptqmodel_v1(zeros: torch.Tensor, bits: int, version: tuple[int, ...]) -> torch.Tensor:
    """GPTQModel's v1 qzeros of ``zeros`` [G, N]: packed as v2, then gptqmodel/utils/model.py
    convert_gptq_v2_to_v1_format_module (word-level subtraction at 2/4/8 bits; at 3 bits per-field from 7.0 on,
    per-column constants before)."""
    n = zeros.shape[1]
    if bits == 3 and version >= (7, 0):
        return pack_gptq(((zeros - 1) % 8).t(), 3).t().contiguous()
    words = pack_gptq(zeros.t(), bits).t().to(torch.int64) & 0xFFFFFFFF
    if bits == 3:
        ones = torch.tensor([0b00100100100100100100100100100100, 0b10010010010010010010010010010010,
                             0b01001001001001001001001001001001]).repeat(n // 32)
    else:
        ones = torch.tensor({2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[bits])
    words = (words - ones) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


@pytest.mark.parametrize("bits,version", [(2, (4, 0)), (3, (7, 2)), (3, (5, 1)), (4, (1, 0)), (8, (7, 0))])
def test_gptqmodel_v1_zero_points_read_back_exactly(bits, version):
    zeros = torch.randint(0, 2**bits, (4, 64), generator=torch.Generator().manual_seed(bits))
    zeros[:, ::5] = 0  # every borrow GPTQModel's word-level subtraction makes
    qzeros = _gptqmodel_v1(zeros, bits, version)
    assert torch.equal(zero_points(qzeros, bits, 64, "gptq", ("gptqmodel", version)), zeros)
    # a writer that does not name itself is read per field, as the classic kernels do: different here
    if bits == 8:  # a field of 255 read per field would be zero point 256
        with pytest.raises(ValueError, match="zero point 256"):
            zero_points(qzeros, bits, 64, "gptq", None)
    else:
        with pytest.warns(UserWarning, match=f"loaded as zero point {2**bits}"):
            assert not torch.equal(zero_points(qzeros, bits, 64, "gptq", None), zeros)
    ones = zeros.clamp(min=1)  # no zero point of 0: every v1 reading agrees (AutoGPTQ, eora_ft, GPTQModel)
    assert torch.equal(zero_points(pack_gptq((ones - 1).t(), bits).t(), bits, 64, "gptq", None), ones)
    assert torch.equal(zero_points(_gptqmodel_v1(ones, bits, version), bits, 64, "gptq", ("gptqmodel", version)), ones)


def test_a_gptqmodel_v1_checkpoint_imports_to_its_zero_points(tmp_path):
    model = _compressed(4, False)
    model.model.layers[1].mlp.up_proj.zeros[0, :9] = 0
    export_gptq(model, tmp_path / "g", checkpoint_format="gptq_v2")
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(".qzeros")]:
        zeros = unpack_gptq(tensors[key].t(), 4, tensors[key].shape[1] * 8).t()
        tensors[key] = _gptqmodel_v1(zeros, 4, (5, 0))
    save_file(tensors, str(tmp_path / "g" / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "quantize_config.json"):
        config = json.loads((tmp_path / "g" / name).read_text())
        quant = config.get("quantization_config", config)
        quant.update(format="gptq", checkpoint_format="gptq", meta={"quantizer": ["gptqmodel:5.0.0"]})
        (tmp_path / "g" / name).write_text(json.dumps(config))
    imported = _layers(import_gptq(tmp_path / "g"))
    assert all(torch.equal(imported[p].zeros, layer.zeros) for p, layer in _layers(model).items())


def test_an_autogptq_era_checkpoint_imports(original, tmp_path):
    """AutoGPTQ: ``quantize_config.json`` only (no ``quantization_config`` in config.json, no checkpoint_format or
    meta), weights in ``gptq_model-4bit-32g.safetensors``; v1 zero points read per field."""
    model = _compressed(4, True, "model.layers.0.mlp.down_proj")
    export_gptq(model, tmp_path / "g", checkpoint_format="gptq")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    (tmp_path / "g" / "quantize_config.json").write_text(json.dumps({
        "bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": True, "static_groups": False, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "gptq_model-4bit-32g"}))
    (tmp_path / "g" / "model.safetensors").rename(tmp_path / "g" / "gptq_model-4bit-32g.safetensors")
    checkpoint = resolve_checkpoint(str(tmp_path / "g"))
    assert checkpoint.format == "gptq"
    assert describe_checkpoint(tmp_path / "g") == "imported GPTQ 4-bit g32 sym desc_act (v1)"
    check_pair(original, checkpoint, LINEARS)
    imported = _layers(import_gptq(tmp_path / "g"))
    assert all(torch.equal(imported[p].qweight, layer.qweight) and torch.equal(imported[p].zeros, layer.zeros)
               for p, layer in _layers(model).items())


# ---- a checkpoint of another model is refused, naming the first difference -----------------------------------

def test_check_pair_names_the_first_difference(original, tmp_path):
    from transformers import AutoConfig, MistralConfig

    export_gptq(_compressed(4, False), tmp_path / "g", checkpoint_format="gptq_v2")
    check_pair(original, tmp_path / "g", LINEARS)  # the pair belongs together
    check_pair(_tiny_llama(), tmp_path / "g", None)  # a model works as well as its path (all-linear)
    config = AutoConfig.from_pretrained(original)
    narrower = copy.deepcopy(config)
    narrower.intermediate_size = 96
    with pytest.raises(ValueError, match=r"intermediate_size: compressed 128 vs original 96 \(the first difference"):
        check_pair(narrower, tmp_path / "g", LINEARS)
    with pytest.raises(ValueError, match=r"model_type: compressed 'llama' vs original 'mistral'"):
        check_pair(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, head_dim=32), tmp_path / "g", LINEARS)
    # a linear whose shape differs though the configs agree (layer 1's down_proj made for K = 64)
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    path = "model.layers.1.mlp.down_proj"
    tensors[f"{path}.qweight"] = tensors[f"{path}.qweight"][:8].contiguous()
    tensors[f"{path}.qzeros"], tensors[f"{path}.scales"] = tensors[f"{path}.qzeros"][:2], tensors[f"{path}.scales"][:2]
    tensors[f"{path}.g_idx"] = tensors[f"{path}.g_idx"][:64]
    save_file(tensors, str(tmp_path / "g" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{path}: compressed \[64, 64\] vs original \[64, 128\]"):
        check_pair(original, tmp_path / "g", LINEARS)
    check_pair(original, tmp_path / "g", ["q_proj"])  # only the targets are checked
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: not compressed in the checkpoint \(a dense "
                                         r"\[64, 64\] weight there\): leave it out of lora_target_modules"):
        check_pair(original, _without(tmp_path, "q_proj"), LINEARS)


def _without(tmp_path: Path, name: str) -> Path:
    """A GPTQ checkpoint whose ``name`` linears are left dense (as GPTQModel leaves a router)."""
    model = _compressed(4, False)
    for path, layer in _layers(model).items():
        if path.endswith(name):
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
            dense.weight.data.copy_(layer.dequantize())
            set_module(model, path, dense)
    export_gptq(model, tmp_path / f"without-{name}", checkpoint_format="gptq_v2")
    return tmp_path / f"without-{name}"


def test_a_recipe_refuses_a_mismatched_checkpoint_before_loading_the_model(original, tmp_path, monkeypatch):
    from eora_ft.config import parse_recipe_args
    from eora_ft.run import pipeline

    export_gptq(_compressed(4, False), tmp_path / "g", checkpoint_format="gptq_v2")
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    path = "model.layers.1.self_attn.k_proj"  # [64, 64] stored as [32, 64]: the first target that differs
    tensors[f"{path}.qweight"] = tensors[f"{path}.qweight"][:4].contiguous()
    tensors[f"{path}.qzeros"], tensors[f"{path}.scales"] = tensors[f"{path}.qzeros"][:1], tensors[f"{path}.scales"][:1]
    tensors[f"{path}.g_idx"] = tensors[f"{path}.g_idx"][:32]
    tensors["model.layers.1.mlp.down_proj.qweight"] = tensors["model.layers.1.mlp.down_proj.qweight"][:8].contiguous()
    save_file(tensors, str(tmp_path / "g" / "model.safetensors"), metadata={"format": "pt"})

    def tripwire(*args, **kwargs):
        raise AssertionError("the original model was loaded before the pair was checked")

    monkeypatch.setattr(pipeline, "load_model", tripwire)
    monkeypatch.setattr(pipeline, "train_adapters", tripwire)
    args = parse_recipe_args(["--config", str(ROOT / "recipes/configs/arc_nano_gptq2_eora.yaml"),
                              "--model_name_or_path", str(original), "--compressed_model_name_or_path",
                              str(tmp_path / "g"), "--output_dir", str(tmp_path / "out"), "--cache_dir",
                              str(tmp_path / "cache"), "--report_to", "none", "--calib_seq_len", "64",
                              "--ppl_window", "64", "--max_length", "128"])
    with pytest.raises(ValueError, match=rf"{path}: compressed \[64, 32\] vs original \[64, 64\] \(the first"):
        pipeline.run(*args)
    with pytest.raises(ValueError, match=r"init_method='loftq' re-compresses.*bits: 4, group_size: 32, sym: false"):
        pipeline.run(*parse_recipe_args(["--config", str(ROOT / "recipes/configs/arc_nano_gptq2_eora.yaml"),
                                         "--model_name_or_path", str(original), "--compressed_model_name_or_path",
                                         str(FIXTURE), "--init_method", "loftq", "--output_dir", str(tmp_path / "o2"),
                                         "--cache_dir", str(tmp_path / "cache"), "--report_to", "none",
                                         "--calib_seq_len", "64", "--ppl_window", "64", "--max_length", "128"]))


def test_a_missing_checkpoint_is_named():
    with pytest.raises(FileNotFoundError, match=r"compressed_model_name_or_path './no/such/dir' does not exist"):
        resolve_checkpoint("./no/such/dir")
    with pytest.raises(FileNotFoundError, match=r"'someone/not-cached' is neither a local directory nor in the local"):
        resolve_checkpoint("someone/not-cached")
    with pytest.raises(ValueError, match=r"is not a compressed checkpoint eora_ft reads"):
        resolve_checkpoint(str(ROOT / "eora_ft/assets/models/nano-llama-5m"))


def _cached_hub_fixture(tmp_path, monkeypatch) -> tuple[str, Path]:
    """The llm-compressor fixture as hub repo ``someone/tiny-w4a16`` in a local Hugging Face cache under ``tmp_path``:
    ``(commit, repo directory)``."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-w4a16"
    shutil.copytree(FIXTURE, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    return commit, repo


def test_a_hub_id_is_read_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """Offline, a hub id resolves to its snapshot in the local cache; adapters name the id, not the snapshot."""
    commit, repo = _cached_hub_fixture(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = resolve_checkpoint("someone/tiny-w4a16")
    assert checkpoint.name == "someone/tiny-w4a16" and checkpoint.commit == commit
    assert checkpoint.directory == repo / "snapshots" / commit and checkpoint.format == "compressed-tensors"
    parts = imported_base_key_parts(checkpoint, str(FIXTURE), torch.float32, LINEARS)
    assert parts["imported"] == {"commit": commit}  # a hub snapshot is keyed by its commit


# ---- the cache keys on the checkpoint's files ------------------------------------------------------------------

def test_the_base_key_changes_with_the_checkpoint_files(original, tmp_path):
    export_gptq(_compressed(4, False), tmp_path / "g", checkpoint_format="gptq_v2")

    def key(checkpoint_dir=tmp_path / "g", targets=LINEARS, original_dir=original):
        return cache_key(imported_base_key_parts(resolve_checkpoint(str(checkpoint_dir)), str(original_dir),
                                                 torch.float32, targets))

    first = key()
    (tmp_path / "g" / "model.safetensors").touch()  # a new time stamp, the same bytes
    assert key() == first
    import shutil

    shutil.copytree(tmp_path / "g", tmp_path / "copy")  # another place, the same files: the same entry
    assert key(tmp_path / "copy") == first
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.scales"][0, 0] *= 2
    save_file(tensors, str(tmp_path / "g" / "model.safetensors"), metadata={"format": "pt"})
    assert key() != first
    assert key(tmp_path / "copy", ["q_proj"]) != first
    shutil.copytree(original, tmp_path / "other-original")
    (tmp_path / "other-original" / "generation_config.json").write_text("{}")  # the init corrects W - W_c
    assert key(tmp_path / "copy", original_dir=tmp_path / "other-original") != first


# ---- eora-ft init --compressed_model <GPTQ v2> --original_model ... -------------------------------------------

CLI_SMALL = ["--calib_num_samples", "2", "--calib_seq_len", "64", "--lora_r", "4", "--lora_alpha", "4"]


def test_eora_ft_init_reads_a_gptq_v2_checkpoint_like_its_own_format(original, tmp_path):
    model = _compressed(4, False, "model.layers.1.mlp.down_proj")
    export_gptq(model, tmp_path / "g", checkpoint_format="gptq_v2")
    save_compressed(model, tmp_path / "ours", {"method": "gptq"})
    for source in ("g", "ours"):
        assert main(["init", "--compressed_model", str(tmp_path / source), "--original_model", str(original),
                     *CLI_SMALL, "--output_dir", str(tmp_path / f"adapter-{source}")]) == 0
    config = json.loads((tmp_path / "adapter-g" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "g").resolve())  # the checkpoint, not a copy
    ours, theirs = (load_file(str(tmp_path / f"adapter-{s}" / "adapter_model.safetensors")) for s in ("ours", "g"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the imported copy was removed"
    ids = _ids(2, 16, 9)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "adapter-g")(input_ids=ids).logits,
                           load_adapter(import_gptq(tmp_path / "g"), tmp_path / "adapter-g")(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"does not record the model it was compressed from: pass --original_model"):
        main(["init", "--compressed_model", str(tmp_path / "g"), *CLI_SMALL, "--output_dir", str(tmp_path / "x")])
    for rebasing in ("eora_alt", "pissa"):  # the refusal names the initializers that keep the checkpoint
        with pytest.raises(ValueError, match=rf"init_method='{rebasing}' re-compresses.*use one of \['act_diag', "
                                             r"'eora', 'qlora', 'svd'\]"):
            main(["init", "--compressed_model", str(tmp_path / "g"), "--original_model", str(original),
                  "--init_method", rebasing, *CLI_SMALL, "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# ---- whole recipes on someone else's checkpoint ----------------------------------------------------------------

RECIPE = ["--max_steps", "1", "--logging_steps", "1", "--train_limit", "16", "--eval_limit", "4",
          "--per_device_train_batch_size", "4", "--eval_base", "false", "--calib_num_samples", "4",
          "--calib_seq_len", "64", "--ppl_dataset", "eora_ft/assets/data/enwiki_heldout/wiki_49.txt",
          "--ppl_window", "64", "--ppl_max_windows", "1", "--max_length", "128", "--lora_r", "8", "--lora_alpha", "8"]


def _gptq_checkpoint(directory: Path, checkpoint_format: str) -> Path:
    export_gptq(_compressed(4, checkpoint_format == "gptq", "model.layers.1.mlp.down_proj"), directory,
                checkpoint_format=checkpoint_format)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llm-compressor", "gptq", "gptq_v2"])
def test_a_recipe_fine_tunes_on_a_precompressed_checkpoint_and_names_it(kind, original, tmp_path):
    from tests.recipes._runs import DEMO, base_env, run

    from eora_ft.run.artifacts import base_directory

    checkpoint = FIXTURE if kind == "llm-compressor" else _gptq_checkpoint(tmp_path / kind, kind)
    out = tmp_path / "run"
    run([sys.executable, "recipes/arc.py", "--config", DEMO, "--output_dir", str(out), "--report_to", "none",
         "--model_name_or_path", str(original), "--compressed_model_name_or_path", str(checkpoint), *RECIPE],
        base_env(OMP_NUM_THREADS="2"), timeout=600)
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == ["compressed", "compensated", "finetuned"]
    assert results["summary"]["calibration tokens"] == 0  # nothing was compressed
    fmt = resolve_checkpoint(str(checkpoint)).format
    assert results["summary"]["adapter base"] == f"{checkpoint.resolve()} ({fmt})"
    assert results["summary"]["train steps"] == 1 and len(results["layers"]) == 14
    # EoRA, fitted on the pair, lowers every linear's activation-weighted error
    assert all(row["rel_out_err/eora"] < row["rel_out_err/compressed"] for row in results["layers"])
    for adapter in ("adapter", "eora_init"):
        named = json.loads((out / adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert named == str(checkpoint.resolve())
    assert not (out / "base").exists(), "nothing is exported: the adapters name the user's checkpoint"
    entry = base_directory(Path(results["summary"]["init entry"]))
    assert json.loads((entry / "compression_config.json").read_text())["description"] == describe_checkpoint(checkpoint)
    ids = _ids(2, 16, 4)
    with torch.no_grad():  # the adapter on the checkpoint as others load it is the model the run trained
        assert torch.equal(load_pretrained(out / "adapter")(input_ids=ids).logits,
                           load_adapter(load_compressed(entry), out / "adapter")(input_ids=ids).logits)


def test_an_adapter_naming_a_cached_hub_checkpoint_loads_it_through_our_importer(tmp_path, monkeypatch):
    """load_pretrained(adapter) whose base is a hub id of a compressed checkpoint: the snapshot is read by eora_ft's
    importer (as the run that trained it did), not handed to from_pretrained."""
    from eora_ft.adapters.peft_bridge import build_lora_model, lora_config, save_adapter
    from eora_ft.compress.formats import import_model

    commit, repo = _cached_hub_fixture(tmp_path, monkeypatch)
    torch.manual_seed(0)
    peft_model = build_lora_model(import_model(FIXTURE), None, lora_config(4, 8, 0.0, LINEARS))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # a non-zero correction, so the logits tell whether it was applied
            torch.nn.init.normal_(param, std=0.02)
    save_adapter(peft_model, tmp_path / "adapter", "someone/tiny-w4a16", revision=commit)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["revision"] == commit
    (repo / "refs" / "main").write_text("f" * 40)  # the repo moved on: the adapter still reads its own commit
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "adapter")(input_ids=ids).logits,
                           peft_model.eval()(input_ids=ids).logits)


def test_a_checkpoint_of_another_model_with_the_same_shapes_is_refused(tmp_path):
    """A base vs its instruction tune: same shapes, other weights. The norms a compressor copies through tell."""
    from eora_ft.run.precompressed import check_same_weights

    export_gptq(_compressed(4, False), tmp_path / "g", checkpoint_format="gptq_v2")
    checkpoint = resolve_checkpoint(str(tmp_path / "g"))
    original = _tiny_llama()
    check_same_weights(original, checkpoint)  # the model it was made from passes
    tuned = _tiny_llama()
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 1:
                param.mul_(1.01)
    with pytest.raises(ValueError, match=r"was not compressed from model_name_or_path .*norm.weight differs"):
        check_same_weights(tuned, checkpoint)
