"""``eora-ft merge``: fold a trained adapter into its compressed base; one checkpoint serves with no LoRA path.

    eora-ft merge --adapter runs/arc_nano_gptq2_eora --output_dir runs/arc_nano_gptq2_eora-merged
    eora-ft merge --adapter runs/x/adapter --output_dir runs/x-merged --merge_format gptq --merge_residual_rank 16

``--adapter`` is a trained adapter directory (plain PEFT; ``adapter_config.json`` names its compressed base) or a
recipe's run directory (its ``adapter/``). ``W' = W_c + (alpha / r) B A`` is re-compressed layer by layer with the
base's own compressor on the adapted model's activations (``--merge_method recompress``; ``round`` is the naive
merge onto the base's grid, for comparison), on ``--execution_device``, keeping every layer's bits, group size,
grid symmetry and 2:4 mask. ``--merge_residual_rank k`` adds an EoRA adapter of what the re-compression lost.

Writes ``output_dir/model/`` (the merged base: ``--merge_format`` eora_ft, gptq or compressed-tensors; ``auto`` =
the base's own format), ``output_dir/residual_adapter/`` (with a residual rank; it names ``model/``) and
``merge_report.md``/``.json``: the bare base, the base + adapter and the merged model scored the same way (the
run's task and held-out texts when ``--adapter`` is a run directory, else the held-out texts), with the share of
the adapter's change each merge keeps (:mod:`eora_ft.run.merge_run`). The calibration flags are the recipes' (the
bundled C4 sample by default; ``calib_task_fraction`` mixes in ``calib_task_dataset``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from eora_ft.config import CompressionArguments

from .arguments import LegacyFlags, fields_of, parse_command

MERGE_FIELDS = ["merge_method", "merge_residual_rank", "merge_format", "calib_dataset", "calib_num_samples",
                "calib_seq_len", "calib_seed", "calib_batch_size", "calib_task_dataset", "calib_task_format",
                "calib_task_fraction", "execution_device", "calib_activations_device"]


@dataclass
class MergePaths:
    """What only ``eora-ft merge`` has: the adapter it folds in, where the merged model goes, what it scores."""

    adapter: str = field(metadata={"help": "A trained PEFT adapter directory (its adapter_config.json names the "
                                           "compressed base), or a recipe's output_dir (its adapter/ is merged and "
                                           "its results.json says how to score)."})
    output_dir: str = field(metadata={"help": "Directory to write: model/, residual_adapter/, merge_report.md "
                                              "(replaced atomically)."})
    evaluate: bool = field(default=True, metadata={"help": "Score the bare base, base + adapter and the merge(s)."})
    dtype: str = field(default="auto", metadata={"help": "auto (fp32 on a CPU, else the base's), float32, bfloat16 "
                                                         "or float16."})


# what the parser reads: recipe fields (copied, not re-declared) and this command's own
DATACLASSES = (fields_of(CompressionArguments, MERGE_FIELDS), MergePaths)


def parse(argv: list[str]) -> tuple[CompressionArguments, MergePaths]:
    """``argv`` -> the validated merge and calibration options (a :class:`CompressionArguments`) and the paths."""
    options, paths = parse_command("eora-ft merge", DATACLASSES, argv, LegacyFlags("merge", {}),
                                   description="Merge a trained adapter into its compressed base.")
    return CompressionArguments(**asdict(options)), paths


def merge_command(argv: list[str]) -> int:
    """Parse, then :func:`eora_ft.run.merge_run.merge_directory`; prints the report's table."""
    from eora_ft.run.merge_report import merge_markdown
    from eora_ft.run.merge_run import merge_directory

    options, paths = parse(argv)
    report = merge_directory(paths.adapter, paths.output_dir, options, evaluate=paths.evaluate, dtype=paths.dtype)
    print(merge_markdown(report))
    print(f"wrote {paths.output_dir}: model/" + (", residual_adapter/" if options.merge_residual_rank else "")
          + ", merge_report.md")
    return 0
