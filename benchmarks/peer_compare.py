"""Our GPTQ / SparseGPT against llm-compressor's, on the same model and the same calibration tokens.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peer_compare.py \
        --settings gptq/4/128 gptq/3/128 gptq/2/128 sparsegpt/2:4

Prints one JSON object per row and a markdown table (setting, tool, compression wall seconds (median of
``--repeats`` fresh runs, tools interleaved setting by setting), peak host
memory, perplexity on held-out in-domain Wikipedia and on WikiText-2), and writes the rows as JSON lines to
``--output``. ``--tools ours`` needs no llm-compressor (CI runs it that way).

llm-compressor lives in its own virtual environment (``--peer-venv``; it caps transformers below ours),
created on first use with ``pip install torch==<our torch>`` then ``llmcompressor==0.14.0.1``, reused after.
Every (tool, setting) runs in a fresh subprocess, so its peak RSS is its own (VmHWM: Linux carries
``ru_maxrss`` over ``execve`` from this parent); the peak after loading model + tokens, before compressing,
is reported too. Each worker saves its whole state dict in fp32 with the compressed weights dequantized;
this process checks each target linear really lies on a 2**bits grid per row and group (or keeps at most
n of every m), that nothing else changed, and scores both tools with the same ``eora_ft.eval.scoring.perplexity``.

Equal between the tools: the model (fp32), the calibration tokens (built once with
``eora_ft.data.calibration_tokens``, passed to llm-compressor already tokenized: no BOS, no attention mask,
no shuffling, batches of 8 sequences like ours), the targets (the decoder's linears, not lm_head), bits,
group size, asymmetric min-max grid (``/sym``, ``/mse``, ``/damp=F``, ``/act`` map to its equivalents),
damping 0.01 of the mean Hessian diagonal, block size 128,
act-order off (llm-compressor's default is "static": set to None here), layer-by-layer calibration where
each layer sees the compressed prefix (llm-compressor's "sequential" pipeline, its default for GPTQ and
SparseGPT). Different: we re-collect statistics inside a layer after q/k/v, after o and after gate/up
(true-sequential), llm-compressor calibrates a whole layer at once; we choose each group's grid when the
sweep reaches it (the reference GPTQ), llm-compressor chooses all grids from the unmodified weight before
the sweep; our inverse Hessian is factored in fp64, its in fp32; our timing includes packing the weights
and the output-error report, llm-compressor's includes its model tracing and hooks.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEER_VERSION = "0.14.0.1"
ENWIKI = "eora_ft/assets/data/enwiki_heldout/wiki_49.txt"
WIKITEXT = "eora_ft/assets/data/wikitext2/wikitext-2-raw-v1.test.joined.txt"
C4 = "eora_ft/assets/data/c4/c4_en_train_calib900.jsonl"
DEFAULT_SETTINGS = ["gptq/4/128", "gptq/3/128", "gptq/2/128", "sparsegpt/2:4"]
CALIB_BATCH = 8  # compress_model's default batch; llm-compressor gets the same
COLUMNS = ["setting", "tool", "seconds", "peak_rss_gib", "loaded_rss_gib", "ppl_enwiki", "ppl_wikitext2"]


def max_rss_gib() -> float:
    """Peak resident set of this process image, GiB. Linux keeps ``ru_maxrss`` across ``execve``, so a worker
    started by this (model-holding) process would inherit its peak: read the image's own ``VmHWM`` instead."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_compressed(weight: torch.Tensor, bits: int | None = None, group_size: int = 128,
                     n: int = 0, m: int = 0) -> None:
    """Raise ValueError unless ``weight`` [N, K] has at most 2**bits distinct values per row and group
    and (for n:m) at most ``n`` nonzeros in every ``m`` consecutive inputs of a row."""
    rows, k = weight.shape
    if bits:
        group = k if group_size == -1 else group_size
        values = weight.reshape(rows, k // group, group).sort(dim=-1).values
        distinct = (values.diff(dim=-1) != 0).sum(dim=-1) + 1
        if int(distinct.max()) > 2**bits:
            raise ValueError(f"{int(distinct.max())} distinct values in a group of {group}: not {bits}-bit")
    if m:
        nonzeros = (weight.reshape(rows, k // m, m) != 0).sum(dim=-1)
        if int(nonzeros.max()) > n:
            raise ValueError(f"{int(nonzeros.max())} nonzeros in a group of {m}: not {n}:{m} sparse")


def our_compressor(setting: str):
    """Our compressor for ``setting`` (compress_ppl.py's syntax, e.g. ``gptq/4/128``, ``sparsegpt/2:4``)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from compress_ppl import parse_setting

    from eora_ft.compress import make_compressor

    return make_compressor(**parse_setting(setting))


def peer_config(setting: str) -> dict:
    """The llm-compressor options equal to ours, read off our compressor for ``setting``."""
    from eora_ft.compress import GPTQ, SparseGPT

    ours = our_compressor(setting)
    if type(ours) is GPTQ:
        return {"method": "gptq", "bits": ours.spec.bits, "group_size": ours.spec.group_size, "sym": ours.spec.sym,
                "grid_search": getattr(ours.spec, "grid_search", False), "damp": ours.damp_percent,
                "block_size": ours.block_size, "act_order": ours.act_order}
    if type(ours) is SparseGPT and ours.spec is None:
        return {"method": "sparsegpt", "n": ours.prune.n, "m": ours.prune.m, "ratio": ours.prune.ratio,
                "damp": ours.damp_percent, "block_size": ours.block_size}
    raise ValueError(f"{setting}: only GPTQ and pure SparseGPT settings have an llm-compressor counterpart")


def grid_spec(setting: str) -> dict:
    """``check_compressed`` keywords for what ``setting`` asks (quantization grid and/or n:m pattern)."""
    ours = our_compressor(setting)
    spec = {}
    if getattr(ours, "spec", None) is not None:
        spec.update(bits=ours.spec.bits, group_size=ours.spec.group_size)
    if getattr(ours, "prune", None) is not None and ours.prune.structured:
        spec.update(n=ours.prune.n, m=ours.prune.m)
    return spec


def ours_worker(args, calib: torch.Tensor, model) -> dict:
    from eora_ft.compress.linear import dequantize_model
    from eora_ft.init.sequential import compress_model

    compressor = our_compressor(args.setting)
    loaded = max_rss_gib()
    start = time.perf_counter()
    result = compress_model(model, calib, compressor, [], target_modules=args.targets.split(","), progress=False,
                            batch_size=CALIB_BATCH)
    seconds = time.perf_counter() - start
    peak = max_rss_gib()
    dequantize_model(model)
    return {"seconds": seconds, "peak_rss_gib": peak, "loaded_rss_gib": loaded, "version": "eora_ft",
            "stage_seconds": result.stage_seconds}


def llmcompressor_worker(args, calib: torch.Tensor, model) -> dict:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoTokenizer

    config = json.loads(args.peer_config)
    # a regex over the decoder's linear names: "Linear" + ignore=["lm_head"] still prunes the (tied) lm_head
    # under SparseGPTModifier, which names a matched linear "lm_head." and so misses the ignore entry
    targets = [f"re:.*\\.({args.targets.replace(',', '|')})$"]
    if config["method"] == "gptq":
        per_channel = config["group_size"] == -1
        weights = {"num_bits": config["bits"], "type": "int", "symmetric": config["sym"],
                   "strategy": "channel" if per_channel else "group",
                   "group_size": None if per_channel else config["group_size"]}
        if config["grid_search"]:  # our "/mse": IST-DASLab's 80 shrink steps of 1%, |err|^2.4, no early stop
            weights.update(observer="memoryless_mse",
                           observer_kwargs={"maxshrink": 0.8, "grid": 100, "norm": 2.4, "patience": 80})
        recipe = GPTQModifier(config_groups={"group_0": {"targets": targets, "weights": weights}},
                              dampening_frac=config["damp"], block_size=config["block_size"],
                              actorder="static" if config["act_order"] else None)
    else:
        recipe = SparseGPTModifier(sparsity=config["ratio"], mask_structure=f"{config['n']}:{config['m']}",
                                   targets=targets, dampening_frac=config["damp"],
                                   block_size=config["block_size"])
    dataset = Dataset.from_dict({"input_ids": calib.tolist()})  # already tokenized: used as is
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loaded = max_rss_gib()
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, pipeline="sequential",
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], batch_size=CALIB_BATCH,
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_gib": max_rss_gib(), "loaded_rss_gib": loaded,
            "version": f"llmcompressor {llmcompressor.__version__}"}


def worker(args) -> None:
    """Compress in this process; write ``weights.safetensors`` (the whole state dict, fp32, dequantized) and
    ``metrics.json`` under ``--work-dir``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = torch.load(args.calib, weights_only=True)
    run = ours_worker if args.worker == "ours" else llmcompressor_worker
    metrics = run(args, calib, model)
    # everything, not just the targets: the parent checks nothing else changed (clone: tied tensors)
    weights = {name: tensor.detach().to(torch.float32).clone() for name, tensor in model.state_dict().items()}
    save_file(weights, os.path.join(args.work_dir, "weights.safetensors"))
    metrics.update(threads=torch.get_num_threads(), load_avg_1min=os.getloadavg()[0])  # others' CPU use skews time
    Path(args.work_dir, "metrics.json").write_text(json.dumps(metrics))


def checked_copy(base, weights: dict, targets: list[str], spec: dict, label: str):
    """A copy of ``base`` holding ``weights``, after checking each target linear is compressed as ``spec`` asks
    and every other tensor is untouched (a tool that also compressed lm_head or the embeddings would raise)."""
    model = copy.deepcopy(base)
    for name, tensor in model.state_dict().items():
        if name not in weights:
            raise RuntimeError(f"{label}: {name} missing from the saved weights")
        is_target = name.endswith(".weight") and name.split(".")[-2] in targets
        try:
            if is_target:
                check_compressed(weights[name], **spec)
            elif not torch.equal(weights[name], tensor):
                raise ValueError("changed, but it is not a target")
        except ValueError as err:
            raise RuntimeError(f"{label}: {name}: {err}") from err
        tensor.copy_(weights[name])
    return model


def ensure_peer_venv(venv: Path, torch_index_url: str | None) -> Path:
    """The peer venv's python, creating the venv (minutes) unless it already imports llmcompressor."""
    python = venv / "bin" / "python"
    probe = f"import llmcompressor; assert llmcompressor.__version__ == {PEER_VERSION!r}"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the torch we run: both tools on the same kernels
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [python, "-m", "pip", "install", torch_pin, *(["--index-url", torch_index_url] if torch_index_url else [])],
             [python, "-m", "pip", "install", f"llmcompressor=={PEER_VERSION}"]]
    for step in steps:
        print(f"[peer venv] {' '.join(map(str, step))}", file=sys.stderr, flush=True)
        subprocess.run(step, check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python


def run_worker(python, tool: str, setting: str, args, calib_path: str, work_dir: str, targets: list[str]) -> dict:
    command = [str(python), str(Path(__file__).resolve()), "--worker", tool, "--setting", setting,
               "--model", args.model_path, "--calib", calib_path, "--work-dir", work_dir, "--targets", ",".join(targets)]
    if tool == "llmcompressor":
        command += ["--peer-config", json.dumps(peer_config(setting))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # cwd = the scratch dir: whatever a tool writes next to itself (logs) lands there, not in the repo
    proc = subprocess.run(command, cwd=work_dir, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tool} {setting} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(work_dir, "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    parser.add_argument("--tools", nargs="+", choices=["ours", "llmcompressor"], default=["ours", "llmcompressor"])
    parser.add_argument("--model", default=None, help="default: the bundled nano model")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40, help="512-token windows scored per text")
    parser.add_argument("--repeats", type=int, default=3, help="compressions per (tool, setting); the median time")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "results" / f"peer_compare_{datetime.date.today()}.jsonl")
    parser.add_argument("--peer-venv", type=Path,
                        default=Path.home() / ".cache" / "eora_ft" / f"peer-venv-llmcompressor-{PEER_VERSION}")
    parser.add_argument("--torch-index-url", help="pip index for the peer venv's torch (default: pip's own)")
    # worker mode (internal): one (tool, setting) in a fresh process
    for name in ("--worker", "--setting", "--calib", "--work-dir", "--targets", "--peer-config"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eora_ft.config import DEFAULT_MODEL, LLAMA_LINEARS
    from eora_ft.data import calibration_tokens, read_text, resolve_path
    from eora_ft.eval.scoring import perplexity

    if "llmcompressor" in args.tools:
        for setting in args.settings:
            peer_config(setting)  # fail now, not after minutes of compression
    args.model_path = os.path.abspath(resolve_path(args.model or DEFAULT_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    base = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    texts = {"enwiki": read_text(resolve_path(ENWIKI)), "wikitext2": read_text(resolve_path(WIKITEXT))}
    calib = calibration_tokens(tokenizer, resolve_path(C4), args.calib_samples, args.calib_seq_len)
    pythons = {"ours": sys.executable}
    if "llmcompressor" in args.tools:
        pythons["llmcompressor"] = ensure_peer_venv(args.peer_venv.expanduser(), args.torch_index_url)

    def scored(row: dict, model) -> dict:
        for name, text in texts.items():
            row[f"ppl_{name}"] = perplexity(model, tokenizer, text, window=512, max_windows=args.ppl_windows,
                                            progress=False)["ppl"]
        print(json.dumps(row), flush=True)
        return row

    # our side is whatever the working tree holds: a "-dirty" commit means uncommitted code was measured
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                         capture_output=True, text=True).stdout.strip()
    common = {"calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
              "ppl_windows": args.ppl_windows, "eora_ft_git": git}
    rows = [scored({"setting": "uncompressed", "tool": "-", **common}, base)]
    with tempfile.TemporaryDirectory(prefix="peer_compare_") as scratch:
        calib_path = os.path.join(scratch, "calib.pt")
        torch.save(calib, calib_path)
        for setting in args.settings:
            for tool in args.tools:
                print(f"[{tool}] compressing {setting} ...", file=sys.stderr, flush=True)
                work_dir = tempfile.mkdtemp(dir=scratch)
                # the same compression again in fresh processes: the median time, the largest peak (results equal)
                runs = [run_worker(pythons[tool], tool, setting, args, calib_path, work_dir, LLAMA_LINEARS)
                        for _ in range(args.repeats)]
                metrics = {**runs[-1], "seconds": statistics.median(run["seconds"] for run in runs),
                           "seconds_each": [run["seconds"] for run in runs],
                           "peak_rss_gib": max(run["peak_rss_gib"] for run in runs)}
                weights = load_file(os.path.join(work_dir, "weights.safetensors"))
                model = checked_copy(base, weights, LLAMA_LINEARS, grid_spec(setting), f"{tool} {setting}")
                rows.append(scored({"setting": setting, "tool": tool, **metrics, **common}, model))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
