"""The loop config: every design choice of one learning loop, as one validated value.

Like a scikit-learn estimator's constructor arguments: plain typed fields, validated once at
construction, printable, and round-trippable through ``to_params``/``from_params`` (the flat
string form that becomes MLflow params and the names Optuna's search space uses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ACCEPTANCE_RULES = ("always", "improve", "no_worse")


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


@dataclass(frozen=True)
class LoopConfig:
    """Every design choice of one learning loop.

    Starting artifact
        ``init`` names the starting artifact a project offers (e.g. ``prompt_only``);
        ``trainable`` optionally restricts which of its parameters the optimizer may edit
        (``None``: as the starting artifact says).
    Experience batching
        ``batch_size`` trials (training examples, or episodes) per update.
    Credit horizon
        ``credit_horizon``: how many steps of each trial's trace the learning context shows
        (``None``: the whole trace). ``update_every``: environment steps between updates for
        multi-step tasks (``None``: equal to ``credit_horizon``); single-step tasks ignore it.
    Memory and acceptance
        ``memory_size`` past versions (with their scores and feedback) are shown to the optimizer;
        ``acceptance`` decides whether a valid proposal replaces the current version: ``always``,
        ``improve`` (its batch score must beat the current one), or ``no_worse`` (ties accepted).
    Recovery and stopping
        ``revert_ratio``: when the current version's validation score stays below
        ``revert_ratio * best`` for more than ``revert_patience`` consecutive steps, the loop
        goes back to the best version (the Atari study used 0.8 and 5). ``target_score``: stop
        early once the best validation score reaches it.
    """

    project: str = "bbeh"
    task: str = "generated_boolean"
    init: str = "prompt_only"
    trainable: tuple[str, ...] | None = None
    steps: int = 5
    batch_size: int = 3
    credit_horizon: int | None = None
    update_every: int | None = None
    memory_size: int = 3
    acceptance: str = "improve"
    revert_ratio: float | None = None
    revert_patience: int = 5
    target_score: float | None = None
    optimizer_model: str = "smollm2"
    optimizer_temperature: float = 0.7
    optimizer_max_tokens: int = 768
    task_model: str = "smollm2"
    task_temperature: float = 0.0
    seed: int = 0
    max_workers: int = 4
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_wall_time_s: float | None = None
    task_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("project", _name("project", self.project))
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
        set_("revert_ratio", _float("revert_ratio", self.revert_ratio, 0, 1, optional=True))
        set_("revert_patience", _int("revert_patience", self.revert_patience, 0))
        set_("target_score", _float("target_score", self.target_score, -1e12, 1e12, optional=True))
        set_("optimizer_model", _name("optimizer_model", self.optimizer_model))
        set_("optimizer_temperature", _float("optimizer_temperature", self.optimizer_temperature, 0, 2))
        set_("optimizer_max_tokens", _int("optimizer_max_tokens", self.optimizer_max_tokens, 16))
        set_("task_model", _name("task_model", self.task_model))
        set_("task_temperature", _float("task_temperature", self.task_temperature, 0, 2))
        set_("seed", _int("seed", self.seed, 0))
        set_("max_workers", _int("max_workers", self.max_workers, 1))
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

    @classmethod
    def from_file(cls, path: str | Path) -> "LoopConfig":
        """Load a YAML or JSON file holding a mapping of config fields."""
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
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Hash of the design choices; equal configs give equal hashes."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _parse_param(raw: str, type_name: str) -> Any:
    if raw == "none":
        return None
    if "tuple" in type_name:
        return tuple(s for s in raw.split(",") if s)
    if type_name.startswith("int"):
        return int(raw)
    if type_name.startswith("float"):
        return float(raw)
    return raw


def config_fields() -> list[str]:
    return [f.name for f in fields(LoopConfig)]
