"""A study's summary, as the storage holds it: the :class:`StudyResult`, the recommended trial,
parameter importances, and the summary files (tables, curves, importances, ``study.json``,
``recommended.yaml``) that every worker writes and one logs to the parent run.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import optuna
from optuna.trial import TrialState

from ..config import LoopConfig
from .config import StudyResult, TrialSummary
from .space import point_label
from .storage import hide_password

if TYPE_CHECKING:
    from .runner import _StudyRunner


def _trial_summary(t: optuna.trial.FrozenTrial) -> TrialSummary:
    result = t.user_attrs.get("result") or {}
    spend = {**(t.user_attrs.get("spend") or {}), **{k: v for k, v in result.items()
                                                      if k in ("tokens", "tokens_spent", "llm_calls", "cost_usd")}}
    curve = tuple(tuple(p) for p in t.user_attrs.get("curve") or ())
    best = result.get("best_val_score")
    if best is None and curve:
        best = curve[-1][1]
    duration = (t.datetime_complete - t.datetime_start).total_seconds() \
        if t.datetime_complete and t.datetime_start else None
    return TrialSummary(
        number=t.number, state=t.state.name, params=dict(t.params), best_val_score=best,
        test_score=result.get("test_score"), tokens=spend.get("tokens"),
        tokens_spent=spend.get("tokens_spent"), llm_calls=spend.get("llm_calls"),
        cost_usd=spend.get("cost_usd"),
        steps_run=result.get("steps_run", len(curve) if curve else None),
        stop_reason=result.get("stop_reason") or (t.user_attrs.get("error") and "error"),
        duration_s=duration, mlflow_run_id=t.user_attrs.get("mlflow_run_id"),
        config=t.user_attrs.get("config"), curve=curve, retry_of=t.user_attrs.get("retry_of"),
    )


def _pick(candidates: Iterable[TrialSummary]) -> TrialSummary | None:
    """Highest best validation score; ties: fewer tokens, then the earlier trial."""
    ranked = sorted(
        (t for t in candidates if t.best_val_score is not None),
        key=lambda t: (-t.best_val_score, t.tokens if t.tokens is not None else math.inf, t.number),
    )
    return ranked[0] if ranked else None


def _importances(study: optuna.Study, complete: int) -> tuple[dict[str, float], str | None]:
    if complete < 2:
        return {}, f"needs at least 2 complete trials, has {complete}"
    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    errors = []
    for evaluator in (None, optuna.importance.FanovaImportanceEvaluator(seed=0)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
            return {k: float(v) for k, v in values.items()}, None
        except Exception as exc:  # too few distinct values, a single-point space, ...
            errors.append(f"{type(exc).__name__}: {exc}")
    return {}, "; ".join(errors)


def summarize(runner: _StudyRunner, trials: Sequence[optuna.trial.FrozenTrial], stop_reason: str) -> StudyResult:
    summaries = tuple(_trial_summary(t) for t in trials)
    complete = [s for s in summaries if s.state == "COMPLETE"]
    pareto: tuple[TrialSummary, ...] = ()
    if runner.single:
        recommended = _pick(complete)
    else:
        front = {t.number for t in runner.study.best_trials} if complete else set()
        pareto = tuple(s for s in complete if s.number in front)
        recommended = _pick(pareto)
    importances, note = _importances(runner.study, len(complete))
    recommended_config = None
    if recommended is not None and recommended.config is not None:
        recommended_config = LoopConfig.from_dict(recommended.config)
    return StudyResult(
        study_name=runner.name, storage=hide_password(runner.config.storage),
        sampler=runner.sampler_name, pruner=runner.pruner_name,
        objectives=runner.config.objectives, target_trials=runner.target, stop_reason=stop_reason,
        trials=summaries, recommended=recommended, recommended_config=recommended_config,
        pareto=pareto, importances=importances, parent_run_id=runner.parent_run_id,
        summary_dir=runner.summary_dir, trials_run_here=runner.trials_run, importance_note=note,
    )


def summary_metrics(summary: StudyResult) -> dict[str, float]:
    metrics: dict[str, float] = {
        "n_complete": summary.count("COMPLETE"), "n_pruned": summary.count("PRUNED"),
        "n_failed": summary.count("FAIL"),
        "study_tokens": sum(t.tokens or 0 for t in summary.trials),
        "study_llm_calls": sum(t.llm_calls or 0 for t in summary.trials),
    }
    best = summary.recommended
    if best is not None:
        metrics["best_val_score"] = best.best_val_score
        if best.test_score is not None:
            metrics["best_test_score"] = best.test_score
        if best.tokens is not None:
            metrics["best_tokens"] = best.tokens
    metrics.update({f"importance/{k}": v for k, v in summary.importances.items()})
    return metrics


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(runner: _StudyRunner, summary: StudyResult) -> None:
    """Files of the summary (also logged to the parent run): ``summary/trials.csv`` and
    ``trials.md`` (configs vs best validation / test scores and tokens), ``summary/curves.png``
    (best validation score vs step and vs tokens, per trial), ``summary/param_importances.json``
    (+ ``.png``), ``summary/study.json`` and ``recommended.yaml``."""
    root = summary.summary_dir
    folder = root / "summary"
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(runner.config.search_space)
    rows = [t.to_row(names) for t in summary.trials]
    columns = list(rows[0]) if rows else ["trial", "state", *names]
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = ["trial", "state", *names, "best_val_score", "test_score", "tokens", "steps_run"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    best = summary.recommended.number if summary.recommended else None
    for row in sorted(rows, key=lambda r: (-(r["best_val_score"] or -math.inf), r["trial"])):
        cells = [_fmt(row[c]) for c in shown]
        if row["trial"] == best:
            cells[0] += " (recommended)"
        lines.append("| " + " | ".join(cells) + " |")
    (folder / "trials.md").write_text("\n".join(lines) + "\n")

    importances = {"importances": summary.importances}
    if summary.importance_note:
        importances["note"] = summary.importance_note
    (folder / "param_importances.json").write_text(json.dumps(importances, indent=2))
    info = {
        "study_name": summary.study_name, "storage": summary.storage, "sampler": summary.sampler,
        "pruner": summary.pruner, "objectives": list(summary.objectives),
        "target_trials": summary.target_trials, "stop_reason": summary.stop_reason,
        "counts": {s.name: summary.count(s.name) for s in TrialState},
        "recommended_trial": best,
        "pareto_trials": [t.number for t in summary.pareto],
        "parent_run_id": summary.parent_run_id,
        "definition": runner.config.definition(),
    }
    (folder / "study.json").write_text(json.dumps(info, indent=2, default=str))
    recommended = root / "recommended.yaml"
    if summary.recommended_config is not None:
        header = (f"# recommended by study {summary.study_name} (trial {best}); reuse with:\n"
                  f"#   genopt run {summary.recommended_config.project} --config recommended.yaml\n")
        recommended.write_text(header + summary.recommended_config.to_yaml())
    elif recommended.exists():
        recommended.unlink()
    _plot(summary, folder)


def _plot(summary: StudyResult, folder: Path) -> None:
    try:
        from matplotlib.figure import Figure  # Agg canvas, no pyplot state
    except ImportError:  # pragma: no cover - matplotlib comes with MLflow
        return
    curves = [t for t in summary.trials if t.curve]
    if curves:
        fig = Figure(figsize=(13, 5), layout="constrained")
        by_step, by_tokens = fig.subplots(1, 2)
        best = summary.recommended.number if summary.recommended else None
        for t in curves:
            steps = [p[0] for p in t.curve]
            scores = [p[1] for p in t.curve]
            tokens = [p[3] for p in t.curve]
            style = {"linestyle": "--", "alpha": 0.6} if t.state == "PRUNED" else {}
            if t.state == "FAIL":
                style = {"linestyle": ":", "alpha": 0.5}
            width = 3 if t.number == best else 1.3
            label = f"#{t.number} {point_label(t.params)} ({t.state.lower()})"
            by_step.plot(steps, scores, marker="o", markersize=3, linewidth=width, label=label, **style)
            by_tokens.plot(tokens, scores, marker="o", markersize=3, linewidth=width, **style)
        by_step.xaxis.get_major_locator().set_params(integer=True)
        by_step.set(xlabel="step", ylabel="best validation score", title="score vs step per config")
        by_tokens.set(xlabel="LLM tokens (cumulative)", ylabel="best validation score",
                      title="score vs tokens per config")
        by_step.legend(fontsize=7, loc="best")
        fig.suptitle(f"study {summary.study_name}: pruned dashed, failed dotted, recommended thick")
        fig.savefig(folder / "curves.png", dpi=110)
    if summary.importances:
        fig = Figure(figsize=(7, 0.5 + 0.45 * len(summary.importances)), layout="constrained")
        ax = fig.subplots()
        items = sorted(summary.importances.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.set(xlabel="importance (normalized)", title="parameter importances")
        fig.savefig(folder / "param_importances.png", dpi=110)
