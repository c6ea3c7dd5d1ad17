"""What the checks before work cost: NaN/Inf scan of the weights and the line-by-line data-file check.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/check_costs.py [--gib 1]

Prints one JSON object: GiB/s of :func:`eora_ft.utils.model_checks.check_finite_weights` over bf16 tensors of
Llama-3-8B's 4096 x 4096 projection shape (and the seconds that means for 8B and 70B bf16 checkpoints),
and MiB/s of :func:`eora_ft.data.file_checks.check_data_file` on the bundled C4 calibration file.
"""

import argparse
import json
import os
import time

import torch

from eora_ft.data.file_checks import check_data_file
from eora_ft.utils.model_checks import check_finite_weights

C4 = os.path.join(os.path.dirname(__file__), "..", "eora_ft", "assets", "data", "c4", "c4_en_train_calib900.jsonl")
BF16_GIB = {"llama-3-8b": 8.03e9 * 2 / 2**30, "llama-3-70b": 70.6e9 * 2 / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of bf16 weights to scan")
    args = parser.parse_args()
    count = max(1, round(args.gib * 2**30 / (4096 * 4096 * 2)))
    model = torch.nn.Module()
    for index in range(count):
        model.register_buffer(f"w{index}", torch.randn(4096, 4096).bfloat16())
    gib = count * 4096 * 4096 * 2 / 2**30
    start = time.perf_counter()
    check_finite_weights(model)
    weights_rate = gib / (time.perf_counter() - start)
    start = time.perf_counter()
    records = check_data_file(C4, "calib_dataset", "text")
    seconds = time.perf_counter() - start
    print(json.dumps({
        "check_finite_weights_gib_per_s": round(weights_rate, 2),
        "seconds_for_bf16": {name: round(size / weights_rate, 1) for name, size in BF16_GIB.items()},
        "check_data_file_mib_per_s": round(os.path.getsize(C4) / 2**20 / seconds, 1), "records": records,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
