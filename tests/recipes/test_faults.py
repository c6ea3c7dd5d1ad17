"""Faults a real run meets, injected into the real recipe: nothing is lost or left half-written.

Each fault kills (SIGKILL, through tests/recipes/fault_run.py) or breaks a run at one point, then the
test checks what is on disk and that running the same command again finishes with the right result.
"""

import json
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from eora_ft.run.cache import check_entry
from tests.recipes._runs import DEMO, ROOT, SMALL, base_env, free_port, losses, run

pytestmark = pytest.mark.slow
# The smallest run that still compresses, initialises, trains, evaluates and saves.
FAST = ["--no_eval_base", "--eval_limit", "4", "--ppl_max_windows", "1", "--no_ppl_after_finetune",
        "--ppl_dataset", "eora_ft/assets/data/enwiki_heldout/wiki_49.txt"]


def _cmd(out, cache, *extra):
    return ["recipes/arc.py", "--config", DEMO, "--output_dir", str(out), "--cache_dir", str(cache), *SMALL, *FAST,
            "--per_device_train_batch_size", "8", *extra]


def _killed(target: str, call: int, path_arg: str, cmd: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, "tests/recipes/fault_run.py", target, str(call), str(path_arg), *cmd],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert f"fault_run: SIGKILL at call {call} of {target}" in proc.stderr
    return proc.stderr


def _entries(cache):
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _leftovers(cache):
    return sorted(p.name for p in cache.iterdir() if ".tmp-" in p.name)


def test_cache_survives_kills_mid_compression_and_mid_write_and_flipped_bytes(tmp_path):
    env, cache, out = base_env(OMP_NUM_THREADS="2"), tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, *_cmd(out, cache)]

    # 1. killed while compressing its third linear: no entry, no results
    _killed("eora_ft.compress.gptq:GPTQ.compress", 3, "-", cmd[1:], env)
    assert _entries(cache) == [] and len(_leftovers(cache)) == 1
    assert not (out / "results.json").exists()

    # 2. killed while the compressed base's safetensors file is half written: still no entry
    _killed("eora_ft.compress.io:save_file", 1, "1", cmd[1:], env)
    assert _entries(cache) == [] and len(_leftovers(cache)) == 1  # the first remains were swept under the lock

    # 3. the same command again: sweeps the remains, builds both entries whole
    proc = run(cmd, env)
    assert "the remains of a build of this entry that was killed" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["artifact cache"] == "base: built, init: built"
    assert len(_entries(cache)) == 2 and all(check_entry(entry) is None for entry in _entries(cache))
    assert _leftovers(cache) == []

    # 4. one flipped byte in the cached base: detected by its sha256, said, rebuilt, same result
    base_entry = cache / json.loads((_entries_by_kind(cache)["init"] / "meta.json").read_text())["base_entry"]
    weights = base_entry / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = run(cmd, env)
    assert "does not match its sha256): rebuilding it" in proc.stderr
    again = json.loads((out / "results.json").read_text())
    assert again["summary"]["artifact cache"] == "base: built, init: hit"
    assert losses(again) == pytest.approx(losses(results), rel=1e-6)
    assert check_entry(base_entry) is None


def _entries_by_kind(cache) -> dict:
    return {"init" if "base_entry" in json.loads((e / "meta.json").read_text()) else "base": e for e in _entries(cache)}


def test_kill_during_adapter_save_keeps_the_previous_adapter_and_results(tmp_path):
    env, cache, out = base_env(OMP_NUM_THREADS="2"), tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, *_cmd(out, cache)]
    run(cmd, env)
    before = {name: (out / name).read_bytes() for name in ("results.json", "results.md",
                                                           "adapter/adapter_model.safetensors",
                                                           "adapter/adapter_config.json")}
    # a second run into the same output_dir, killed half way through writing adapter/ (its second
    # adapter save: eora_init/ is the first)
    _killed("peft.peft_model:safe_save_file", 2, "1", [*_cmd(out, cache, "--seed", "1")], env)
    for name, content in before.items():
        assert (out / name).read_bytes() == content, f"{name} changed"
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.isfinite().all() for t in adapter.values())
    # the rerun replaces the old adapter whole and leaves no temp directory behind
    run([sys.executable, *_cmd(out, cache, "--seed", "1")], env)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != before["adapter/adapter_model.safetensors"]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


DS_STEPS = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The 4-step run without DeepSpeed: ZeRO moves state, not math (ZeRO-2, ZeRO-3 and one process agree to
    ~2e-7 in tests/recipes/test_deepspeed.py), so one reference serves both stages."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run([sys.executable, *_cmd(out / "run", out / "cache", *DS_STEPS)], base_env(OMP_NUM_THREADS="2"))
    return json.loads((out / "run" / "results.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_killed_mid_write_resumes_to_the_uninterrupted_losses(stage, tmp_path, uninterrupted):
    env = base_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage),
                   ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1",
                   LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="2")
    cache, out = tmp_path / "cache", tmp_path / "interrupted"  # a cold cache: built under the ZeRO launch
    # DeepSpeed writes each checkpoint as model states + ZeRO optimizer shards (one torch.save each): the
    # third save is the first file of checkpoint-4
    _killed("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine:TorchCheckpointEngine.save", 3, "path",
            _cmd(out, cache, *DS_STEPS), env)
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert not (out / "results.json").exists()

    proc = run([sys.executable, *_cmd(out, cache, *DS_STEPS)], env)
    assert "skipping" in proc.stderr and f"resuming from {out / 'checkpoint-2'}" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["training backend"] == f"deepspeed zero-{stage} x1"
    assert [e["step"] for e in results["train_loss"]] == [1, 2, 3, 4]
    assert losses(results) == pytest.approx(losses(uninterrupted), rel=1e-5)


def test_fsdp2_checkpoint_killed_mid_write_resumes_to_the_uninterrupted_losses(tmp_path, uninterrupted):
    """One FSDP2 rank over gloo (the environment accelerate_configs/fsdp2.yaml sets). Its checkpoints are
    torch.distributed.checkpoint directories, each finished by a .metadata file written after the shards; the
    kill lands before checkpoint-4's model metadata (its third write: checkpoint-2's model and optimizer are the
    first two), so checkpoint-4 holds shards that cannot be read and no trainer_state.json."""
    from tests.train._launch import FSDP2_ENV

    env = base_env(**FSDP2_ENV, LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="2")
    cache, out = tmp_path / "cache", tmp_path / "interrupted"
    _killed("torch.distributed.checkpoint.filesystem:_FileSystemWriter.finish", 3, "-", _cmd(out, cache, *DS_STEPS),
            env)
    shards = out / "checkpoint-4" / "pytorch_model_fsdp_0"
    assert any(shards.glob("*.distcp")) and not (shards / ".metadata").exists()
    assert not (out / "checkpoint-4" / "trainer_state.json").exists() and not (out / "results.json").exists()

    proc = run([sys.executable, *_cmd(out, cache, *DS_STEPS)], env)
    assert "skipping" in proc.stderr and f"resuming from {out / 'checkpoint-2'}" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["training backend"] == "fsdp2 x1"
    assert [e["step"] for e in results["train_loss"]] == [1, 2, 3, 4]
    assert losses(results) == pytest.approx(losses(uninterrupted), rel=1e-5)
    assert results["stages"]["finetuned"] == pytest.approx(uninterrupted["stages"]["finetuned"], rel=1e-5)
