"""A genopt learning loop as a backend of ``mlflow.genai.optimize_prompts``.

MLflow's prompt optimization takes an optimizer object, like its built-in
``GepaPromptOptimizer``; :class:`GenoptPromptOptimizer` is one, so MLflow users pick genopt's
loop (with its explicit batch size, memory and acceptance rule) the same way::

    from mlflow_genopt.plugin.optimizer import GenoptPromptOptimizer

    result = mlflow.genai.optimize_prompts(
        predict_fn=predict_fn,                 # formats the registered prompt and calls a model
        train_data=dataset,                    # [{"inputs": {...}, "outputs": ...}, ...]
        prompt_uris=[prompt.uri],
        optimizer=GenoptPromptOptimizer("openai:/gpt-4.1-mini", batch_size=3, memory_size=3,
                                        acceptance="improve", steps=8),
        scorers=[Correctness()],
    )
    print(result.optimized_prompts[0].template)

How it maps. Each target prompt is a trainable ``prompt`` parameter whose placeholders are its
``{{variables}}`` (a proposal that drops one is invalid and never evaluated). A trial is one
training record run through MLflow's evaluation function (``predict_fn`` with the candidate
templates patched in, then the scorers): its score is the aggregated scorer value, its
feedback the scores, the expected output and the scorers' rationales. Each step samples
``batch_size`` records for the update; ``val_size`` records are held out to select the best
version (``None``: every record, as GEPA validates on the training set when it has no separate
validation set). The optimizer model is a genopt model spec (``smollm2``, ``openai:<model>``,
a ``.gguf`` path), MLflow's ``"openai:/<model>"`` form, or an :class:`~mlflow_genopt.llm.LLM`.

With ``enable_tracking`` (MLflow's default), the loop is logged like any genopt loop, as a child
run of the optimization run ``optimize_prompts`` opens: versions, learning contexts, scores,
and so the lineage page (``mlflow server --app-name genopt``). The parent run gets the tag
``genopt.loop_run_id``. MLflow itself registers the optimized prompts as new prompt versions.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.genai.optimize.optimizers.base import BasePromptOptimizer, _EvalFunc
from mlflow.genai.optimize.types import PromptOptimizerOutput
from mlflow.prompt.constants import PROMPT_TEMPLATE_VARIABLE_PATTERN

from ..artifact import ArtifactSpec, ArtifactVersion, Parameter
from ..build import run_loop
from ..config import LoopConfig
from ..llm import LLM
from ..task import Example, FixedSplits, Trial

__all__ = ["GenoptPromptOptimizer"]

_logger = logging.getLogger(__name__)

PROJECT = "optimize_prompts"
DEFAULT_OBJECTIVE = (
    "Maximise the score that the evaluation scorers give to an application's outputs. The "
    "application renders the prompt template(s) below, filling each {{variable}} with a "
    "record's inputs, and calls a language model; the scorers compare its output with the "
    "expected output. Higher scores are better."
)


def _identifier(name: str, taken: set[str]) -> str:
    ident = re.sub(r"\W", "_", name)
    if not ident or not (ident[0].isalpha() or ident[0] == "_"):
        ident = f"p_{ident}"
    base, n = ident, 2
    while ident in taken:
        ident, n = f"{base}_{n}", n + 1
    taken.add(ident)
    return ident


def _placeholders(template: str) -> tuple[str, ...]:
    """Every ``{{ variable }}`` of an MLflow template, verbatim, in order of first use."""
    seen: dict[str, None] = {}
    for match in PROMPT_TEMPLATE_VARIABLE_PATTERN.finditer(template):
        seen.setdefault(match.group(0), None)
    return tuple(seen)


def _model_spec(model: str) -> str:
    """MLflow's ``provider:/model`` form as a genopt spec (``openai:/gpt-4o`` -> ``openai:gpt-4o``)."""
    provider, sep, rest = model.partition(":/")
    return f"{provider}:{rest}" if sep and provider == "openai" else model


class _EvalFnTask(FixedSplits):
    """A genopt task over MLflow's evaluation function: one trial per training record."""

    def __init__(self, name: str, objective: str, spec: ArtifactSpec, names: Mapping[str, str],
                 eval_fn: _EvalFunc, train: list[Example], val: list[Example]) -> None:
        self.name = name
        self.objective = objective
        self.spec = spec
        self._names = dict(names)  # parameter -> MLflow prompt name
        self._eval_fn = eval_fn
        self._splits = {"train": train, "val": val, "test": []}

    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example]) -> list[Trial]:
        if not examples:
            return []
        candidates = {prompt: version.values[param] for param, prompt in self._names.items()}
        records = self._eval_fn(candidates, [e.input for e in examples])
        trials = []
        for example, record in zip(examples, records):
            if record.score is None:
                raise MlflowException.invalid_parameter_value(
                    "GenoptPromptOptimizer needs a score per record: pass scorers=[...] (and "
                    "train_data) to mlflow.genai.optimize_prompts"
                )
            trials.append(Trial(example.id, record.inputs, record.outputs, float(record.score),
                                _feedback(record)))
        return trials

    def close(self) -> None:
        pass


def _feedback(record: Any) -> str:
    parts = [f"Score {float(record.score):.4g}."]
    if record.individual_scores and len(record.individual_scores) > 1:
        parts.append("Scores: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float))
                                            else f"{k} {v}"
                                            for k, v in record.individual_scores.items()) + ".")
    expected = record.expectations
    if isinstance(expected, Mapping) and set(expected) == {"expected_response"}:
        expected = expected["expected_response"]
    if expected not in (None, {}, ""):
        parts.append(f"Expected: {expected}.")
    for scorer, rationale in (record.rationales or {}).items():
        if rationale:
            parts.append(f"{scorer}: {rationale}")
    return " ".join(parts)


class GenoptPromptOptimizer(BasePromptOptimizer):
    """Optimizes MLflow prompts with a genopt learning loop (see the module docstring).

    Parameters
    ----------
    optimizer_model:
        The optimizer LLM: a genopt model spec, MLflow's ``"openai:/<model>"``, or an LLM object.
    steps, batch_size, memory_size, acceptance, seed:
        The loop config fields of the same names (:class:`~mlflow_genopt.config.LoopConfig`):
        updates, records per update, past versions shown to the optimizer, and the acceptance
        rule (``always``, ``improve``, ``no_worse``).
    val_size:
        Records held out (seeded shuffle) to select the best version; ``None``: all records.
    temperature, max_tokens:
        Sampling of the optimizer LLM.
    objective:
        What the optimizer reads first; the default describes prompts scored by scorers.
    max_chars:
        Longest template a proposal may have (default: the larger of 1500 and 3x the template).
    cache_dir, base_url:
        LLM response cache and OpenAI-compatible endpoint, as for ``genopt run``.
    loop_options:
        Further :class:`LoopConfig` fields (``target_score``, ``max_tokens``, ``max_cost_usd``,
        ``revert_ratio``, ...).

    Invalid values raise :class:`~mlflow_genopt.config.ConfigError` here, not mid-optimization.
    """

    def __init__(
        self,
        optimizer_model: str | LLM = "smollm2",
        *,
        steps: int = 5,
        batch_size: int = 3,
        memory_size: int = 3,
        acceptance: str = "improve",
        val_size: int | None = None,
        seed: int = 0,
        temperature: float = 0.7,
        max_tokens: int = 768,
        objective: str | None = None,
        max_chars: int | None = None,
        cache_dir: str | Path | None = None,
        base_url: str | None = None,
        loop_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(optimizer_model, str):
            self.optimizer_model: str | LLM = _model_spec(optimizer_model)
        elif callable(getattr(optimizer_model, "complete", None)):
            self.optimizer_model = optimizer_model
        else:
            raise TypeError(
                f"optimizer_model: a model spec string or an LLM object, got {optimizer_model!r}")
        if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int)
                                     or val_size < 1):
            raise ValueError(f"val_size: must be an integer >= 1 or None, got {val_size!r}")
        self.val_size = val_size
        self.objective = objective or DEFAULT_OBJECTIVE
        self.max_chars = max_chars
        self.cache_dir = cache_dir
        self.base_url = base_url
        model_name = (self.optimizer_model if isinstance(self.optimizer_model, str)
                      else getattr(self.optimizer_model, "model", type(optimizer_model).__name__))
        self._fields = {
            "steps": steps, "batch_size": batch_size, "memory_size": memory_size,
            "acceptance": acceptance, "seed": seed, "optimizer_temperature": temperature,
            "optimizer_max_tokens": max_tokens, "optimizer_model": model_name,
            "task_model": "predict_fn", "max_workers": 1, **dict(loop_options or {}),
        }
        self.config(["prompt"])  # validate now

    def config(self, prompt_names: Sequence[str]) -> LoopConfig:
        """The loop config used for ``prompt_names``."""
        task = re.sub(r"[^A-Za-z0-9_.-]+", "-", "+".join(prompt_names)) or "prompts"
        return LoopConfig.from_dict({"project": PROJECT, "task": task, "init": "registered",
                                     **self._fields})

    def optimize(
        self,
        eval_fn: _EvalFunc,
        train_data: list[dict[str, Any]],
        target_prompts: dict[str, str],
        enable_tracking: bool = True,
    ) -> PromptOptimizerOutput:
        if not train_data or eval_fn is None:
            raise MlflowException.invalid_parameter_value(
                "GenoptPromptOptimizer needs train_data and scorers: the loop learns from scored "
                "trials"
            )
        if not target_prompts:
            raise MlflowException.invalid_parameter_value("no target prompts to optimize")
        config = self.config(list(target_prompts))
        taken: set[str] = set()
        names = {_identifier(name, taken): name for name in target_prompts}
        spec = ArtifactSpec(tuple(
            Parameter(
                param, "prompt",
                f"MLflow prompt {prompt!r}: the template the application renders. Variables in "
                "double braces are filled in by the application and must be kept verbatim.",
                placeholders=_placeholders(target_prompts[prompt]),
                max_chars=self.max_chars or max(1500, 3 * len(target_prompts[prompt])),
            )
            for param, prompt in names.items()
        ))
        train, val = self._split(train_data, config.seed)
        task = _EvalFnTask(f"{PROJECT}/{config.task}", self.objective, spec, names, eval_fn,
                           train, val)

        tracker = self._tracker(config) if enable_tracking else None
        initial = {param: target_prompts[prompt] for param, prompt in names.items()}
        result = run_loop(
            config, task=task, starting=initial, tracking=tracker, resume=None,
            optimizer_llm=None if isinstance(self.optimizer_model, str) else self.optimizer_model,
            cache_dir=self.cache_dir, base_url=self.base_url, register_prompts=False,
        )
        if tracker is not None and tracker.run_id and tracker.parent_run_id:
            try:
                mlflow.MlflowClient().set_tag(tracker.parent_run_id, "genopt.loop_run_id",
                                              tracker.run_id)
            except MlflowException:
                _logger.warning("genopt: could not tag the optimization run", exc_info=True)
        return PromptOptimizerOutput(
            optimized_prompts={prompt: result.selected.values[param]
                               for param, prompt in names.items()},
            initial_eval_score=result.versions[0].val_score,
            final_eval_score=result.best_val_score,
        )

    def _split(self, records: list[dict[str, Any]], seed: int):
        examples = [Example(f"record-{i}", record, record.get("outputs"))
                    for i, record in enumerate(records)]
        if self.val_size is None:
            return examples, examples
        if self.val_size >= len(examples):
            raise MlflowException.invalid_parameter_value(
                f"val_size {self.val_size} leaves no training record out of {len(examples)}")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        val = [examples[i] for i in sorted(order[: self.val_size])]
        train = [examples[i] for i in sorted(order[self.val_size :])]
        return train, val

    def _tracker(self, config: LoopConfig):
        """A child run of the active (optimization) run, when the store is one genopt tracks to."""
        parent = mlflow.active_run()
        uri = mlflow.get_tracking_uri()
        if parent is None or urlparse(uri).scheme in ("", "file"):
            if parent is not None:
                _logger.warning("genopt: the loop is not tracked: %s is a file store", uri)
            return None
        from ..tracking import MlflowTracker

        experiment = mlflow.get_experiment(parent.info.experiment_id).name
        # Synchronous writes: MLflow's evaluation sets up autologging (import hooks) on this
        # thread at every eval_fn call, and an MLflow client created on the tracker's writer
        # thread at the same moment can deadlock on the import lock.
        return MlflowTracker(uri, experiment, run_name=f"genopt-{config.task}", nested=True,
                             parent_run_id=parent.info.run_id, asynchronous=False)
