"""The optimizer: builds the learning context, asks the LLM, and validates what comes back.

The learning context is the exact list of chat messages sent for one update. It holds the
objective, every trainable parameter (description, constraints, current value), the frozen
parameters for reference, a memory of recent versions with their scores and feedback, and the
batch of trials (input, output, score, feedback, and each trace truncated to the credit
horizon). The answer must be a JSON object; anything that does not parse, breaks a constraint
or changes nothing is an :class:`InvalidProposal`, never a new version.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .artifact import ArtifactSpec, ArtifactVersion, Parameter
from .llm.base import LLM, Completion, PromptTooLong
from .task import Trial, TraceStep

REASONING_CHARS = 600
# llama.cpp compiles maxLength into one grammar rule per character and refuses grammars with
# "too many rules" somewhere above ~1000, so longer limits are validated but not put in the schema.
SCHEMA_MAX_LENGTH = 1000

SYSTEM_PROMPT = (
    "You are an optimizer. You improve the trainable parameters of a system (code or prompts) "
    "from execution feedback. Read the objective, the current parameters and the feedback on a "
    "batch of trials, diagnose what went wrong, then propose new values. Answer with one JSON "
    "object only: a short `reasoning` string, then one string per trainable parameter holding "
    "its complete new value."
)


class InvalidProposal(ValueError):
    """The optimizer's answer cannot be adopted; the message is the one-line reason."""


@dataclass(frozen=True)
class MemoryEntry:
    """A past version as the optimizer remembers it."""

    version_id: str
    step: int
    status: str  # accepted, rejected, invalid, initial
    batch_score: float | None
    val_score: float | None
    changed: Mapping[str, str]  # parameter values that differ from the then-current version
    feedback: str  # a short digest of the trials' feedback
    note: str = ""


@dataclass(frozen=True)
class Proposal:
    raw: str
    values: Mapping[str, str] | None
    reasoning: str
    invalid_reason: str | None
    completion: Completion

    @property
    def valid(self) -> bool:
        return self.invalid_reason is None


def proposal_schema(spec: ArtifactSpec) -> dict[str, Any]:
    """JSON schema of an answer: ``reasoning`` plus one string per trainable parameter."""
    properties: dict[str, Any] = {"reasoning": {"type": "string", "maxLength": REASONING_CHARS}}
    for parameter in spec.trainable:
        properties[parameter.name] = {"type": "string", "minLength": 1}
        if parameter.length_limit <= SCHEMA_MAX_LENGTH:
            properties[parameter.name]["maxLength"] = parameter.length_limit
    return {
        "type": "object",
        "properties": properties,
        "required": ["reasoning", *[p.name for p in spec.trainable]],
        "additionalProperties": False,
    }


def truncate_trace(trace: Sequence[TraceStep], horizon: int | None) -> tuple[TraceStep, ...]:
    """The last ``horizon`` steps of a trace (all of it when ``horizon`` is None): the steps
    closest to the update are the ones whose credit the optimizer can assign."""
    if horizon is None or len(trace) <= horizon:
        return tuple(trace)
    return tuple(trace[-horizon:])


def _clip(text: Any, limit: int) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False, default=str)
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


class Optimizer:
    """Turns trials into a learning context and a validated proposal.

    ``credit_horizon`` truncates every trial's trace; ``max_field_chars`` caps each input,
    output and feedback text so that one long trial cannot crowd the context.
    """

    def __init__(
        self,
        llm: LLM,
        *,
        temperature: float = 0.7,
        max_tokens: int = 768,
        credit_horizon: int | None = None,
        max_field_chars: int = 1200,
    ) -> None:
        self.llm = llm
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.credit_horizon = credit_horizon
        self.max_field_chars = max_field_chars

    # --- context ----------------------------------------------------------------------------
    def build_context(
        self,
        objective: str,
        spec: ArtifactSpec,
        current: ArtifactVersion,
        trials: Sequence[Trial],
        memory: Sequence[MemoryEntry] = (),
    ) -> list[dict[str, str]]:
        clip = self.max_field_chars
        parts = [f"# Objective\n{objective.strip()}"]
        parts.append("# Trainable parameters")
        for p in spec.trainable:
            parts.append(
                f"## {p.name} ({p.kind})\nDescription: {p.description}\n"
                f"Constraints: {p.constraints()}\nCurrent value:\n{current.values[p.name]}"
            )
        frozen = [p for p in spec.parameters if not p.trainable]
        if frozen:
            parts.append("# Frozen parameters (for reference; do not change)")
            for p in frozen:
                parts.append(f"## {p.name} ({p.kind})\n{p.description}\n{current.values[p.name]}")
        if memory:
            parts.append(f"# Recent versions (oldest first; current is {current.version_id})")
            for entry in memory:
                scores = f"batch score {_fmt(entry.batch_score)}, val score {_fmt(entry.val_score)}"
                lines = [f"## {entry.version_id} (step {entry.step}, {entry.status}; {scores})"]
                if entry.note:
                    lines.append(entry.note)
                for name, value in entry.changed.items():
                    lines.append(f"{name} was:\n{_clip(value, clip)}")
                if entry.feedback:
                    lines.append(f"Feedback: {_clip(entry.feedback, clip)}")
                parts.append("\n".join(lines))
        parts.append(f"# Batch of {len(trials)} trial(s) with the current version")
        for i, trial in enumerate(trials, 1):
            lines = [
                f"## Trial {i}",
                f"Input: {_clip(trial.input, clip)}",
                f"Output: {_clip(trial.output, clip)}",
                f"Score: {_fmt(trial.score)}",
                f"Feedback: {_clip(trial.feedback, clip)}",
            ]
            if trial.trace:
                shown = truncate_trace(trial.trace, self.credit_horizon)
                lines.append(
                    f"Trace (last {len(shown)} of {len(trial.trace)} steps: observation -> action, reward):"
                )
                for step in shown:
                    lines.append(
                        f"- {_clip(step.observation, 300)} -> {_clip(step.action, 80)}, {step.reward:g}"
                    )
            parts.append("\n".join(lines))
        names = ", ".join(f'"{p.name}"' for p in spec.trainable)
        parts.append(
            "# Your answer\nReturn a JSON object with keys \"reasoning\" and "
            f"{names}. Each parameter value is the complete new text (not a diff)."
        )
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "\n\n".join(parts)},
        ]

    # --- proposal ---------------------------------------------------------------------------
    def propose(
        self,
        context: Sequence[Mapping[str, str]],
        spec: ArtifactSpec,
        current: ArtifactVersion,
        *,
        seed: int | None = None,
    ) -> Proposal:
        try:
            completion = self.llm.complete(
                context,
                json_schema=proposal_schema(spec),
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                seed=seed,
            )
        except PromptTooLong as exc:
            empty = Completion(text="", model=getattr(self.llm, "model", "?"))
            return Proposal("", None, "", f"learning context too long for the optimizer: {exc}",
                            empty)
        raw = completion.text
        try:
            values, reasoning = parse_proposal(raw, spec, current)
        except InvalidProposal as exc:
            return Proposal(raw, None, "", str(exc), completion)
        return Proposal(raw, values, reasoning, None, completion)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\n?(.*?)\n?```\s*$", re.DOTALL)


def strip_fences(text: str) -> str:
    """Remove one markdown code fence around ``text`` (```python ... ```), if present."""
    match = _FENCE.match(text)
    return match.group(1) if match else text


def _load_json_object(raw: str) -> dict[str, Any]:
    text = strip_fences(raw.strip())
    try:
        data = json.loads(text, strict=False)  # small models emit raw control chars in strings
    except RecursionError:
        raise InvalidProposal("answer is not usable JSON (nested too deeply)") from None
    except json.JSONDecodeError as first_error:
        start, end = text.find("{"), text.rfind("}")
        if start == -1 or end <= start:
            raise InvalidProposal(f"answer is not JSON ({first_error.msg} at char {first_error.pos})")
        try:
            data = json.loads(text[start : end + 1], strict=False)
        except RecursionError:
            raise InvalidProposal("answer is not usable JSON (nested too deeply)") from None
        except json.JSONDecodeError as exc:
            raise InvalidProposal(f"answer is not JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(data, dict):
        raise InvalidProposal(f"answer is JSON {type(data).__name__}, expected an object")
    return data


def validate_value(parameter: Parameter, value: Any) -> str:
    """The cleaned value of one parameter, or :class:`InvalidProposal` naming what is wrong."""
    if not isinstance(value, str):
        raise InvalidProposal(f"{parameter.name}: expected a string, got {type(value).__name__}")
    value = strip_fences(value).strip("\n")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, from a "\udc80" escape in the JSON
        raise InvalidProposal(
            f"{parameter.name}: not valid Unicode text (lone surrogate at character {exc.start})"
        ) from None
    if not value.strip():
        raise InvalidProposal(f"{parameter.name}: empty value")
    if len(value) > parameter.length_limit:
        raise InvalidProposal(
            f"{parameter.name}: {len(value)} characters, limit {parameter.length_limit}")
    if parameter.kind == "code":
        try:
            tree = ast.parse(value)
        except SyntaxError as exc:
            raise InvalidProposal(
                f"{parameter.name}: SyntaxError at line {exc.lineno}: {exc.msg}"
            ) from None
        except ValueError as exc:  # e.g. null bytes
            raise InvalidProposal(f"{parameter.name}: not valid Python source ({exc})") from None
        defined = {
            node.name
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        if parameter.expected_function not in defined:
            raise InvalidProposal(
                f"{parameter.name}: does not define function `{parameter.expected_function}`"
            )
    else:
        missing = [ph for ph in parameter.placeholders if ph not in value]
        if missing:
            raise InvalidProposal(f"{parameter.name}: missing placeholder(s) {', '.join(missing)}")
    return value


def parse_proposal(
    raw: str, spec: ArtifactSpec, current: ArtifactVersion
) -> tuple[dict[str, str], str]:
    """Parse and validate an answer. Returns (changed trainable values, reasoning).

    Keys for frozen or unknown parameters are ignored; a missing trainable key keeps its current
    value; an answer that changes nothing is invalid (it would only re-evaluate the same version).
    """
    data = _load_json_object(raw)
    reasoning = data.get("reasoning", "")
    reasoning = reasoning if isinstance(reasoning, str) else json.dumps(reasoning, default=str)
    changed: dict[str, str] = {}
    for parameter in spec.trainable:
        if parameter.name not in data:
            continue
        value = validate_value(parameter, data[parameter.name])
        if value != current.values[parameter.name]:
            changed[parameter.name] = value
    if not changed:
        present = [p.name for p in spec.trainable if p.name in data]
        if not present:
            raise InvalidProposal(
                "answer has none of the trainable parameters "
                + ", ".join(p.name for p in spec.trainable)
            )
        raise InvalidProposal("proposal is identical to the current version")
    return changed, reasoning.strip()
