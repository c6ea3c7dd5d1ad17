"""CPU dequantize of a 4096 x 4096 int4 g128 layer, in one process: the pure-torch reference as it was when the
speed issue was filed (git 6799218, read from the repository's history), today's pure-torch reference, the C++
loop (``kernels/csrc/dequant_cpu.cpp``), and bitsandbytes' NF4 dequantize of the same weight. Three rounds of
medians; the three packed results are checked bit-equal first.

    OMP_NUM_THREADS=2 python benchmarks/dequant_history.py
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "6799218"


def old_dequantize():
    """``kernels/reference.dequantize`` (with the packing module it imports) at ``OLD_COMMIT``, loaded from a temp dir."""
    package = Path(tempfile.mkdtemp()) / "old_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("reference.py", "packing.py"):
        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:kernels/{name}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (package / name).write_text(source)
    spec = importlib.util.spec_from_file_location("old_kernels", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_kernels"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("old_kernels.reference").dequantize


def median_ms(fn, repeats: int = 15) -> float:
    fn()  # warm-up (and the extension's build on a first run)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def main() -> None:
    from eora_ft.compress import RTN, make_compressor
    from eora_ft.kernels.cpu_dequant import dequantize as cpu_dequantize
    from eora_ft.kernels.cpu_dequant import extension
    from eora_ft.kernels.reference import dequantize as reference_dequantize

    if extension() is None:
        raise SystemExit("the CPU dequantize extension did not build (see the warning above): nothing to measure")
    issue_time = old_dequantize()
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    packed = RTN(bits=4, group_size=128).compress(weight).to_module(None, torch.float32)
    nf4 = make_compressor("nf4").compress(weight).to_module(None, torch.float32)
    args = (packed.qweight, packed.scales, packed.zeros, 4, 128, 4096)
    assert torch.equal(issue_time(*args), cpu_dequantize(*args)) and torch.equal(reference_dequantize(*args), cpu_dequantize(*args))
    for _ in range(3):
        row = {f"reference at {OLD_COMMIT}": median_ms(lambda: issue_time(*args), 5),
               "reference now": median_ms(lambda: reference_dequantize(*args)),
               "C++ loop": median_ms(lambda: cpu_dequantize(*args)),
               "bitsandbytes NF4": median_ms(lambda: nf4.dequantize(torch.float32))}
        print(" | ".join(f"{name} {ms:.1f} ms" for name, ms in row.items()),
              f"| C++ / NF4 {row['C++ loop'] / row['bitsandbytes NF4']:.2f}x",
              f"| {OLD_COMMIT} / C++ {row[f'reference at {OLD_COMMIT}'] / row['C++ loop']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
