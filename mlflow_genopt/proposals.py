"""Checking one proposed parameter value: what makes it unusable, and the repairs the core makes.

A value is text the optimizer wrote for one trainable parameter. Before anything runs it, it is
cleaned (a ``<think>`` block, a markdown fence around it), then checked: it must be valid
Unicode, non-empty and within the length limit; a ``code`` value must parse as Python and define
the expected function; a ``prompt`` value must not use placeholders the parameter does not
declare. A prompt that omits a declared placeholder is *repaired*, not refused: the placeholder
is appended on its own paragraph (the instruction comes first, the input after it, the layout of
every starting prompt), and the repair is recorded with the proposal. Anything else is an
:class:`InvalidProposal` whose one-line message names the parameter and the problem, with the
offending lines of a syntax error as ``detail`` for the optimizer's repair attempt.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from .artifact import Parameter

_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\n?(.*?)\n?```\s*$", re.DOTALL)
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_SINGLE = re.compile(r"(?<!\{)\{([A-Za-z_]\w*)\}(?!\})")
_DOUBLE = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


class InvalidProposal(ValueError):
    """The optimizer's answer cannot be adopted; the message is the one-line reason and
    ``detail`` (possibly empty) the lines it is about, for a repair request."""

    def __init__(self, reason: str, detail: str = "", *, repeat: bool = False) -> None:
        super().__init__(reason)
        self.detail = detail
        # the new values the answer made, when they exist but fail a check (a syntax error, the
        # task's quick run): the optimizer's repair then fixes them instead of starting again
        self.values: dict[str, str] | None = None
        # the answer repeats what the optimizer was shown or already wrote (it changes nothing,
        # or equals a known version or a failed proposal): its repair is drawn at the loop's
        # repeat_temperature
        self.repeat = repeat


def strip_fences(text: str) -> str:
    """Remove one markdown code fence around ``text`` (```python ... ```), if present."""
    match = _FENCE.match(text)
    return match.group(1) if match else text


def strip_think(text: str) -> str:
    """Drop ``<think>...</think>`` blocks (reasoning models' scratchpad); an unclosed one runs
    to the end of the text."""
    return _THINK.sub("", text) if "<think>" in text.lower() else text


def placeholders_in(parameter: Parameter, value: str) -> set[str]:
    """The placeholders written in ``value`` in the syntax the parameter's declared ones use
    (``{name}``, or MLflow's ``{{name}}``)."""
    declared = parameter.placeholders
    if declared and all(p.startswith("{{") for p in declared):
        return {"{{" + name + "}}" for name in _DOUBLE.findall(value)}
    return {"{" + name + "}" for name in _SINGLE.findall(value)}


def _normalise(placeholder: str) -> str:
    return re.sub(r"\s+", "", placeholder)


def validate_value(parameter: Parameter, value: Any) -> tuple[str, tuple[str, ...]]:
    """The cleaned value of one parameter and the repairs made to it, or
    :class:`InvalidProposal` naming what is wrong."""
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
    repairs: list[str] = []
    if parameter.kind == "code":
        value, dropped = _drop_trailing_prose(parameter, value)
        if dropped:
            repairs.append(dropped)
        _check_code(parameter, value)
    elif parameter.placeholders:
        declared = {_normalise(p): p for p in parameter.placeholders}
        unknown = sorted(p for p in placeholders_in(parameter, value) if _normalise(p) not in declared)
        if unknown:
            raise InvalidProposal(
                f"{parameter.name}: unknown placeholder(s) {', '.join(unknown)}; only "
                f"{', '.join(parameter.placeholders)} are filled in")
        present = {_normalise(p) for p in placeholders_in(parameter, value)}
        missing = [p for key, p in declared.items() if key not in present]
        if missing:
            value = value.rstrip() + "".join(f"\n\n{p}" for p in missing)
            repairs.append(f"{parameter.name}: appended the missing placeholder(s) {', '.join(missing)}")
    if len(value) > parameter.length_limit:
        raise InvalidProposal(
            f"{parameter.name}: {len(value)} characters, limit {parameter.length_limit}")
    return value, tuple(repairs)


def _drop_trailing_prose(parameter: Parameter, value: str) -> tuple[str, str | None]:
    """``value`` without the lines after its complete function that are not Python (a model's
    notes about the next function: Qwen 1.5B wrote "< reasoning>" paragraphs after each function
    of a tagged answer), and the repair note; ``value`` unchanged when it parses, or when no
    prefix that ends at an unindented line parses and defines the function."""
    if len(value) > parameter.length_limit:  # refused for its length anyway
        return value, None
    try:
        ast.parse(value)
        return value, None
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        failing = getattr(exc, "lineno", None)
    lines = value.split("\n")
    if not failing or failing > len(lines):
        return value, None
    cuts = [i for i in range(failing - 1, 0, -1) if lines[i].strip() and lines[i][0] not in " \t"]
    for cut in cuts[:PROSE_CUTS]:  # the unindented lines at or above the failing one
        line = lines[cut]
        head = "\n".join(lines[:cut]).rstrip()
        try:
            tree = ast.parse(head)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        if any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and node.name == parameter.expected_function for node in tree.body):
            rest = [l for l in lines[cut:] if l.strip()]
            return head, (f"{parameter.name}: dropped {len(rest)} line(s) after the function "
                          f"that are not Python, from `{_clip_line(line)}`")
        return value, None
    return value, None


PROSE_CUTS = 8  # unindented lines tried as the end of the function (each try parses the value)


def _clip_line(line: str, width: int = 60) -> str:
    line = line.strip()
    return line if len(line) <= width else line[:width - 3] + "..."


def _check_code(parameter: Parameter, value: str) -> None:
    try:
        tree = ast.parse(value)
    except SyntaxError as exc:
        raise InvalidProposal(f"{parameter.name}: SyntaxError at line {exc.lineno}: {exc.msg}",
                              _around(value, exc.lineno)) from None
    except ValueError as exc:  # e.g. null bytes
        raise InvalidProposal(f"{parameter.name}: not valid Python source ({exc})") from None
    defined = {node.name for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if parameter.expected_function not in defined:
        found = f" (it defines {', '.join(sorted(defined))})" if defined else (
            " (it defines no function: write the source code of the function, not a description)")
        raise InvalidProposal(
            f"{parameter.name}: does not define function `{parameter.expected_function}`{found}")


# The line-number gutter :func:`_around` writes, as models copy it back (re-indented, the marker
# dropped or kept): Qwen 1.5B put "    21 |         (...)" lines of a repair's detail into a SEARCH.
GUTTER = re.compile(r"^[ \t]*>?[ \t]*\d{1,5} \| ?")


def _around(source: str, lineno: int | None, context: int = 2) -> str:
    """The lines around ``lineno`` (1-based), numbered, the offending one marked (:data:`GUTTER`)."""
    if not lineno:
        return ""
    lines = source.splitlines()
    first, last = max(lineno - 1 - context, 0), min(lineno + context, len(lines))
    return "\n".join(f"{'>' if i + 1 == lineno else ' '} {i + 1:4d} | {lines[i]}"
                     for i in range(first, last))


__all__ = ["InvalidProposal", "placeholders_in", "strip_fences", "strip_think", "validate_value"]
