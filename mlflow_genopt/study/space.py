"""The search-space language: which loop-config fields a study searches, and over what.

The plain form that projects (``SimpleProject.search_space``), YAML/JSON files and flags share::

    init: [prompt_only, prompt_and_extraction]   # categorical (a list; "none" means None)
    batch_size: [1, 3, 5]
    memory_size: {low: 0, high: 6, step: 2}       # integer range (ints give an IntRange)
    optimizer_temperature: {low: 0.1, high: 1.0, log: true}   # float range
    task_options.train_size: [10, 15]            # a task option

Flags: ``--param batch_size=1,3,5``, ``--param memory_size=0..6:2``,
``--param optimizer_temperature=0.1..1.0:log``. Every name is a loop-config field but
``project`` (or ``task_options.<key>``); a bad spec is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, LoopConfig, config_fields

_NOT_SEARCHABLE = ("project", "task_options")


@dataclass(frozen=True)
class Categorical:
    """A list of choices (``None``, booleans, numbers or strings)."""

    choices: tuple[Any, ...]

    def values(self) -> tuple[Any, ...]:
        return self.choices

    def to_spec(self) -> Any:
        return list(self.choices)


@dataclass(frozen=True)
class IntRange:
    """Integers ``low..high`` (inclusive) with ``step``, or log-uniform with ``log`` (step 1)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def values(self) -> tuple[int, ...]:
        return tuple(range(self.low, self.high + 1, self.step))

    def to_spec(self) -> Any:
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


@dataclass(frozen=True)
class FloatRange:
    """Floats in ``[low, high]``: continuous, log-uniform with ``log``, or a grid with ``step``."""

    low: float
    high: float
    step: float | None = None
    log: bool = False

    def values(self) -> tuple[float, ...] | None:
        if self.step is None:
            return None  # continuous: no grid
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return tuple(round(self.low + i * self.step, 12) for i in range(count))

    def to_spec(self) -> Any:
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


Dimension = Categorical | IntRange | FloatRange


def _none_like(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    return value


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"search space: parameter names must be strings, got {name!r}")
    if name.startswith("task_options."):
        key = name.split(".", 1)[1]
        if not key.isidentifier():
            raise ConfigError(f"search space: {name}: task option keys must be identifiers")
        return name
    searchable = [f for f in config_fields() if f not in _NOT_SEARCHABLE]
    if name not in searchable:
        raise ConfigError(
            f"search space: {name}: not a searchable loop config field; use one of "
            f"{', '.join(searchable)} or task_options.<key>"
        )
    return name


def _number(name: str, key: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"search space: {name}.{key}: must be a number, got {value!r}")
    return value


def _dimension(name: str, spec: Any) -> Dimension:
    if isinstance(spec, Mapping) and "choices" in spec:
        spec = spec["choices"]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"search space: {name}: needs at least one choice")
        choices = tuple(_none_like(v) for v in spec)
        for choice in choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise ConfigError(
                    f"search space: {name}: choices must be none, booleans, numbers or strings, "
                    f"got {choice!r} (write lists as a comma-separated string)"
                )
        if len(set(map(value_key, choices))) != len(choices):
            raise ConfigError(f"search space: {name}: choices must be distinct, got {list(choices)}")
        return Categorical(choices)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"low", "high", "step", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            raise ConfigError(
                f"search space: {name}: a range is {{low, high[, step][, log]}}, a categorical a "
                f"list; got {dict(spec)!r}"
            )
        low, high = _number(name, "low", spec["low"]), _number(name, "high", spec["high"])
        step = spec.get("step")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"search space: {name}.log: must be true or false, got {log!r}")
        if step is not None:
            step = _number(name, "step", step)
            if step <= 0:
                raise ConfigError(f"search space: {name}.step: must be > 0, got {step}")
        if high < low:
            raise ConfigError(f"search space: {name}: high ({high}) must be >= low ({low})")
        if log and low <= 0:
            raise ConfigError(f"search space: {name}: a log range needs low > 0, got {low}")
        if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)):
            if log and step not in (None, 1):
                raise ConfigError(f"search space: {name}: a log integer range cannot have a step")
            return IntRange(low, high, step or 1, log)
        if log and step is not None:
            raise ConfigError(f"search space: {name}: a log float range cannot have a step")
        return FloatRange(float(low), float(high), None if step is None else float(step), log)
    return Categorical((_none_like(spec),))  # a single value: the field is fixed


def parse_search_space(spec: Mapping[str, Any] | None) -> dict[str, Dimension]:
    """The plain form (module docstring) -> dimensions; one-line :class:`ConfigError` if bad."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"search space: must be a mapping of field -> choices, got {spec!r}")
    return {check_name(name): _dimension(name, value) for name, value in spec.items()}


def search_space_to_spec(space: Mapping[str, Dimension]) -> dict[str, Any]:
    return {name: dim.to_spec() for name, dim in space.items()}


def parse_param(text: str) -> tuple[str, Dimension]:
    """One ``--param NAME=SPEC`` flag: ``a,b,c`` (choices), ``LOW..HIGH`` with an optional
    ``:STEP`` or ``:log``, a YAML list/mapping, or a single value."""
    import yaml

    if "=" not in text:
        raise ConfigError(
            f"--param {text!r}: expected NAME=SPEC, e.g. batch_size=1,3,5 or memory_size=0..6:2"
        )
    name, raw = (s.strip() for s in text.split("=", 1))
    name = check_name(name)

    def scalar(s: str) -> Any:
        try:
            return yaml.safe_load(s) if s.strip() else ""
        except yaml.YAMLError:
            return s

    if raw.startswith(("[", "{")):
        try:
            return name, _dimension(name, yaml.safe_load(raw))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--param {name}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if ".." in raw:
        bounds, _, suffix = raw.partition(":")
        low, _, high = bounds.partition("..")
        spec: dict[str, Any] = {"low": scalar(low), "high": scalar(high)}
        if suffix.strip().lower() == "log":
            spec["log"] = True
        elif suffix.strip():
            spec["step"] = scalar(suffix)
        return name, _dimension(name, spec)
    return name, _dimension(name, [scalar(s) for s in raw.split(",")])


def load_search_space(path: str | Path) -> dict[str, Dimension]:
    """A YAML/JSON file holding a search space mapping (``{}`` or empty: no dimension)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read search space file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON (not UTF-8 text: byte {exc.start} "
                          "cannot be decoded)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    return parse_search_space(data or {})


def value_key(value: Any) -> str:
    """A value (or a point, as sorted items) as comparable text."""
    return json.dumps(value, sort_keys=True)


def apply_params(base: LoopConfig, params: Mapping[str, Any]) -> LoopConfig:
    """``base`` with a point's values (``task_options.<key>`` sets one task option)."""
    fields_, options = {}, dict(base.task_options)
    for name, value in params.items():
        if name.startswith("task_options."):
            options[name.split(".", 1)[1]] = value
        else:
            fields_[name] = value
    return base.replace(**fields_, task_options=options)


def validate_space(base: LoopConfig, space: Mapping[str, Dimension]) -> None:
    """Every value a trial can get must make a valid LoopConfig: checked before anything runs."""
    for name, dim in space.items():
        # loop-config constraints are bounds, so a range's ends stand for all of it
        values = dim.values() if isinstance(dim, Categorical) else (dim.low, dim.high)
        for value in values:
            try:
                apply_params(base, {name: value})
            except ConfigError as exc:
                raise ConfigError(f"search space: {name}={value!r}: {exc}") from None


def dimension_size(dim: Dimension) -> int | None:
    """How many values ``dim`` has (``None``: a continuous range), without listing them."""
    if isinstance(dim, Categorical):
        return len(dim.choices)
    if dim.step is None and isinstance(dim, FloatRange):
        return None
    return int(math.floor((dim.high - dim.low) / dim.step + 1e-9)) + 1


def finite_points(space: Mapping[str, Dimension]) -> list[dict[str, Any]] | None:
    """Every point of a finite space (``None`` if a range is continuous)."""
    values = {name: dim.values() for name, dim in sorted(space.items())}
    if any(v is None for v in values.values()):
        return None
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def point_label(params: Mapping[str, Any]) -> str:
    """A point as ``name=value`` words, for progress lines and plot legends."""
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))
