"""Per-round metric rows and the run summary, as pure functions of what a round produced.

Both runtimes build one row per round with :func:`round_row`; the summary is always derived from
the rows (plus static facts about the model and method) by :func:`summarize`, so a resumed run
summarises exactly like an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from fedpeft.federation.costs import message_bytes, peak_rss_mb
from fedpeft.federation.strategy import ClientResult, RoundOutcome, RoundPlan


def round_row(
    plan: RoundPlan,
    results: list[ClientResult],
    outcome: RoundOutcome,
    bytes_down_per_client: int,
    eval_metrics: dict[str, float] | None,
    timings: dict[str, float],
    previous: dict[str, Any] | None,
    bytes_up: dict[int, int] | None = None,
) -> dict[str, Any]:
    """One ``metrics.jsonl`` row.

    ``bytes_up`` maps client id to the bytes its update actually took on the wire; by default
    it is :func:`message_bytes` of the update. ``previous`` is the row before (for cumulative
    totals), or None for the first round.
    """
    by_client = {r.client: r for r in results}
    up = bytes_up or {r.client: message_bytes(r.state) for r in results}
    clients = []
    for cid in plan.selected:
        res = by_client.get(cid)
        entry: dict[str, Any] = {"id": cid, "bytes_down": bytes_down_per_client, "bytes_up": up.get(cid, 0)}
        if res is None:
            entry["status"] = "dropped"
        else:
            entry["status"] = "rejected" if cid in outcome.rejected else "ok"
            entry["samples"] = res.num_samples
            entry.update({k: res.metrics[k] for k in ("train_loss", "steps", "samples_processed", "flops", "compute_s") if k in res.metrics})
            if cid in outcome.rejected:
                entry["reason"] = outcome.rejected[cid]
        clients.append(entry)
    accepted = [by_client[c] for c in outcome.accepted]
    weight = sum(r.num_samples for r in accepted)
    train_loss = (
        sum(r.metrics.get("train_loss", 0.0) * r.num_samples for r in accepted) / weight if weight else None
    )
    bytes_up_total = sum(up.values())
    bytes_down_total = bytes_down_per_client * len(plan.selected)
    prev = previous or {}
    ev = eval_metrics or {}
    return {
        "round": plan.round,
        "accuracy": ev.get("accuracy"),
        "macro_f1": ev.get("macro_f1"),
        "loss": ev.get("loss"),
        "train_loss": train_loss,
        "aggregated": outcome.aggregated,
        "clients_selected": len(plan.selected),
        "clients_reported": len(results),
        "clients_dropped": len(plan.selected) - len(results),
        "clients_rejected": len(outcome.rejected),
        "bytes_up": bytes_up_total,
        "bytes_down": bytes_down_total,
        "cum_bytes_up": prev.get("cum_bytes_up", 0) + bytes_up_total,
        "cum_bytes_down": prev.get("cum_bytes_down", 0) + bytes_down_total,
        "client_flops": sum(r.metrics.get("flops", 0.0) for r in results),
        "wall_s": timings["wall_s"],
        "client_compute_s": timings["client_compute_s"],
        "eval_s": timings.get("eval_s", 0.0),
        "other_s": timings["wall_s"] - timings["client_compute_s"] - timings.get("eval_s", 0.0),
        "peak_rss_mb": peak_rss_mb(),
        "message": outcome.message,
        "clients": clients,
    }


def summarize(rows: list[dict[str, Any]], static: dict[str, Any]) -> dict[str, Any]:
    """The run summary: ``static`` facts plus totals and accuracies derived from ``rows``."""
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    client_rounds = sum(r["clients_reported"] for r in rows)
    n = max(1, len(rows))
    summary = {
        **static,
        "rounds_completed": len(rows),
        "final_accuracy": last.get("accuracy"),
        "final_macro_f1": last.get("macro_f1"),
        "final_loss": last.get("loss"),
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "total_bytes_up": sum(r["bytes_up"] for r in rows),
        "total_bytes_down": sum(r["bytes_down"] for r in rows),
        "mb_up_per_round": sum(r["bytes_up"] for r in rows) / n / 1e6,
        "mb_down_per_round": sum(r["bytes_down"] for r in rows) / n / 1e6,
        "client_flops_total": sum(r["client_flops"] for r in rows),
        "client_flops_per_update": sum(r["client_flops"] for r in rows) / max(1, client_rounds),
        "clients_dropped_total": sum(r["clients_dropped"] for r in rows),
        "clients_rejected_total": sum(r["clients_rejected"] for r in rows),
        "rounds_without_aggregation": [r["round"] for r in rows if not r["aggregated"]],
        "wall_s": sum(r["wall_s"] for r in rows),
        "client_compute_s": sum(r["client_compute_s"] for r in rows),
        "eval_s": sum(r["eval_s"] for r in rows),
        "peak_rss_mb": max((r["peak_rss_mb"] for r in rows), default=peak_rss_mb()),
    }
    full = static.get("full_model_bytes_per_message")
    per_update = static.get("bytes_per_client_update")
    if full and per_update:
        summary["upload_reduction_vs_full"] = full / per_update
    return summary
