"""Peak memory of perplexity's loss at Llama-3 vocabulary size: eora_ft's per-window cross-entropy against
the whole-batch form it replaced (``F.cross_entropy`` over ``logits[:, :-1].float()`` of the batch).

The model is stubbed by random bf16 logits ``[batch, window, vocab]`` so only the loss's memory is measured:
each form runs in its own fresh process; on CUDA the figure is ``torch.cuda.max_memory_allocated`` above the
logits, on the CPU the process's peak RSS (VmHWM, reset first) above its RSS once the logits exist.

    python benchmarks/ppl_memory.py                       # 8 x 512 x 128256, CPU
    python benchmarks/ppl_memory.py --device cuda --window 2048
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import types

import torch
import torch.nn.functional as F


class _LogitsModel(torch.nn.Module):
    """Returns fixed logits whatever the input: perplexity() sees a model, the benchmark sees only the loss."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), device=logits.device))  # perplexity() reads the device here
        self.logits = logits

    def forward(self, input_ids, use_cache=False):
        return types.SimpleNamespace(logits=self.logits[: input_ids.shape[0]])


def _whole_batch(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """The replaced form's perplexity of ``ids`` under ``logits`` (one batch)."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none")
    return math.exp(float(nll.double().sum()) / nll.numel())


def _peak_above(fn, device: torch.device) -> tuple[float, float]:
    """(bytes ``fn()`` needs above what exists when it starts, what it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        value = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, value
    with open("/proc/self/clear_refs", "w") as f:  # Linux: resets the peak (VmHWM) to the current RSS
        f.write("5")
    start = _status_bytes("VmRSS")
    value = fn()
    return _status_bytes("VmHWM") - start, value


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _measure(form: str, batch: int, window: int, vocab: int, device: str, out) -> None:
    from eora_ft.eval.scoring import perplexity

    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, window, vocab, generator=generator, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (batch, window), generator=generator, device=device)
    if form == "whole batch":
        out.put(_peak_above(lambda: _whole_batch(logits, ids), device))
        return
    model = _LogitsModel(logits)
    tokenizer = types.SimpleNamespace()
    import eora_ft.eval.scoring as scoring

    scoring.encode_prefix = lambda tokenizer, text, needed: ids.flatten().tolist()  # the windows are ``ids``
    out.put(_peak_above(lambda: perplexity(model, tokenizer, "", window=window, batch_size=batch,
                                           progress=False)["ppl"], device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256, help="Llama-3's vocabulary")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    context = mp.get_context("spawn")  # a fresh process per form: nothing of one form stays for the other
    logits_bytes = args.batch * args.window * args.vocab * 2
    print(f"logits [{args.batch}, {args.window}, {args.vocab}] bf16 = {logits_bytes / 2**30:.2f} GiB, "
          f"device {args.device}")
    print("| loss form | peak above the logits (GiB) | perplexity |\n|---|---|---|")
    peaks = {}
    for form in ("whole batch", "per window (eora_ft)"):
        queue = context.Queue()
        process = context.Process(target=_measure, args=(form, args.batch, args.window, args.vocab, args.device, queue))
        process.start()
        peaks[form], ppl = queue.get()
        process.join()
        print(f"| {form} | {peaks[form] / 2**30:.3f} | {ppl:.6f} |")
    print(f"ratio whole batch / per window: {peaks['whole batch'] / peaks['per window (eora_ft)']:.1f}x")


if __name__ == "__main__":
    main()
