"""What the compiler makes of every Triton kernel, for GPUs that are not here (sm_80, sm_90).

    python benchmarks/kernel_report.py              # the table for BENCHMARKS.md (bit widths folded)
    python benchmarks/kernel_report.py --per-bits   # one row per bit width too
    python benchmarks/kernel_report.py --json out.json

Compiles every case of ``eora_ft.kernels.aot`` (kernel x activation dtype x bit width x block
configuration) for each target with the ptxas of the triton wheel, then reads registers, spilled
bytes, shared memory (dynamic + static) and the dot instruction in the SASS (HGMMA: Hopper warp-group
MMA; HMMA: tensor-core MMA; FFMA: FMA units only). Prints a markdown table; with ``--json`` writes
every build. Exits non-zero when a build breaks a budget (the same check as the CI test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from eora_ft.kernels.aot import SHARED_LIMIT_BYTES, SPILL_BUDGET_BYTES, TARGETS, compile_all, problems


def _row_key(build, per_bits: bool) -> tuple:
    case = build.case
    blocks = case.blocks
    shape = f"{blocks.block_m}x{blocks.block_n}x{blocks.block_k} w{blocks.num_warps} s{blocks.num_stages}"
    return (case.kernel, case.dtype, shape) + ((case.bits,) if per_bits else ())


def table(builds, per_bits: bool = False) -> str:
    """Markdown: one row per kernel x dtype x configuration (x bit width), a column group per target; folded
    rows show the largest registers and shared memory over the bit widths, and the sum of spills."""
    rows: dict[tuple, dict[str, list]] = {}
    for build in builds:
        rows.setdefault(_row_key(build, per_bits), {}).setdefault(build.target, []).append(build)
    targets = sorted(TARGETS)
    head = "| kernel | dtype | tile MxNxK, warps, stages |" + ("bits |" if per_bits else "")
    head += "".join(f" {t} regs | {t} spill B | {t} shared KB | {t} dot |" for t in targets)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, per_target in rows.items():
        cells = [str(part) for part in key]
        for target in targets:
            group = per_target[target]
            dots = sorted({b.dot for b in group})
            cells += [str(max(b.registers for b in group)), str(sum(b.spill_bytes for b in group)),
                      f"{max(b.shared_bytes for b in group) / 1024:.1f}", "/".join(dots)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-bits", action="store_true", help="a row per bit width instead of folding them")
    parser.add_argument("--json", default=None, help="write every build here")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    builds = compile_all(workers=args.workers)
    print(table(builds, args.per_bits))
    bad = [(b.case.label, b.target, problems(b)) for b in builds if problems(b)]
    print(f"\n{len(builds)} builds in {time.perf_counter() - start:.0f} s; budgets: spills <= {SPILL_BUDGET_BYTES} B, "
          f"shared <= {SHARED_LIMIT_BYTES}; over budget: {len(bad)}")
    for label, target, found in bad:
        print(f"  {label} {target}: {'; '.join(found)}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{**dataclasses.asdict(b), "case": {**dataclasses.asdict(b.case), "label": b.case.label}}
                       for b in builds], handle, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
