"""Per-round metric rows and the run summary, as pure functions of what a round produced.

Both runtimes build one row per round with :func:`round_row`; the summary is always derived from
the rows (plus static facts about the model and method) by :func:`summarize`, so a resumed run
summarises exactly like an uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpeft.federation.costs import message_bytes, peak_rss_mb
from fedpeft.federation.strategy import RoundOutcome, RoundPlan
from fedpeft.methods.base import NamedArrays

if TYPE_CHECKING:
    from fedpeft.runtime.rounds import Delivery


# a client result's metrics copied into its entry of a round row (and carried by Flower replies)
CLIENT_METRICS = ("train_loss", "steps", "samples_processed", "flops", "compute_s",
                  "frozen_rows_computed", "frozen_cache_bytes",
                  # split training (sfprompt): see SPLIT_METRICS
                  "kept_rows", "local_loss", "local_loss_steps", "server_flops", "activation_bytes_up",
                  "activation_bytes_down", "client_flops_pct_of_full", "recompute_flops",
                  "activation_wire_bytes_up", "activation_wire_bytes_down",
                  # [privacy] mode = "sample": the client's epsilon spent so far, its rows clipped
                  "epsilon", "dp_clipped_fraction")
# causal-lm evaluation (fedpeft.federation.generative): in every row of such a run, in place of accuracy
GENERATIVE_METRICS = ("eval_loss", "perplexity", "exact_match", "rouge_l")
# split training (sfprompt, fedpeft.split.trainer): per-client metrics summed into the round row
SPLIT_METRICS = ("server_flops", "activation_bytes_up", "activation_bytes_down", "recompute_flops")
# ... and the serialized size of the split messages (Flower; None in process, like wire_bytes_*)
SPLIT_WIRE_METRICS = ("activation_wire_bytes_up", "activation_wire_bytes_down")


# a round row's evaluation of the global model (None in a round not evaluated), beside eval_s
EVAL_METRICS = ("accuracy", "macro_f1", "predicted_classes", "loss", *GENERATIVE_METRICS)


def evaluated_round(rnd: int, eval_every: int, rounds: int) -> bool:
    """Whether round ``rnd`` of a ``rounds``-round run evaluates the global model: every
    ``eval_every`` rounds, and the last."""
    return rnd % eval_every == 0 or rnd == rounds


def off_schedule(rows: list[dict[str, Any]], eval_every: int, rounds: int) -> tuple[list[dict[str, Any]], list[int]]:
    """``rows`` of a resumed run as a ``rounds``-round run would have written them, and the rounds changed.

    A round evaluated only because it was the last (``rnd % eval_every != 0``) is no longer the
    last once ``--resume`` extends ``federation.rounds``: an uninterrupted longer run never
    evaluated it, so its row loses that evaluation (its :data:`EVAL_METRICS` None, ``eval_s`` 0,
    the time moved to ``other_s``). Every other row is returned unchanged.
    """
    out, changed = [], []
    for row in rows:
        rnd = row["round"]
        if not evaluated_round(rnd, eval_every, rounds) and any(row.get(k) is not None for k in EVAL_METRICS):
            row = {**row, **{k: None for k in EVAL_METRICS if k in row}, "eval_s": 0.0,
                   "other_s": row.get("other_s", 0.0) + row.get("eval_s", 0.0)}
            changed.append(rnd)
        out.append(row)
    return out, changed


def round_row(
    plan: RoundPlan,
    delivery: "Delivery",
    outcome: RoundOutcome,
    state_down: NamedArrays,
    eval_metrics: dict[str, float] | None,
    timings: dict[str, float],
    previous: dict[str, Any] | None,
    control_down: NamedArrays | None = None,
    down_bytes: dict[int, int] | None = None,
    attackers: list[int] | None = None,
    labels: dict[int, dict[str, Any]] | None = None,
    generative: bool = False,
) -> dict[str, Any]:
    """One ``metrics.jsonl`` row.

    Client status: ``ok``; ``dropped`` (simulated instability: never reported); ``failed`` (no
    usable reply: crashed node, timeout, error reply); ``rejected`` (a reply that failed
    validation); ``infeasible`` (its ``[budgets]`` profile fits no training: selected, never sent
    work; it downloads nothing). ``bytes_*`` are the exchanged payload (tensors + names) measured on what arrived;
    ``wire_bytes_*`` what the transport serialized (None for the in-process runtime).
    ``previous`` is the row before (for cumulative totals), or None for the first round.
    ``control_down`` is SCAFFOLD's ``c``, sent with the state to every selected client (its
    bytes count down like the state's; a client's ``delta_c_i`` is in ``delivery.bytes_up``).
    ``down_bytes`` (client -> bytes) replaces that count where clients download different
    payloads (FedEx-LoRA: the base-weight residuals each one has not received yet).
    ``attackers`` are the malicious clients (``[attack]``); ``clients_attacking`` lists those that
    trained this round. ``labels`` (client -> fields) adds what a per-client assignment chose to
    each selected client's entry (``layers``: ``k``, the blocks it trains). ``generative``
    (causal-lm): the row also has :data:`GENERATIVE_METRICS` (None when not evaluated) and no
    accuracy, macro-F1 or predicted classes (None).
    """
    results = delivery.results
    by_client = {r.client: r for r in results}
    up = delivery.bytes_up
    if down_bytes is None:  # every selected client downloads the same state (and c)
        down = message_bytes(state_down) + message_bytes(control_down or {})
        down_bytes = {cid: down for cid in plan.selected}
    down_bytes = {cid: 0 if cid in plan.infeasible else b for cid, b in down_bytes.items()}
    wire_up, wire_down = delivery.wire_up, delivery.wire_down
    infeasible = set(plan.infeasible)
    clients = []
    for cid in plan.selected:
        res = by_client.get(cid)
        entry: dict[str, Any] = {"id": cid, **(labels or {}).get(cid, {}), "bytes_down": down_bytes[cid],
                                 "bytes_up": up.get(cid, 0)}
        if wire_down is not None:
            entry["wire_bytes_down"] = wire_down.get(cid, 0)
            entry["wire_bytes_up"] = (wire_up or {}).get(cid, 0)
        if cid in infeasible:
            entry["status"] = "infeasible"
        elif cid in delivery.failed:
            entry.update(status="failed", reason=delivery.failed[cid])
        elif cid in outcome.rejected:
            entry.update(status="rejected", reason=outcome.rejected[cid])
        elif res is None:
            entry["status"] = "dropped"
        else:
            entry["status"] = "ok"
        entry.update(outcome.client_info.get(cid, {}))  # update_norm, aggregation (accepted clients)
        if res is not None:
            entry["samples"] = res.num_samples
            entry.update({k: res.metrics[k] for k in CLIENT_METRICS if k in res.metrics})
        clients.append(entry)
    accepted = [by_client[c] for c in outcome.accepted]
    weight = sum(r.num_samples for r in accepted)
    train_loss = (
        sum(r.metrics.get("train_loss", 0.0) * r.num_samples for r in accepted) / weight if weight else None
    )
    reported = len(results) + len(set(delivery.rejected) - set(by_client))
    bytes_up_total = sum(up.values())
    bytes_down_total = sum(down_bytes[cid] for cid in plan.selected)
    prev = previous or {}
    ev = eval_metrics or {}
    wire = None if wire_down is None else (sum((wire_up or {}).values()), sum(wire_down.values()))
    return {
        "round": plan.round,
        "accuracy": ev.get("accuracy"),
        "macro_f1": ev.get("macro_f1"),
        "predicted_classes": ev.get("predicted_classes"),
        "loss": ev.get("loss"),
        **({k: ev.get(k) for k in GENERATIVE_METRICS} if generative else {}),
        "train_loss": train_loss,
        "aggregated": outcome.aggregated,
        "clients_selected": len(plan.selected),
        "clients_reported": reported,
        "clients_dropped": len(plan.dropped),
        "clients_failed": len(delivery.failed),
        "clients_rejected": len(outcome.rejected),
        "clients_attacking": sorted(set(attackers or ()) & set(plan.training)),
        "clients_infeasible": sorted(plan.infeasible),
        "clients_clipped": sum(i["aggregation"] == "clipped" for i in outcome.client_info.values()),
        "clients_excluded": sum(i["aggregation"] == "excluded" for i in outcome.client_info.values()),
        "aggregation_buffer_bytes": outcome.buffer_bytes,
        "bytes_up": bytes_up_total,
        "bytes_down": bytes_down_total,
        "cum_bytes_up": prev.get("cum_bytes_up", 0) + bytes_up_total,
        "cum_bytes_down": prev.get("cum_bytes_down", 0) + bytes_down_total,
        "wire_bytes_up": None if wire is None else wire[0],
        "wire_bytes_down": None if wire is None else wire[1],
        "client_flops": sum(r.metrics.get("flops", 0.0) for r in results),
        **_split_totals(results),
        "wall_s": timings["wall_s"],
        "client_compute_s": timings["client_compute_s"],
        "eval_s": timings.get("eval_s", 0.0),
        "other_s": timings["wall_s"] - timings["client_compute_s"] - timings.get("eval_s", 0.0),
        "peak_rss_mb": peak_rss_mb(),
        "message": outcome.message,
        **outcome.privacy,  # [privacy]: epsilon spent after this round, clip_norm used, noise_std added
        "clients": clients,
    }


def summarize(rows: list[dict[str, Any]], static: dict[str, Any]) -> dict[str, Any]:
    """The run summary: ``static`` facts plus totals and accuracies derived from ``rows`` (causal-lm:
    ``final_eval_loss``, ``final_perplexity``, ``final_exact_match``, ``final_rouge_l``,
    ``best_rouge_l`` instead of accuracies, which are None)."""
    evaluated = [r for r in rows if r.get("accuracy") is not None or r.get("eval_loss") is not None]
    last = evaluated[-1] if evaluated else {}
    client_rounds = sum(r["clients_reported"] for r in rows)
    updates = [c["bytes_up"] for r in rows for c in r["clients"] if c.get("bytes_up")]
    n = max(1, len(rows))
    summary = {
        **static,
        "rounds_completed": len(rows),
        "final_accuracy": last.get("accuracy"),
        "final_macro_f1": last.get("macro_f1"),
        "predicted_classes": last.get("predicted_classes"),  # distinct classes the final model predicts
        "final_loss": last.get("loss"),
        "best_accuracy": max((r["accuracy"] for r in evaluated if r["accuracy"] is not None), default=None),
        "total_bytes_up": sum(r["bytes_up"] for r in rows),
        "total_bytes_down": sum(r["bytes_down"] for r in rows),
        "mb_up_per_round": sum(r["bytes_up"] for r in rows) / n / 1e6,
        # the mean payload of the updates received; bytes_per_client_update is the largest possible
        # (a client assigned every exchanged name): they differ only with per-client assignments
        "bytes_per_client_update_mean": sum(updates) / len(updates) if updates else None,
        "mb_down_per_round": sum(r["bytes_down"] for r in rows) / n / 1e6,
        "client_flops_total": sum(r["client_flops"] for r in rows),
        "client_flops_per_update": sum(r["client_flops"] for r in rows) / max(1, client_rounds),
        "clients_dropped_total": sum(r["clients_dropped"] for r in rows),
        "clients_rejected_total": sum(r["clients_rejected"] for r in rows),
        "clients_failed_total": sum(r.get("clients_failed", 0) for r in rows),
        "clients_infeasible_total": sum(len(r.get("clients_infeasible", ())) for r in rows),
        "failures": [
            {"round": r["round"], "client": c["id"], "reason": c["reason"]}
            for r in rows for c in r["clients"] if c["status"] == "failed"
        ],
        "total_wire_bytes_up": _total_or_none(rows, "wire_bytes_up"),
        "total_wire_bytes_down": _total_or_none(rows, "wire_bytes_down"),
        "rounds_without_aggregation": [r["round"] for r in rows if not r["aggregated"]],
        # robust aggregation / attacks (rows of older runs lack these keys)
        "clients_clipped_total": sum(r.get("clients_clipped", 0) for r in rows),
        "clients_excluded_total": sum(r.get("clients_excluded", 0) for r in rows),
        # the largest frozen-prefix cache one client held (runtime.frozen_cache_mb; head, layers)
        "frozen_cache_bytes_max": max((c.get("frozen_cache_bytes", 0) for r in rows for c in r["clients"]), default=0),
        "aggregation_buffer_bytes_max": max((r.get("aggregation_buffer_bytes", 0) for r in rows), default=0),
        "wall_s": sum(r["wall_s"] for r in rows),
        "client_compute_s": sum(r["client_compute_s"] for r in rows),
        "eval_s": sum(r["eval_s"] for r in rows),
        "peak_rss_mb": max((r["peak_rss_mb"] for r in rows), default=peak_rss_mb()),
    }
    if static.get("task") == "causal-lm":
        summary.update({f"final_{k}": last.get(k) for k in GENERATIVE_METRICS})
        summary["best_rouge_l"] = max((r["rouge_l"] for r in evaluated if r.get("rouge_l") is not None), default=None)
    summary.update(_split_summary(rows, static, client_rounds))
    if static.get("privacy") == "sample":  # DP-SGD: the largest epsilon any client has spent
        summary["epsilon"] = max((c["epsilon"] for r in rows for c in r["clients"] if "epsilon" in c), default=0.0)
    elif static.get("noise_multiplier") is not None:  # [privacy]: the epsilon spent by the rounds done
        summary["epsilon"] = rows[-1].get("epsilon") if rows else 0.0
        if "initial_clip_norm" in static:  # adaptive clipping: the clip norm each round used
            summary["clip_norms"] = [r.get("clip_norm") for r in rows]
    full = static.get("full_model_bytes_per_message")
    per_update = static.get("bytes_per_client_update")
    if full and per_update:
        summary["upload_reduction_vs_full"] = full / per_update
    return summary


def _split_totals(results: list) -> dict[str, Any]:
    """A split round's sums of :data:`SPLIT_METRICS` over its clients (nothing for other methods)."""
    if not any("activation_bytes_up" in r.metrics for r in results):
        return {}
    totals = {key: sum(r.metrics.get(key, 0.0) for r in results) for key in SPLIT_METRICS}
    for key in SPLIT_WIRE_METRICS:
        totals[key] = sum(r.metrics[key] for r in results) if all(key in r.metrics for r in results) else None
    return totals


def _split_summary(rows: list[dict[str, Any]], static: dict[str, Any], client_rounds: int) -> dict[str, Any]:
    """Split training's totals (``activation_bytes_up``/``_down``, ``server_flops``,
    ``client_flops_pct_of_full``: client FLOPs over full fine-tuning's on the same batches, the mean
    over client updates) and the measured mean client FLOPs per update in ``client_flops``
    (``measured_per_round``, beside the cost model's ``predicted_per_round``); on Flower also
    ``activation_wire_bytes_up``/``_down`` (None in process) and ``recompute_flops``
    (head passes its clients ran again between messages, not in ``client_flops``: 0 in process)."""
    split = [r for r in rows if "activation_bytes_up" in r]
    if not split:
        return {}
    pct = [c["client_flops_pct_of_full"] for r in split for c in r["clients"] if "client_flops_pct_of_full" in c]
    measured = sum(r["client_flops"] for r in rows) / max(1, client_rounds)
    flops = static.get("client_flops")
    return {
        "activation_bytes_up": sum(r["activation_bytes_up"] for r in split),
        "activation_bytes_down": sum(r["activation_bytes_down"] for r in split),
        "server_flops": sum(r["server_flops"] for r in split),
        "activation_wire_bytes_up": _total_or_none(split, "activation_wire_bytes_up"),
        "activation_wire_bytes_down": _total_or_none(split, "activation_wire_bytes_down"),
        "recompute_flops": sum(r.get("recompute_flops", 0.0) for r in split),
        "client_flops_pct_of_full": sum(pct) / len(pct) if pct else None,
        "client_flops": {**(flops if isinstance(flops, dict) else {}), "measured_per_round": measured},
    }


def _total_or_none(rows: list[dict[str, Any]], key: str) -> int | None:
    values = [r.get(key) for r in rows]
    return None if not values or any(v is None for v in values) else sum(values)
