"""The loop config: every design choice of one learning loop, as one validated value.

Like a scikit-learn estimator's constructor arguments: plain typed fields, validated once at
construction, printable, and round-trippable through ``to_params``/``from_params`` (the flat
string form that becomes MLflow params and the names Optuna's search space uses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .executor import check_executor

ACCEPTANCE_RULES = ("always", "improve", "no_worse")
EDIT_FORMATS = ("json", "tagged", "diff")
SELECTIONS = ("current", "best", "pareto")
PARAMETER_SELECTIONS = ("all", "round_robin")


class ConfigError(ValueError):
    """A loop config value is invalid. The message is one line: field, problem, what is allowed."""


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))


def _int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    if optional and _is_none(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            none = " or none" if optional else ""
            raise ConfigError(f"{name}: must be an integer >= {minimum}{none}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value}")
    return value


def _float(name: str, value: Any, low: float, high: float, *, optional: bool = False):
    if optional and _is_none(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: must be a number in [{low}, {high}], got {value!r}") from None
    if isinstance(value, bool) or not (low <= number <= high):
        raise ConfigError(f"{name}: must be a number in [{low}, {high}], got {value!r}")
    return number


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}: must be a non-empty string, got {value!r}")
    return value.strip()


class _Unset:
    """The default of every :class:`LoopConfig` field: "not given", so that the project's own
    default (or the generic one) fills it in."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "unset"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()

# What a field is when neither the caller nor the project sets it. ``task_model`` and
# ``task_temperature`` are resolved from the project (see ``LoopConfig``).
GENERIC_DEFAULTS: dict[str, Any] = {
    "task": "default",
    "init": "default",
    "trainable": None,
    "steps": 5,
    "batch_size": 3,
    "credit_horizon": None,
    "update_every": None,
    "memory_size": 3,
    "acceptance": "improve",
    "acceptance_margin": 0.0,
    "edit_format": "tagged",
    "repair_attempts": 2,
    "precheck": True,
    "candidates_per_step": 1,
    "selection": "current",
    "parameter_selection": "all",
    "revert_ratio": None,
    "revert_patience": 5,
    "target_score": None,
    "optimizer_model": "smollm2",
    "optimizer_temperature": 0.7,
    "repeat_temperature": 1.0,
    "optimizer_max_tokens": 768,
    "optimizer_n_ctx": None,
    "task_model": None,
    "task_temperature": None,
    "seed": 0,
    "max_workers": 4,
    "executor": "local",
    "max_tokens": None,
    "max_cost_usd": None,
    "max_wall_time_s": None,
    "task_options": {},
}
DEFAULT_TASK_MODEL = "smollm2"
# Fields that say where a loop runs, not what it is: logged, but left out of config_hash (resume
# matching), of a study's definition and of the evaluation cache's task fingerprint.
LOCATION_FIELDS = ("executor",)  # for projects whose tasks call an LLM


@dataclass(frozen=True)
class LoopConfig:
    """Every design choice of one learning loop.

    Defaults: a field that is not given takes the project's default (``Project.defaults`` of
    the project registered as ``project``), else the generic default in
    :data:`GENERIC_DEFAULTS`. So ``LoopConfig(project="atari")`` is the Atari study's setup,
    and ``LoopConfig(project="atari", steps=3)`` changes only the number of steps. A field that
    does not apply to the project is refused, never logged and ignored: ``credit_horizon`` and
    ``update_every`` need a multi-step project (trials with traces), ``task_model`` and
    ``task_temperature`` a project whose task calls an LLM (otherwise they are ``None``).

    Starting artifact
        ``init`` names the starting artifact a project offers (e.g. ``prompt_only``);
        ``trainable`` optionally restricts which of its parameters the optimizer may edit
        (``None``: as the starting artifact says).
    Experience batching
        ``batch_size`` trials (training examples, or episodes) per update.
    Credit horizon
        ``credit_horizon``: how many steps of each trial's trace the learning context shows
        (``None``: the whole trace). ``update_every``: environment steps between updates for
        multi-step tasks (``None``: equal to ``credit_horizon``); see :func:`env_steps`.
    Memory and acceptance
        ``memory_size`` past versions (with their scores and feedback) are shown to the optimizer;
        ``acceptance`` decides whether the step's best candidate is adopted: ``always``,
        ``improve`` (its batch score must exceed the improved version's by more than
        ``acceptance_margin``; a tie is rejected) or ``no_worse`` (it may be lower by at most
        ``acceptance_margin``; a tie is accepted).
    How the optimizer answers and what it improves
        ``edit_format``: ``tagged`` (default: complete values in delimited blocks, no
        escaping; an answer in another known format is still understood and the repair noted),
        ``json`` (complete values in one JSON object) or ``diff`` (SEARCH/REPLACE edits of the
        current values). ``repair_attempts`` (default 2): how often an invalid answer is sent
        back with its reason before the candidate counts as invalid. ``precheck`` (default
        true): a candidate is first run by the task's cheap ``precheck`` hook (where it has
        one, e.g. the ML pipeline fits 240 rows and predicts 60) and a failure goes back as a
        repair with the error and the failed values to fix, before any scoring (a task's
        ``quick_fix`` hook may fix it mechanically first, e.g. a missing import). ``candidates_per_step``: candidates drawn
        per step; each valid one is scored on the batch and the best goes through acceptance.
        ``selection``: which adopted version a step improves: ``current`` (the latest), ``best``
        (best validation score) or ``pareto`` (drawn from the per-example Pareto frontier).
        ``parameter_selection``: which trainable parameters one step may change: ``all`` (every
        one) or ``round_robin`` (one per step, in the order of the starting artifact: step ``s``
        edits trainable parameter ``(s - 1) mod n``, the others are shown as frozen; GEPA's
        default ``module_selector``). With one trainable parameter the two are the same.
    Optimizer model
        ``optimizer_model`` is a model spec (see :mod:`mlflow_genopt.llm`);
        ``optimizer_n_ctx`` sets an embedded model's context window (``None``: the model's
        trained window from its GGUF header, bounded by memory). ``optimizer_temperature``
        (0.7) samples its answers; ``repeat_temperature`` (1.0; ``None``: the same) samples the
        repair of an answer that repeats something (it changes nothing, or equals a version
        already evaluated or a failed proposal of the step, or loops to the token limit, or
        fails with the same reason as the answer before it): Qwen2.5-Coder-1.5B resent such
        answers at 0.7 with a new seed.
    Recovery and stopping
        ``revert_ratio``: when the current version's validation score stays below
        ``revert_ratio * best`` for more than ``revert_patience`` consecutive steps, the loop
        goes back to the best version (the Atari study used 0.8 and 5). ``target_score``: stop
        early once the best validation score reaches it.
    Where evaluations run
        ``executor``: ``local`` (this machine), ``dask://HOST:PORT`` (a Dask scheduler) or
        ``dask:local[N]`` (an in-process cluster of N workers); see :mod:`~.executor`. It is
        logged but is not part of the loop's identity (:data:`LOCATION_FIELDS`): the same loop
        gives the same trials wherever it runs, and resumes anywhere.
    """

    project: str = UNSET
    task: str = UNSET
    init: str = UNSET
    trainable: tuple[str, ...] | None = UNSET
    steps: int = UNSET
    batch_size: int = UNSET
    credit_horizon: int | None = UNSET
    update_every: int | None = UNSET
    memory_size: int = UNSET
    acceptance: str = UNSET
    acceptance_margin: float = UNSET
    edit_format: str = UNSET
    repair_attempts: int = UNSET
    precheck: bool = UNSET
    candidates_per_step: int = UNSET
    selection: str = UNSET
    parameter_selection: str = UNSET
    revert_ratio: float | None = UNSET
    revert_patience: int = UNSET
    target_score: float | None = UNSET
    optimizer_model: str = UNSET
    optimizer_temperature: float = UNSET
    repeat_temperature: float | None = UNSET
    optimizer_max_tokens: int = UNSET
    optimizer_n_ctx: int | None = UNSET
    task_model: str | None = UNSET
    task_temperature: float | None = UNSET
    seed: int = UNSET
    max_workers: int = UNSET
    executor: str = UNSET
    max_tokens: int | None = UNSET
    max_cost_usd: float | None = UNSET
    max_wall_time_s: float | None = UNSET
    task_options: Mapping[str, Any] = UNSET

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if self.project is UNSET:
            raise ConfigError("project: required (the registered project, e.g. bbeh; "
                              "`genopt projects` lists them)")
        set_("project", _name("project", self.project))
        info = _project_info(self.project)
        defaults = {**GENERIC_DEFAULTS, **(dict(info.defaults) if info else {})}
        given = {f.name for f in fields(self) if getattr(self, f.name) is not UNSET}
        for f in fields(self):
            if getattr(self, f.name) is UNSET:
                set_(f.name, defaults.get(f.name))
        set_("task", _name("task", self.task))
        set_("init", _name("init", self.init))
        if _is_none(self.trainable):
            set_("trainable", None)
        else:
            items = self.trainable
            if isinstance(items, str):
                items = [s for s in items.replace(",", " ").split() if s]
            if not items or not all(isinstance(s, str) and s.isidentifier() for s in items):
                raise ConfigError(
                    f"trainable: must be a non-empty list of parameter names or none, got {self.trainable!r}"
                )
            set_("trainable", tuple(items))
        set_("steps", _int("steps", self.steps, 0))
        set_("batch_size", _int("batch_size", self.batch_size, 1))
        set_("credit_horizon", _int("credit_horizon", self.credit_horizon, 1, optional=True))
        set_("update_every", _int("update_every", self.update_every, 1, optional=True))
        set_("memory_size", _int("memory_size", self.memory_size, 0))
        set_("acceptance", _choice("acceptance", self.acceptance, ACCEPTANCE_RULES))
        set_("acceptance_margin", _float("acceptance_margin", self.acceptance_margin, 0, 1e12))
        set_("edit_format", _choice("edit_format", self.edit_format, EDIT_FORMATS))
        set_("repair_attempts", _int("repair_attempts", self.repair_attempts, 0))
        if not isinstance(self.precheck, bool):
            raise ConfigError(f"precheck: must be true or false, got {self.precheck!r}")
        set_("candidates_per_step", _int("candidates_per_step", self.candidates_per_step, 1))
        set_("selection", _choice("selection", self.selection, SELECTIONS))
        set_("parameter_selection", _choice("parameter_selection", self.parameter_selection,
                                            PARAMETER_SELECTIONS))
        set_("revert_ratio", _float("revert_ratio", self.revert_ratio, 0, 1, optional=True))
        set_("revert_patience", _int("revert_patience", self.revert_patience, 0))
        set_("target_score", _float("target_score", self.target_score, -1e12, 1e12, optional=True))
        set_("optimizer_model", _name("optimizer_model", self.optimizer_model))
        set_("optimizer_temperature", _float("optimizer_temperature", self.optimizer_temperature, 0, 2))
        set_("repeat_temperature", _float("repeat_temperature", self.repeat_temperature, 0, 2,
                                          optional=True))
        set_("optimizer_max_tokens", _int("optimizer_max_tokens", self.optimizer_max_tokens, 16))
        set_("optimizer_n_ctx", _int("optimizer_n_ctx", self.optimizer_n_ctx, 256, optional=True))
        if self.optimizer_n_ctx is not None and not _embedded(self.optimizer_model):
            raise ConfigError(
                f"optimizer_n_ctx: applies to an embedded optimizer model (smollm2 or a .gguf "
                f"file); {self.optimizer_model!r} is an endpoint, whose window its server sets; "
                f"leave it none, got {self.optimizer_n_ctx}")
        self._resolve_task_model(info, given)
        set_("seed", _int("seed", self.seed, 0))
        set_("max_workers", _int("max_workers", self.max_workers, 1))
        try:
            set_("executor", check_executor(self.executor))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        set_("max_tokens", _int("max_tokens", self.max_tokens, 1, optional=True))
        set_("max_cost_usd", _float("max_cost_usd", self.max_cost_usd, 0, 1e9, optional=True))
        set_("max_wall_time_s", _float("max_wall_time_s", self.max_wall_time_s, 0, 1e9, optional=True))
        if not isinstance(self.task_options, Mapping):
            raise ConfigError(f"task_options: must be a mapping, got {self.task_options!r}")
        for key, value in self.task_options.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"task_options: keys must be identifiers, got {key!r}")
            if not (value is None or isinstance(value, (str, int, float, bool))):
                raise ConfigError(
                    f"task_options.{key}: must be a string, number, boolean or none, got {value!r}"
                )
        set_("task_options", dict(sorted(self.task_options.items())))
        if info is not None:
            self._refuse_what_does_not_apply(info)

    def _resolve_task_model(self, info: "ProjectInfo | None", given: set[str]) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        uses_llm = info.needs_task_llm if info is not None else not _is_none(self.task_model)
        if info is not None and not info.needs_task_llm:
            for name in ("task_model", "task_temperature"):
                if name in given and not _is_none(getattr(self, name)):
                    raise ConfigError(
                        f"{name}: project {self.project} does not call a task LLM; leave it unset "
                        f"(none), got {getattr(self, name)!r}")
            set_("task_model", None)
            set_("task_temperature", None)
            return
        if _is_none(self.task_model):
            set_("task_model", DEFAULT_TASK_MODEL if uses_llm else None)
        if self.task_model is None:
            set_("task_temperature", None)
            return
        set_("task_model", _name("task_model", self.task_model))
        temperature = 0.0 if _is_none(self.task_temperature) else self.task_temperature
        set_("task_temperature", _float("task_temperature", temperature, 0, 2))

    def _refuse_what_does_not_apply(self, info: "ProjectInfo") -> None:
        if self.executor != "local" and not info.uses_executor:
            raise ConfigError(
                f"executor: project {self.project} runs its evaluations in this process (its "
                f"tasks do not submit units to an executor), so it must be local, got "
                f"{self.executor!r}")
        if not info.multi_step:
            for name in ("credit_horizon", "update_every"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{name}: applies to multi-step tasks (trials with traces); project "
                        f"{self.project}'s trials are single-step, so it must be none, got "
                        f"{getattr(self, name)!r}")

    # --- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["trainable"] = list(self.trainable) if self.trainable is not None else None
        data["task_options"] = dict(self.task_options)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoopConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: unknown loop config field; known fields: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "LoopConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def to_params(self) -> dict[str, str]:
        """Flat string params (MLflow's form). ``task_options`` become ``task_options.<key>``."""
        params: dict[str, str] = {}
        for key, value in self.to_dict().items():
            if key == "task_options":
                for opt_key, opt_value in value.items():
                    params[f"task_options.{opt_key}"] = json.dumps(opt_value)
            elif key == "trainable":
                params[key] = "none" if value is None else ",".join(value)
            else:
                params[key] = "none" if value is None else str(value)
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "LoopConfig":
        """Inverse of :meth:`to_params`; extra keys that are not config fields are ignored."""
        types = {f.name: f.type for f in fields(cls)}
        data: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for key, raw in params.items():
            if key.startswith("task_options."):
                options[key.split(".", 1)[1]] = json.loads(raw)
            elif key in types and key != "task_options":
                data[key] = _parse_param(raw, str(types[key]))
        data["task_options"] = options
        return cls.from_dict(data)

    @staticmethod
    def file_fields(path: str | Path) -> dict[str, Any]:
        """The fields a YAML or JSON config file names (only those: the layering in
        :func:`mlflow_genopt.build.resolve_config` lets the others take their defaults)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid YAML/JSON (not UTF-8 text: byte {exc.start} "
                              "cannot be decoded); pass a YAML file of loop config fields") from None
        try:
            import yaml

            data = yaml.safe_load(text)
        except Exception as exc:  # yaml errors carry multi-line marks; keep one line
            raise ConfigError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: must hold a mapping of loop config fields")
        known = {f.name for f in fields(LoopConfig)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"{path}: {unknown[0]}: unknown loop config field; known fields: "
                              f"{', '.join(sorted(known))}")
        return dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "LoopConfig":
        """Load a YAML or JSON file holding a mapping of config fields (the project's defaults
        fill in the fields it does not name)."""
        return cls.from_dict(cls.file_fields(path))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`LOCATION_FIELDS`: what makes two loops the same loop."""
        return {k: v for k, v in self.to_dict().items() if k not in LOCATION_FIELDS}

    def config_hash(self) -> str:
        """Hash of the design choices; equal configs give equal hashes. Where the loop runs
        (:data:`LOCATION_FIELDS`) is not a design choice and does not count."""
        blob = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ProjectInfo:
    """What the config needs to know of a registered project (see :class:`~.project.Project`)."""

    defaults: Mapping[str, Any]
    multi_step: bool
    needs_task_llm: bool
    uses_executor: bool = False


def _embedded(spec: str) -> bool:
    from .llm import is_embedded  # lazy: keep `import mlflow_genopt.config` light

    return is_embedded(spec)


def _project_info(name: str) -> ProjectInfo | None:
    from .project import registered_project_info  # the registry imports this module

    return registered_project_info(name)


def env_steps(config: LoopConfig) -> int | None:
    """Environment steps between two updates of a multi-step task: ``update_every``, else
    ``credit_horizon``; ``None`` (both unset) means a whole episode. The loop hands it to tasks
    in their :class:`~.task.EvalContext`."""
    return config.update_every or config.credit_horizon


def _parse_param(raw: str, type_name: str) -> Any:
    if raw == "none":
        return None
    if "tuple" in type_name:
        return tuple(s for s in raw.split(",") if s)
    if type_name.startswith("int"):
        return int(raw)
    if type_name.startswith("float"):
        return float(raw)
    if type_name == "bool":
        return {"True": True, "False": False}.get(raw, raw)
    return raw


def config_fields() -> list[str]:
    return [f.name for f in fields(LoopConfig)]
