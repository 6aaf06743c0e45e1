"""The selected version's prompts, registered in the MLflow Prompt Registry.

:class:`PromptRegistrar` is a :class:`~mlflow_genopt.events.LoopCallback` that ``run_loop``
adds after its :class:`~mlflow_genopt.tracking.MlflowTracker` (``register_prompts=True``, the
default). When the loop ends, every trainable ``prompt``-kind parameter of the selected version
becomes a version of the MLflow prompt ``genopt-<project>-<task>-<parameter>`` (characters
MLflow does not allow in prompt names become ``-``), linked to the loop's run and to the
selected version's LoggedModel, so an application loads it by URI::

    prompt = mlflow.genai.load_prompt("prompts:/genopt-bbeh-generated_boolean-prompt/1")
    text = prompt.format(question="not ( True ) and ( True ) is")

Placeholders. genopt prompt parameters declare their placeholders in Python ``str.format``
style (``{question}``); MLflow prompt templates use double braces (``{{question}}``). Each
declared placeholder is converted, and only those: other braces stay literal text, so
``prompt.format(question=q)`` returns exactly the text the loop sent to the task model
(``template.replace("{question}", q)``). A prompt whose text already contains ``{{name}}`` would
gain an MLflow variable ``name``; genopt's own projects have none.

Registering again an identical text makes no new version: the existing one is linked to the run.
Each prompt version carries the tags ``genopt.run_id``, ``genopt.version_id``,
``genopt.config_hash``, ``genopt.val_score`` and ``genopt.test_score``; the run gets the tag
``genopt.registered_prompts`` (comma-separated URIs). A registration that fails (e.g. a tracking
server without a prompt registry) is logged as a warning; it never fails the finished loop.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import mlflow
from mlflow import MlflowClient

from ..artifact import ArtifactSpec, Parameter
from ..events import LoopCallback, LoopResult, LoopStart
from ..tracking import layout

__all__ = ["PromptRegistrar", "prompt_name", "to_mlflow_template", "register_prompts"]

_logger = logging.getLogger(__name__)
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_FORMAT_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def prompt_name(project: str, task: str, parameter: str) -> str:
    """``genopt-<project>-<task>-<parameter>`` with characters MLflow rejects in prompt names
    (anything but letters, digits, ``_``, ``.``, ``-``) replaced by ``-``."""
    raw = f"genopt-{project}-{task}-{parameter}"
    return _INVALID_NAME_CHARS.sub("-", raw).strip("-")


def to_mlflow_template(text: str, placeholders: Sequence[str]) -> str:
    """``text`` with each ``{name}`` placeholder in ``placeholders`` written ``{{name}}``.

    Placeholders not of the ``{identifier}`` form are left unchanged."""
    for placeholder in placeholders:
        match = _FORMAT_PLACEHOLDER.match(placeholder)
        if match:
            text = text.replace(placeholder, "{{" + match.group(1) + "}}")
    return text


def _registrable(spec: ArtifactSpec) -> list[Parameter]:
    return [p for p in spec.parameters if p.kind == "prompt" and p.trainable]


def register_prompts(
    client: MlflowClient,
    result: LoopResult,
    spec: ArtifactSpec,
    *,
    run_id: str | None = None,
    model_id: str | None = None,
) -> list[str]:
    """Register the trainable prompt parameters of ``result.selected``; link each to ``run_id``
    and ``model_id`` when given. Returns the prompt URIs (``prompts:/<name>/<version>``)."""
    config, selected = result.config, result.selected
    uris: list[str] = []
    for parameter in _registrable(spec):
        name = prompt_name(config.project, config.task, parameter.name)
        template = to_mlflow_template(selected.values[parameter.name], parameter.placeholders)
        tags = {
            layout.TAG_VERSION_ID: selected.version_id,
            layout.TAG_CONFIG_HASH: config.config_hash(),
            layout.TAG_VAL_SCORE: repr(result.best_val_score),
            layout.TAG_TEST_SCORE: repr(result.test_score),
        }
        if run_id is not None:
            tags[layout.TAG_RUN_ID] = run_id
        version = _existing_version(client, name, template)
        if version is None:
            version = client.register_prompt(
                name=name,
                template=template,
                commit_message=(
                    f"genopt: selected version {selected.version_id} of parameter "
                    f"{parameter.name!r} (val score {result.best_val_score:.4g})"
                ),
                tags=tags,
            )
        if run_id is not None:
            client.link_prompt_version_to_run(run_id, version)
        if model_id is not None:
            client.link_prompt_version_to_model(version.name, str(version.version), model_id)
        uris.append(f"prompts:/{version.name}/{version.version}")
    return uris


def _existing_version(client: MlflowClient, name: str, template: str):
    """The newest version of prompt ``name`` whose template is ``template``, if any."""
    if client.get_prompt(name) is None:
        return None
    versions = client.search_prompt_versions(name, max_results=100)
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if version.template == template:
            return version
    return None


class PromptRegistrar(LoopCallback):
    """Registers the selected prompts once the loop's tracker has ended its run.

    ``tracker`` is the loop's :class:`~mlflow_genopt.tracking.MlflowTracker`; list this callback
    after it, so that its run, models and metrics are written before registration starts.
    """

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.spec: ArtifactSpec | None = None
        self.uris: list[str] = []
        self.error: str | None = None

    def on_loop_start(self, start: LoopStart) -> None:
        self.spec = start.spec

    def on_loop_end(self, result: LoopResult) -> None:
        run_id = self.tracker.run_id
        if self.spec is None or run_id is None or not _registrable(self.spec):
            return
        try:
            self.tracker.flush()
            client = MlflowClient(mlflow.get_tracking_uri())  # the tracker set it
            model_id = self.tracker.model_ids.get(result.selected.version_id)
            self.uris = register_prompts(client, result, self.spec, run_id=run_id,
                                         model_id=model_id)
            if self.uris:
                client.set_tag(run_id, layout.TAG_REGISTERED_PROMPTS, ",".join(self.uris))
        except Exception as exc:  # the loop is over and tracked; registration is a bonus
            self.error = f"{type(exc).__name__}: {exc}"
            _logger.warning("genopt: could not register the selected prompt(s) in MLflow (%s)",
                            self.error, exc_info=True)


def registered_prompts(tags: Mapping[str, str]) -> list[str]:
    """The prompt URIs a loop run registered, from its tags."""
    value = tags.get(layout.TAG_REGISTERED_PROMPTS, "")
    return [uri for uri in value.split(",") if uri]
