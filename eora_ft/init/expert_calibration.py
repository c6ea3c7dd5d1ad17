"""Statistics for experts the calibration barely routes to: counted, said, and taken from every token.

An expert's linears see only the tokens the router sends them, so their statistics (GPTQ's Hessian, EoRA's
eigenspace) come from ``tokens x top_k / experts`` tokens on average, and from none at all for an expert the
calibration never picks. GPTQModel then falls back to round-to-nearest (its ``FailSafe``); llm-compressor
routes every token through every expert while calibrating. eora_ft does the second for the experts that need
it only: an expert routed fewer than ``min_share`` of its uniform share (``sum of routed tokens / experts``)
is run on every token reaching the block (:attr:`~eora_ft.compress.experts.ExpertLinears.route_all`), so GPTQ
and EoRA stay data-aware for it, and the log and the report rows say which experts and how many tokens.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from eora_ft.compress.experts import expert_owners, is_expert_linear_path
from eora_ft.compress.stats import ActivationStats, StatsCollector

logger = logging.getLogger(__name__)

DEFAULT_MIN_SHARE = 0.1


def _expert_index(name: str, prefix: str) -> int:
    return int(name[len(prefix):].split(".", 1)[0])


def calibrate_under_routed(layer: nn.Module, names: list[str], stats: dict[str, ActivationStats | None],
                           energies: dict[str, float | None], collect: Callable[[dict[str, nn.Module]], StatsCollector],
                           min_share: float, decided: dict[str, dict], where: str) -> dict[str, int]:
    """Count the tokens routed to each expert whose linears are in ``names`` (``stats`` from a routed pass), and
    re-collect ``stats`` / ``energies`` in place, over every token, for the experts routed fewer than
    ``min_share`` x the uniform share (always for an expert routed none). Returns ``{linear name: routed tokens}``.

    ``decided`` (one dict per decoder layer) holds each experts module's report (``routed_tokens`` per expert,
    ``threshold``, ``all_token_experts``) once made: a later stage of the same layer (true-sequential's
    ``down_proj`` stage) keeps the decision, and its all-token experts already run on every token.
    ``collect(linears)`` runs the layer over the calibration batches with hooks on ``linears``."""
    routed: dict[str, int] = {}
    for path, owner in expert_owners(layer).items():
        prefix = f"{path}." if path else ""
        members = [n for n in names if n.startswith(prefix) and is_expert_linear_path(n)]
        if not members:
            continue
        report = decided.get(path)
        if report is None:  # statistics from a routed pass: count, decide, re-collect the experts below the line
            counts = [0] * owner.num_experts
            for name in members:
                entry = stats.get(name)
                index = _expert_index(name, prefix)
                counts[index] = max(counts[index], entry.tokens if entry is not None else 0)
            threshold = min_share * sum(counts) / owner.num_experts
            under = [index for index, count in enumerate(counts) if count == 0 or count < threshold]
            report = decided[path] = {"experts": path, "routed_tokens": counts, "threshold": threshold,
                                      "all_token_experts": under}
            _log(report, where)
            owner.route_all = set(under)
            refresh = {n: layer.get_submodule(n) for n in members if _expert_index(n, prefix) in owner.route_all}
            if refresh:
                for name in refresh:  # the routed statistics go before the all-token ones are accumulated
                    stats[name] = energies[name] = None
                collector = collect(refresh)
                for name in refresh:
                    stats[name], energies[name] = collector.stats[name], collector.output_energy[name]
        # else: a later stage, collected while the decided experts ran on every token
        routed.update({n: report["routed_tokens"][_expert_index(n, prefix)] for n in members})
    return routed


def _log(report: dict, where: str) -> None:
    counts, under = report["routed_tokens"], report["all_token_experts"]
    ordered = sorted(counts)
    logger.info("%s %s: tokens routed per expert min %d, median %d, max %d (%d experts)", where, report["experts"],
                ordered[0], ordered[len(ordered) // 2], ordered[-1], len(counts))
    if under:
        shown = ", ".join(f"{index} ({counts[index]})" for index in under[:16]) + (" ..." if len(under) > 16 else "")
        logger.warning("%s %s: %d experts were routed fewer than %.0f tokens (min_share of the uniform share): "
                       "expert (tokens) %s; their statistics come from every token reaching the block",
                       where, report["experts"], len(under), report["threshold"], shown)


def describe_routing(reports: list[dict] | None) -> str | None:
    """``min 171 / median 256 / max 398 tokens per expert; 2 of 256 experts calibrated on every token`` for a
    run's :attr:`~eora_ft.init.accounting.SequentialResult.expert_routing`; None for a dense model."""
    if not reports:
        return None
    counts = sorted(count for report in reports for count in report["routed_tokens"])
    everywhere = sum(len(report["all_token_experts"]) for report in reports)
    return (f"min {counts[0]} / median {counts[len(counts) // 2]} / max {counts[-1]} tokens per expert; "
            f"{everywhere} of {len(counts)} experts calibrated on every token")


def release(layer: nn.Module) -> None:
    """Route every expert of ``layer`` by its router again (after its statistics are collected)."""
    for owner in expert_owners(layer).values():
        owner.route_all = set()
