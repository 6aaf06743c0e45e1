"""What is optimized: named parameters, and immutable versions of their values.

An :class:`ArtifactSpec` says which parameters exist, what each one is (Python source of one
function, or a prompt text), whether the optimizer may change it, and what it is for. An
:class:`ArtifactVersion` is one value of every parameter plus its lineage (parent id, the step
that made it). Versions are never mutated: a proposal produces a new version.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Mapping

ParameterKind = Literal["code", "prompt"]
PARAMETER_KINDS: tuple[str, ...] = ("code", "prompt")


@dataclass(frozen=True)
class Parameter:
    """One named, optimizable piece of text.

    ``kind="code"``: the value is Python source that must define a function named
    ``function_name`` (defaults to ``name``). ``kind="prompt"``: the value is free text that must
    contain every entry of ``placeholders`` (e.g. ``"{question}"``).
    """

    name: str
    kind: ParameterKind
    description: str
    trainable: bool = True
    function_name: str | None = None
    placeholders: tuple[str, ...] = ()
    max_chars: int | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"parameter name {self.name!r}: must be a Python identifier")
        if self.kind not in PARAMETER_KINDS:
            raise ValueError(f"parameter {self.name!r}: kind {self.kind!r}; allowed: code, prompt")

    @property
    def length_limit(self) -> int:
        """Most characters a proposed value may have (``max_chars``, else a per-kind default).
        It is also put in the answer's JSON schema so that constrained decoding terminates."""
        return self.max_chars or (6000 if self.kind == "code" else 1500)

    @property
    def expected_function(self) -> str | None:
        return (self.function_name or self.name) if self.kind == "code" else None

    def constraints(self) -> str:
        """Human-readable constraints, as shown to the optimizer."""
        limit = f" At most {self.length_limit} characters."
        if self.kind == "code":
            return (
                f"Python source that defines a function named `{self.expected_function}` "
                "with the same signature; standard library and already-imported modules only."
                + limit
            )
        if self.placeholders:
            return "Prompt text that must keep these placeholders verbatim: " + ", ".join(
                self.placeholders
            ) + "." + limit
        return "Prompt text." + limit


@dataclass(frozen=True)
class ArtifactSpec:
    """The parameters of an artifact, in order, and which of them are trainable."""

    parameters: tuple[Parameter, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"artifact parameters must have unique names, got {names}")
        if not self.parameters:
            raise ValueError("an artifact needs at least one parameter")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def trainable(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.trainable)

    def __getitem__(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def with_trainable(self, names: tuple[str, ...] | None) -> "ArtifactSpec":
        """A copy in which exactly ``names`` are trainable (``None`` keeps the spec as is)."""
        if names is None:
            return self
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise ValueError(
                f"trainable: unknown parameter(s) {unknown}; this artifact has {list(self.names)}"
            )
        return ArtifactSpec(
            tuple(
                Parameter(**{**p.__dict__, "trainable": p.name in names}) for p in self.parameters
            )
        )


def content_hash(values: Mapping[str, str]) -> str:
    """Stable hash of parameter values: equal text gives equal hash, whatever the lineage."""
    blob = json.dumps(dict(sorted(values.items())), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ArtifactVersion:
    """One value of every parameter, with lineage. Immutable.

    ``version_id`` is ``v<step>-<hash8>``: unique within a loop (one version per step at most) and
    readable in the MLflow UI. ``parent_id`` is ``None`` only for the starting version (step 0).
    """

    values: Mapping[str, str]
    step: int
    parent_id: str | None = None
    content_hash: str = field(default="")

    def __post_init__(self) -> None:
        frozen_values = MappingProxyType(dict(self.values))
        object.__setattr__(self, "values", frozen_values)
        object.__setattr__(self, "content_hash", content_hash(frozen_values))

    @property
    def version_id(self) -> str:
        return f"v{self.step}-{self.content_hash[:8]}"

    def child(self, new_values: Mapping[str, str], step: int) -> "ArtifactVersion":
        merged = {**self.values, **new_values}
        return ArtifactVersion(values=merged, step=step, parent_id=self.version_id)

    def to_dict(self) -> dict:
        return {
            "version_id": self.version_id,
            "parent_id": self.parent_id,
            "step": self.step,
            "content_hash": self.content_hash,
            "values": dict(self.values),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "ArtifactVersion":
        return cls(values=data["values"], step=data["step"], parent_id=data.get("parent_id"))


def diff(old: ArtifactVersion, new: ArtifactVersion, context_lines: int = 3) -> str:
    """Unified diff of every parameter that differs, labelled with version ids."""
    chunks: list[str] = []
    for name in sorted(set(old.values) | set(new.values)):
        a, b = old.values.get(name, ""), new.values.get(name, "")
        if a == b:
            continue
        chunks.extend(
            difflib.unified_diff(
                _lines(a),
                _lines(b),
                fromfile=f"{old.version_id}/{name}",
                tofile=f"{new.version_id}/{name}",
                n=context_lines,
            )
        )
    return "".join(chunks)


def _lines(text: str) -> list[str]:
    # every line newline-terminated: a changed last line must not glue onto the next diff line
    return [line if line.endswith("\n") else line + "\n" for line in text.splitlines(True)]
