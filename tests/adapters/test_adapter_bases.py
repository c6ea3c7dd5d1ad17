"""Every writer of an adapter names the base it was computed for, and ``load_pretrained`` rebuilds exactly the
model the writer meant: the same logits as the right compressed base with the adapter on top.

An adapter of a compressed model corrects ``W - W_c``; named after the uncompressed model it would be
applied on top of ``W`` and be silently wrong (issue #32: held-out ppl 118.92 instead of 122.81). The
writers: ``eora-ft init`` (computed, rewritten base, existing adapter), a recipe's init cache entry
(computed, refined, rank budget, LoftQ's own base, an existing adapter, the uncompressed ceiling) and the
recipe's ``<init>_init``/``adapter`` (``tests/recipes/test_arc_e2e.py`` loads those the same way). A test
below fails when a new call of ``save_adapter`` appears that this file does not cover.
"""

import ast
import copy
import json
from pathlib import Path

import pytest
import torch

from eora_ft.adapters.peft_bridge import load_adapter, load_pretrained
from eora_ft.cli import main
from eora_ft.compress.io import load_compressed

ROOT = Path(__file__).resolve().parents[2]
NANO = ROOT / "eora_ft" / "assets" / "models" / "nano-llama-5m"
SMALL = ["--calib_num_samples", "2", "--calib_seq_len", "64"]
TARGETS = ["q_proj", "down_proj"]  # two linears per layer: every writer's path, at a third of the work
IDS = torch.randint(1, 8192, (2, 24), generator=torch.Generator().manual_seed(7))
# (file, function) of every save_adapter call, each exercised below or in tests/recipes/test_arc_e2e.py; the merge's
# residual adapter (naming the merged base, loaded back over it) in tests/cli/test_merge_cli.py
WRITERS = {("eora_ft/cli/init.py", "init_command"), ("eora_ft/run/artifacts.py", "build_init"),
           ("eora_ft/run/artifacts.py", "_copy_adapter"), ("eora_ft/run/pipeline.py", "run"),
           ("eora_ft/run/merge_run.py", "merge_directory")}


def _named_base(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _assert_loads_as(adapter: Path, base: Path, reference) -> None:
    """``adapter`` names ``base`` and ``load_pretrained`` gives ``reference``'s logits, which differ from the
    uncompressed model + adapter (what a wrong name would silently load)."""
    assert Path(_named_base(adapter)) == base.resolve()
    expected = _logits(reference)
    assert torch.equal(_logits(load_pretrained(adapter)), expected)
    from transformers import AutoModelForCausalLM

    on_dense = load_adapter(AutoModelForCausalLM.from_pretrained(NANO, dtype=torch.float32), adapter)
    assert not torch.allclose(_logits(on_dense), expected, atol=1e-3)  # the test can tell the bases apart


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bases") / "nano-gptq2"
    assert main(["compress", "--model_name_or_path", str(NANO), "--compress_method", "gptq", "--bits", "2", *SMALL,
                 "--output_dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("method", ["eora", "loftq"])
def test_eora_ft_init_names_the_compressed_base(compressed, tmp_path, method):
    out = tmp_path / f"init-{method}"
    assert main(["init", "--compressed_model", str(compressed), "--init_method", method, "--lora_r", "4",
                 "--loftq_iters", "2", "--lora_target_modules", *TARGETS, *SMALL, "--output_dir", str(out)]) == 0
    base = out / "base" if method == "loftq" else compressed
    _assert_loads_as(out, base, load_adapter(load_compressed(base), out))
    assert not list(tmp_path.glob(".*")), "the rewritten base was moved into the adapter, nothing left beside it"


def test_eora_ft_init_from_an_existing_adapter_names_the_base_it_was_checked_against(compressed, tmp_path):
    source = tmp_path / "source"
    assert main(["init", "--compressed_model", str(compressed), "--lora_r", "4", "--lora_target_modules", *TARGETS,
                 *SMALL, "--output_dir", str(source)]) == 0
    (source / "adapter_config.json").write_text(json.dumps(
        json.loads((source / "adapter_config.json").read_text()) | {"base_model_name_or_path": "someone/else"}))
    out = tmp_path / "copied"
    assert main(["init", "--compressed_model", str(compressed), "--init_from_adapter", str(source),
                 "--output_dir", str(out)]) == 0
    _assert_loads_as(out, compressed, load_adapter(load_compressed(compressed), source))


# ---- a recipe's init cache entries -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def entries(nano_model_and_tokenizer, tmp_path_factory):
    """``build_entry(compress_args, init_args)`` -> (base entry, init entry) in one module-wide cache."""
    from eora_ft.config import EoraModelConfig
    from eora_ft.run.artifacts import base_key_parts, build_base, build_init, init_key_parts
    from eora_ft.run.cache import cache_key, ensure_entry

    model, tokenizer = nano_model_and_tokenizer
    root = tmp_path_factory.mktemp("cache")
    model_args = EoraModelConfig(model_name_or_path=str(NANO), lora_r=4, lora_alpha=8, lora_target_modules=TARGETS)
    generator = torch.Generator().manual_seed(0)
    calib, adapter_calib = (torch.randint(0, 8192, (4, 64), generator=generator) for _ in range(2))

    def build_entry(compress_args, init_args):
        tokens = None if compress_args.compress_method == "none" else calib
        base_key = cache_key(base_key_parts(model, model_args, compress_args, tokens, str(NANO)))
        base_entry, _ = ensure_entry(root, base_key, lambda tmp: build_base(
            tmp, copy.deepcopy(model), tokenizer, tokens, model_args, compress_args, progress=False))
        init_tokens = None if init_args.init_from_adapter else adapter_calib
        key = cache_key(init_key_parts(base_key, model_args, init_args, init_tokens, 0))
        entry, _ = ensure_entry(root, key, lambda tmp: build_init(
            tmp, base_entry, lambda: copy.deepcopy(model), tokenizer, init_tokens, model_args, compress_args,
            init_args, 0, progress=False, entry=root / key))
        return base_entry, entry
    return build_entry


@pytest.mark.parametrize("init", [{"init_method": "eora"}, {"init_method": "loftq", "loftq_iters": 2},
                                  {"init_method": "eora", "refine_steps": 3},
                                  {"init_method": "eora", "rank_allocation": "budget"}],
                         ids=["eora", "loftq", "refined", "rank-budget"])
def test_cache_entries_name_their_base(entries, init):
    from eora_ft.config import AdapterInitArguments, CompressionArguments
    from eora_ft.run.artifacts import base_directory, load_artifacts

    base_entry, entry = entries(CompressionArguments(compress_method="gptq", bits=2, group_size=64),
                                AdapterInitArguments(**init))
    base = base_directory(entry)
    assert base == (entry / "base" if init["init_method"] == "loftq" else base_entry / "base")
    _assert_loads_as(entry / "init", base, load_artifacts(entry, torch.float32, "cpu", trainable=False))


def test_a_cache_entry_of_an_existing_adapter_names_its_base(entries, tmp_path):
    from eora_ft.config import AdapterInitArguments, CompressionArguments
    from eora_ft.run.artifacts import load_artifacts

    gptq = CompressionArguments(compress_method="gptq", bits=2, group_size=64)
    base_entry, source = entries(gptq, AdapterInitArguments(init_method="svd"))
    _, entry = entries(gptq, AdapterInitArguments(init_from_adapter=str(source / "init")))
    _assert_loads_as(entry / "init", base_entry / "base", load_artifacts(entry, torch.float32, "cpu", trainable=False))


def test_the_uncompressed_ceiling_names_the_original_model(entries):
    from eora_ft.config import AdapterInitArguments, CompressionArguments
    from eora_ft.run.artifacts import load_artifacts

    _, entry = entries(CompressionArguments(compress_method="none"), AdapterInitArguments(init_method="qlora"))
    assert Path(_named_base(entry / "init")) == NANO.resolve()
    assert torch.equal(_logits(load_pretrained(entry / "init")),
                       _logits(load_artifacts(entry, torch.float32, "cpu", trainable=False)))


def test_every_writer_of_an_adapter_is_covered():
    """A new ``save_adapter`` call must join WRITERS (and get a test above); PEFT's ``save_pretrained`` is called
    only inside ``save_adapter``, which requires the base's name."""
    calls, raw = set(), set()
    for path in sorted((ROOT / "eora_ft").rglob("*.py")):
        tree = ast.parse(path.read_text())
        tops = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        tops += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, ast.FunctionDef)]
        for function in tops:  # a call in a nested helper counts for the top-level function holding it
            for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
                name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
                where = (str(path.relative_to(ROOT)), function.name)
                if name == "save_adapter":
                    calls.add(where)
                elif name == "save_pretrained" and "peft" in ast.unparse(call.func.value).lower():
                    raw.add(where)
    assert calls == WRITERS, calls
    assert raw == {("eora_ft/adapters/peft_bridge.py", "save_adapter")}, raw
