"""Edit formats: how the optimizer writes a proposal (``LoopConfig.edit_format``).

* ``json``: one JSON object, ``reasoning`` then each trainable parameter's complete new value as
  a string. Constrained by a JSON schema where the backend can (llama.cpp grammars, endpoints'
  ``response_format``). Every quote, backslash and newline of a code value must be escaped,
  which small models often get wrong.
* ``tagged``: the reasoning, then each parameter's complete new value in its own block between
  ``<name>`` and ``</name>`` lines: no escaping at all, so code with quotes, backslashes,
  triple-quoted docstrings and braces arrives as written. On llama.cpp a grammar fixes the
  delimiters and leaves the content free (a content line may not start with ``</``).
* ``diff``: SEARCH/REPLACE blocks applied to the current values (``<<<<<<< SEARCH name`` /
  ``=======`` / ``>>>>>>> REPLACE``): only the lines that change are written. Matching is exact
  first, then ignoring trailing whitespace, then ignoring indentation (the replacement is then
  shifted by the indentation the SEARCH lines missed), then approximately (the one place whose
  lines are at least :data:`FUZZY_RATIO` similar; there, the lines the block keeps unchanged stay
  as the current value has them, see :func:`_merge`); a block whose lines are in another trainable
  parameter than the one it names edits that one. A block that matches nothing, or more than
  one place, is an invalid proposal whose reason quotes the nearest lines. Lines copied from a
  repair's numbered excerpt (``   21 | code``) lose the number gutter first.
  When some blocks apply and others match nothing (or several places), the answer is the
  blocks that apply and each left-out block is noted as a repair, as aider applies the edits
  that match (the candidate is still checked and prechecked whole); blocks that change nothing
  (REPLACE equal to SEARCH) and repeated blocks are skipped.
  An empty SEARCH part replaces the whole value when parsing (the instructions do not offer it,
  and the grammar does not allow it: weak models wrote one to mean "insert somewhere").

Every format's instructions carry a worked example, ask for the complete source code of each
function (never its description), and the answer is parsed into the new values of the trainable
parameters it names (a parameter it leaves out keeps its current value).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .artifact import ArtifactSpec, ArtifactVersion, Parameter
from .proposals import GUTTER, InvalidProposal, strip_fences, strip_think

REASONING_CHARS = 600
# llama.cpp compiles maxLength into one grammar rule per character and refuses grammars with
# "too many rules" somewhere above ~1000, so longer limits are validated but not put in the schema.
SCHEMA_MAX_LENGTH = 1000


@dataclass(frozen=True)
class Answer:
    """A parsed answer: the raw values it gives (by parameter name) and the reasoning."""

    values: Mapping[str, str]
    reasoning: str
    notes: tuple[str, ...] = ()  # what parsing left out (recorded as repairs of the candidate)


@dataclass(frozen=True)
class _Example:
    """The worked example a format shows: of a code parameter when one is trainable, otherwise of
    the spec's own prompt parameter with its own placeholders, so that copying the example's
    shape never brings in a placeholder the task does not know (small models copy examples)."""

    kind: str
    name: str
    reasoning: str
    old_line: str
    new_line: str
    value: str


def _example(spec: ArtifactSpec) -> _Example:
    if any(p.kind == "code" for p in spec.trainable):
        return _Example("function", "greet", "The greeting ignored the name.",
                        '    return "Hello!"', '    return f"Hello, {name}!"',
                        'def greet(name):\n    """Say hello to someone."""\n'
                        '    return f"Hello, {name}!"')
    prompt = spec.trainable[0]
    inputs = "\n\n".join(prompt.placeholders)
    value = ("Read the input carefully and reason step by step." + (f"\n\n{inputs}" if inputs else "")
             + "\n\nState your final result on the last line.")
    return _Example("prompt", prompt.name, "The responses often ended without a clear final result.",
                    "State your final result.", "State your final result on the last line.", value)


def _what(parameter: Parameter) -> str:
    if parameter.kind == "code":
        return f"the complete Python source code of the function `{parameter.expected_function}`"
    return "the complete new prompt text"


class EditFormat:
    """One way of writing a proposal; subclasses define the four methods."""

    name = ""
    system = ""

    def system_text(self, spec: ArtifactSpec) -> str:
        """The format's part of the system message."""
        return self.system

    def instructions(self, spec: ArtifactSpec) -> str:
        raise NotImplementedError

    def request(self, spec: ArtifactSpec) -> dict[str, Any]:
        """Keyword arguments for ``LLM.complete`` (``json_schema`` or ``grammar``)."""
        return {}

    def parse(self, raw: str, spec: ArtifactSpec, current: ArtifactVersion) -> Answer:
        raise NotImplementedError

    def repair_hint(self) -> str:
        return f"Answer again in the same format ({self.name}), with complete values."

    def fix_hint(self) -> str:
        """How a repair answer fixes the failed values the follow-up shows."""
        return (f"Answer in the same format ({self.name}), with the complete corrected value of "
                "each parameter you fix.")


# --- json ------------------------------------------------------------------------------------
class JsonFormat(EditFormat):
    name = "json"
    system = ("Answer with one JSON object only: a short `reasoning` string, then one string per "
              "trainable parameter holding its complete new value.")

    def request(self, spec: ArtifactSpec) -> dict[str, Any]:
        return {"json_schema": proposal_schema(spec)}

    def instructions(self, spec: ArtifactSpec) -> str:
        names = ", ".join(f'"{p.name}"' for p in spec.trainable)
        lines = [f'Return one JSON object with the keys "reasoning" and {names}. "reasoning" is at '
                 "most three sentences of diagnosis. Each parameter's value is a JSON string "
                 "holding its complete new value (not a diff, not a description): "]
        lines += [f"- \"{p.name}\": {_what(p)}" for p in spec.trainable]
        example = _example(spec)
        lines.append("Escape quotes as \\\" and newlines as \\n inside the strings. Example for a "
                     f"{example.kind} parameter named {example.name}:\n"
                     + json.dumps({"reasoning": example.reasoning, example.name: example.value}))
        return "\n".join(lines)

    def parse(self, raw: str, spec: ArtifactSpec, current: ArtifactVersion) -> Answer:
        data = _load_json_object(strip_think(raw))
        reasoning = data.get("reasoning", "")
        reasoning = reasoning if isinstance(reasoning, str) else json.dumps(reasoning, default=str)
        return Answer({p.name: data[p.name] for p in spec.trainable if p.name in data}, reasoning.strip())


def proposal_schema(spec: ArtifactSpec) -> dict[str, Any]:
    """JSON schema of a ``json`` answer: ``reasoning`` plus one string per trainable parameter."""
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


def _load_json_object(raw: str) -> dict[str, Any]:
    text = strip_fences(raw.strip())
    try:
        data = json.loads(text, strict=False)  # small models emit raw control chars in strings
    except RecursionError:
        raise InvalidProposal("answer is not usable JSON (nested too deeply)") from None
    except json.JSONDecodeError as first_error:
        start, end = text.find("{"), text.rfind("}")
        if start == -1 or end <= start:
            raise InvalidProposal(f"answer is not JSON ({first_error.msg} at char {first_error.pos})",
                                  _excerpt(text, first_error.pos))
        try:
            data = json.loads(text[start: end + 1], strict=False)
        except RecursionError:
            raise InvalidProposal("answer is not usable JSON (nested too deeply)") from None
        except json.JSONDecodeError as exc:
            raise InvalidProposal(f"answer is not JSON ({exc.msg} at char {exc.pos})",
                                  _excerpt(text[start:], exc.pos)) from None
    if not isinstance(data, dict):
        raise InvalidProposal(f"answer is JSON {type(data).__name__}, expected an object")
    return data


def _excerpt(text: str, pos: int, width: int = 80) -> str:
    return f"...{text[max(pos - width, 0):pos]}<<HERE>>{text[pos:pos + 20]}..."


# --- tagged ----------------------------------------------------------------------------------
class TaggedFormat(EditFormat):
    name = "tagged"
    system = ("Answer in plain text blocks: first <reasoning> ... </reasoning>, then for each "
              "trainable parameter its complete new value between <name> and </name> lines. No "
              "JSON, no escaping.")

    def system_text(self, spec: ArtifactSpec) -> str:
        if len(spec.trainable) == 1:
            return self.system
        return ("Answer in plain text blocks: first <reasoning> ... </reasoning>, then for each "
                "parameter you change its complete new value between <name> and </name> lines; "
                "parameters you leave out keep their current value. No JSON, no escaping.")

    def request(self, spec: ArtifactSpec) -> dict[str, Any]:
        return {"grammar": tagged_grammar(spec)}

    def instructions(self, spec: ArtifactSpec) -> str:
        example = _example(spec)
        if len(spec.trainable) == 1:
            [parameter] = spec.trainable
            blocks = f"<{parameter.name}>\n({_what(parameter)})\n</{parameter.name}>\n"
        else:  # one generic block: a layout with every block had Qwen 1.5B copy all five
            names = ", ".join(p.name for p in spec.trainable)
            what = ("the complete Python source code of that function, from its def line"
                    if all(p.kind == "code" for p in spec.trainable) else "its complete new value")
            blocks = (f"<name>\n({what})\n</name>\nwhere name is the parameter you change, one "
                      f"of: {names}. Write one such block for each parameter you change, usually "
                      "one or two; a parameter you leave out keeps its current value.\n")
        return (
            "Write your answer in exactly this layout, each tag on its own line:\n"
            f"<reasoning>\n(at most three sentences: what went wrong and what you change)\n"
            f"</reasoning>\n{blocks}"
            "Write each value as it is, with no escaping and no markdown fences. A value is the "
            "complete new value, never a diff and never the parameter's description.\n"
            f"Example, for a {example.kind} parameter named {example.name}:\n"
            f"<reasoning>\n{example.reasoning}\n</reasoning>\n<{example.name}>\n{example.value}\n"
            f"</{example.name}>"
        )

    def parse(self, raw: str, spec: ArtifactSpec, current: ArtifactVersion) -> Answer:
        text = strip_think(raw)
        values = {}
        for parameter in spec.trainable:
            block = _block(text, parameter.name)
            if block is not None:
                values[parameter.name] = block
        reasoning = _block(text, "reasoning") or ""
        if not values:
            tags = ", ".join(f"<{p.name}>...</{p.name}>" for p in spec.trainable)
            raise InvalidProposal(f"answer has no block {tags}", text[:200])
        return Answer(values, reasoning.strip()[:REASONING_CHARS])


def _block(text: str, name: str) -> str | None:
    """The content between a ``<name>`` line and the next ``</name>`` (at a line start, or the
    end of the text when the model stopped before closing it)."""
    opening = re.search(rf"(?m)^[ \t]*<{re.escape(name)}>[ \t]*\n?", text)
    if opening is None:
        return None
    closing = re.compile(rf"(?m)^[ \t]*</{re.escape(name)}>")
    end = closing.search(text, opening.end())
    if end is None:
        inline = text.find(f"</{name}>", opening.end())
        end_pos = inline if inline != -1 else len(text)
    else:
        end_pos = end.start()
    return text[opening.end():end_pos].rstrip("\n")


REASONING_LINES = 4  # the grammar ends the reasoning after this many lines (small models ramble)
REASONING_FIRST_LINE_CHARS = 600  # a model that writes its reasoning as one paragraph finishes it
REASONING_LINE_CHARS = 200
PROMPT_LINE_CHARS = 160  # a prompt value's lines; at most 2 * length_limit / this many of them
BLANK_RUN = 2  # at most this many blank lines in a row inside a free value
# GBNF rules shared by the tagged and diff grammars: the bounded reasoning block, and free
# content lines (a line may not start with ``</``, which closes the block, nor with ``<name``:
# Qwen 1.5B opened the next block inside an unclosed one). A line cut in the
# middle of a sentence derailed Qwen2.5-Coder-1.5B (it went on by echoing the instructions), so
# the first line may hold a whole paragraph. A reasoning line may not start like an edit
# block or a fence (``>>>>>>>``, ``=======``, a backtick): Qwen 1.5B went on from its reasoning
# with ``>>>>>>> REPLACE`` and a fenced function before it closed the block. Blank (or
# whitespace-only) lines come in runs of at most BLANK_RUN: the same model otherwise answered
# with 2,000 tokens of newlines.
_REASONING_RULES = (
    f'reasoning ::= [^<>=`\\n] [^\\n]{{0,{REASONING_FIRST_LINE_CHARS}}} "\\n" '
    f'rline{{0,{REASONING_LINES - 1}}}',
    f'rline ::= [^<>=`\\n] [^\\n]{{0,{REASONING_LINE_CHARS}}} "\\n"')
_FREE_BODY_RULES = (f'body ::= ( "\\n"{{0,{BLANK_RUN}}} line )* "\\n"{{0,{BLANK_RUN}}}',
                    'line ::= [ \\t]* ( [^ \\t<\\n] [^\\n]* | "<" ( [^/A-Za-z_\\n] [^\\n]* )? ) "\\n"')


def tagged_grammar(spec: ArtifactSpec) -> str:
    """A GBNF grammar for ``tagged`` answers: fixed delimiters, free content lines (a content
    line may not start with ``</``). The reasoning is at most :data:`REASONING_LINES` lines of
    at most :data:`REASONING_LINE_CHARS` characters, and a prompt value's lines are bounded by
    its length limit: SmolLM2 otherwise filled its whole token budget with reasoning (or with an
    endless prompt) and the answer was cut before it was complete. A code value starts with its
    function's ``def`` line (after imports, decorators, comments or constants) and is free after
    it: Qwen 1.5B wrote prose about the functions it did not change inside their blocks."""
    count = len(spec.trainable)
    # one parameter: its block; several: a block for each parameter the answer changes (at least
    # one, in any order): rewriting all five ML-pipeline functions to change one cost Qwen 1.5B
    # hundreds of tokens, and every function it copied was one more chance to break something
    blocks = ("p0" if count == 1
              else "( " + " | ".join(f"p{i}" for i in range(count)) + f" ){{1,{count}}}")
    rules = ['root ::= "<reasoning>\\n" reasoning "</reasoning>\\n" ' + blocks]
    for i, parameter in enumerate(spec.trainable):
        body = "body"
        if parameter.kind == "prompt":  # bounded by its length limit, so decoding ends in budget
            body = f"pbody{i}"
            lines = max(4, parameter.length_limit // PROMPT_LINE_CHARS * 2)
            rules.append(f"{body} ::= pline{{0,{lines}}}")
        else:  # code: imports, decorators, comments or CONSTANTS, then the function's def line
            body = f"cbody{i}"
            rules.append(f'{body} ::= ( chead "\\n"{{1,2}} )* "async "? "def '
                         f'{parameter.expected_function}(" [^\\n]* "\\n" body')
        rules.append(f'p{i} ::= "<{parameter.name}>\\n" {body} "</{parameter.name}>" "\\n"?')
    if any(p.kind == "prompt" for p in spec.trainable):
        rules.append(f'pline ::= ( [^<\\n] [^\\n]{{0,{PROMPT_LINE_CHARS}}} | "<" [^/\\n] '
                     f'[^\\n]{{0,{PROMPT_LINE_CHARS}}} )? "\\n"')
    rules += _REASONING_RULES
    if any(p.kind != "prompt" for p in spec.trainable):
        rules += _FREE_BODY_RULES
        rules.append('chead ::= ( "import " | "from " | "@" | "#" | [A-Z_] [A-Z0-9_]{0,40} " =" ) '
                     '[^\\n]*')
    return "\n".join(rules) + "\n"


# --- diff ------------------------------------------------------------------------------------
_BLOCK = re.compile(
    r"^<{5,9} ?SEARCH[ \t]*(?P<name>[A-Za-z_]\w*)?[ \t]*\n(?P<search>.*?)^={5,9}[ \t]*\n"
    r"(?P<replace>.*?)^>{5,9} ?REPLACE[ \t]*$", re.DOTALL | re.MULTILINE)


class DiffFormat(EditFormat):
    name = "diff"
    system = ("Answer with a short <reasoning> block, then SEARCH/REPLACE blocks that edit the "
              "current values: only the lines that change.")

    def request(self, spec: ArtifactSpec) -> dict[str, Any]:
        return {"grammar": diff_grammar(spec)}

    def instructions(self, spec: ArtifactSpec) -> str:
        names = ", ".join(p.name for p in spec.trainable)
        example = _example(spec)
        return (
            "Write <reasoning>\n(at most three sentences)\n</reasoning>, then one or more edit "
            "blocks, each naming the parameter it edits (" + names + "):\n"
            "<<<<<<< SEARCH name\n(lines copied exactly from the current value)\n=======\n"
            "(the lines that replace them)\n>>>>>>> REPLACE\n"
            "The SEARCH lines must appear in the current value exactly once; copy enough lines "
            "to be unique. To add lines, SEARCH the line they follow and write it again, then "
            "the new lines, in the REPLACE part. Write the new lines themselves, not "
            "descriptions; no markdown fences.\n"
            f"Example, for a {example.kind} parameter named {example.name}:\n"
            f"<reasoning>\n{example.reasoning}\n</reasoning>\n<<<<<<< SEARCH {example.name}\n"
            f"{example.old_line}\n=======\n{example.new_line}\n>>>>>>> REPLACE"
        )

    def repair_hint(self) -> str:  # not "complete values": a diff writes only what changes
        return ("Answer again in the same format (diff): each SEARCH part copies lines of the "
                "current value shown in the request, not of the failed answer or of the numbered "
                "lines above.")

    def fix_hint(self) -> str:
        return ("Answer in the same format (diff): each SEARCH part copies lines of the values to "
                "fix shown just above, not of the current value in the request.")

    def parse(self, raw: str, spec: ArtifactSpec, current: ArtifactVersion) -> Answer:
        text = strip_think(raw)
        blocks = list(_BLOCK.finditer(text))
        if not blocks:
            raise InvalidProposal("answer has no SEARCH/REPLACE block "
                                  "(<<<<<<< SEARCH name / ======= / >>>>>>> REPLACE)", text[:200])
        trainable = {p.name for p in spec.trainable}
        only = next(iter(trainable)) if len(trainable) == 1 else None
        values = {p.name: current.values[p.name] for p in spec.trainable}
        edited: set[str] = set()
        missed: list[InvalidProposal] = []
        seen_blocks: set[tuple[str, str, str]] = set()
        for number, block in enumerate(blocks, 1):
            name = block.group("name") or only
            if name not in trainable:
                raise InvalidProposal(
                    f"edit block {number} names {block.group('name') or 'no parameter'}; edit one of "
                    f"{', '.join(sorted(trainable))}")
            search, replacement = _ungutter(block.group("search"), block.group("replace"),
                                            current.values)
            if search.rstrip() == replacement.rstrip() or (name, search, replacement) in seen_blocks:
                continue  # changes nothing: Qwen 1.5B repeated no-op blocks to the block limit
            seen_blocks.add((name, search, replacement))
            try:  # exact matches first, in the named parameter, then in another one
                values[name] = apply_edit(values[name], search, replacement, name, number,
                                          fuzzy=False)
            except InvalidProposal:
                owner = _owner(values, search, name) or name
                try:
                    values[owner] = apply_edit(values[owner], search, replacement, owner, number)
                except InvalidProposal as exc:
                    missed.append(exc)
                    continue
                name = owner
            edited.add(name)
        if missed and not edited:
            raise missed[0]
        if not edited:
            raise InvalidProposal("every edit block changes nothing (its REPLACE part equals its "
                                  "SEARCH part)", repeat=True)
        reasoning = _block(text, "reasoning") or ""
        return Answer({name: values[name] for name in edited}, reasoning.strip()[:REASONING_CHARS],
                      tuple(f"left out edit block: {exc}" for exc in missed))


def _ungutter(search: str, replacement: str, values: Mapping[str, str]) -> tuple[str, str]:
    """A block's parts without the line-number gutter of a repair's excerpt (:data:`GUTTER`), when
    its SEARCH part shows it was copied from one (a gutter line that is not, as written, a line of
    a current value); lines that are in a current value as written keep their text."""
    known = {line.strip() for value in values.values() for line in value.splitlines()}
    if not any(GUTTER.match(line) and line.strip() not in known for line in search.splitlines()):
        return search, replacement

    def strip(text: str) -> str:
        return "".join(line if line.strip() in known else GUTTER.sub("", line, count=1)
                       for line in text.splitlines(keepends=True))

    return strip(search), strip(replacement)


def _owner(values: Mapping[str, str], search: str, named: str) -> str | None:
    """The one other parameter whose value holds the SEARCH lines exactly (ignoring
    indentation): Qwen 1.5B named ``preprocess`` for lines of ``train_model``."""
    wanted = [s.strip() for s in search.rstrip("\n").splitlines()]

    def holds(value: str) -> bool:
        lines = [s.strip() for s in value.splitlines()]
        return any(lines[i:i + len(wanted)] == wanted for i in range(len(lines) - len(wanted) + 1))

    owners = [name for name, value in values.items() if name != named and holds(value)]
    return owners[0] if len(owners) == 1 else None


def apply_edit(value: str, search: str, replacement: str, name: str, number: int,
               fuzzy: bool = True) -> str:
    """``value`` with the lines ``search`` replaced by ``replacement`` (see the module docstring
    for the matching rules; ``fuzzy=False`` leaves out the approximate one)."""
    if not search.strip():
        return replacement.rstrip("\n")
    lines = value.splitlines()
    wanted = search.rstrip("\n").splitlines()
    new = replacement.rstrip("\n").splitlines() if replacement.strip() else []

    def splice(i: int, shift: bool, merge: bool = False) -> str:  # ``new`` for the lines at ``i``
        window = lines[i:i + len(wanted)]
        have = _indent(window)
        moved = _reindent(new, _indent(wanted), have) if shift and _indent(new) != have else new
        if merge:
            moved = _merge(window, wanted, new, moved)
        trailing = "\n" if value.endswith("\n") else ""
        return "\n".join(lines[:i] + moved + lines[i + len(wanted):]) + trailing

    for key in (lambda s: s, str.rstrip, str.strip):
        target = [key(s) for s in wanted]
        hits = [i for i in range(len(lines) - len(target) + 1)
                if [key(s) for s in lines[i:i + len(target)]] == target]
        if len(hits) == 1:  # ignoring indentation: written at the SEARCH's indentation
            return splice(hits[0], shift=key is str.strip)
        if len(hits) > 1:
            raise InvalidProposal(f"{name}: SEARCH block {number} matches {len(hits)} places; copy more "
                                  "lines so that it matches one")
    near, ratio, unique = _fuzzy(lines, wanted) if fuzzy else (0, 0.0, False)
    if ratio >= FUZZY_RATIO and unique:  # a near-copy of one place: the lines it meant
        return splice(near, shift=True, merge=True)
    raise InvalidProposal(f"{name}: SEARCH block {number} matches nothing in the current value",
                          "the nearest lines of the current value:\n" + _nearest(lines, wanted))


# A SEARCH part that matches nothing exactly is applied to the one place whose lines (stripped)
# are at least this similar (difflib ratio), when no other place away from it comes as close:
# Qwen2.5-Coder-1.5B copied lines with a changed argument or a dropped comment, and each such
# block was an invalid proposal. Far edits (ratio 0.78 for ``z = x - 1`` vs ``y = x + 1``) still
# fail with the nearest lines quoted.
FUZZY_RATIO = 0.88
FUZZY_MIN_CHARS = 12  # a shorter SEARCH (``return x``) is too little to match approximately


def _fuzzy(lines: list[str], wanted: list[str]) -> tuple[int, float, bool]:
    """The window of ``len(wanted)`` lines most similar to ``wanted`` (stripped lines), its
    ratio, and whether it is the only window at that similarity (windows overlapping it aside)."""
    needle = "\n".join(s.strip() for s in wanted)
    size = len(wanted)
    if len(needle.replace("\n", "")) < FUZZY_MIN_CHARS or size > len(lines):
        return 0, 0.0, False
    ratios = [difflib.SequenceMatcher(None, needle, "\n".join(
        s.strip() for s in lines[i:i + size])).ratio() for i in range(len(lines) - size + 1)]
    best = max(range(len(ratios)), key=ratios.__getitem__)
    rivals = [r for i, r in enumerate(ratios) if abs(i - best) >= size and r >= FUZZY_RATIO]
    return best, ratios[best], not rivals


def _merge(window: list[str], wanted: list[str], new: list[str], moved: list[str]) -> list[str]:
    """What an approximate match puts in place of the current lines ``window``: the lines the
    block changes (``moved``: ``new`` at the window's indentation), and, for every line it keeps
    (equal in SEARCH and REPLACE), the current line it stands for, not the block's copy of it.
    Qwen 1.5B searched ``transformer = ColumnTransformer([`` for ``return ColumnTransformer([``,
    kept that line and added two below it: applied as written, ``preprocess`` returned None.
    SEARCH lines pair with the window's lines where equal (stripped), and position by position
    where a run of them differs by as many lines; a kept line with no pair (the current value
    does not have it) is left out, and a current line with no pair (the SEARCH skipped it) stays
    where it was."""
    pair: dict[int, int] = {}
    lines_of = difflib.SequenceMatcher(None, [s.strip() for s in wanted], [s.strip() for s in window],
                                       autojunk=False)
    for tag, a1, a2, b1, b2 in lines_of.get_opcodes():
        if tag == "equal" or (tag == "replace" and a2 - a1 == b2 - b1):
            pair.update(zip(range(a1, a2), range(b1, b2)))
    taken = set(pair.values())
    out: list[str] = []
    flushed = 0  # window lines before this one are placed

    def flush(upto: int) -> None:
        nonlocal flushed
        out.extend(window[j] for j in range(flushed, upto) if j not in taken)
        flushed = max(flushed, upto)

    edits = difflib.SequenceMatcher(None, wanted, new, autojunk=False).get_opcodes()
    for tag, a1, a2, b1, b2 in edits:
        for k in range(a1, a2):
            if k in pair:
                flush(pair[k] + 1)
                if tag == "equal":
                    out.append(window[pair[k]])
        if tag != "equal":
            out.extend(moved[b1:b2])
    flush(len(window))
    return out


def _indent(lines: list[str]) -> str:
    """The leading whitespace of the first non-blank line."""
    first = next((line for line in lines if line.strip()), "")
    return first[:len(first) - len(first.lstrip())]


def _reindent(new: list[str], said: str, have: str) -> list[str]:
    """Replacement lines moved from the SEARCH's indentation ``said`` to the matched lines'
    ``have`` (relative indentation kept; a line indented less than ``said`` stays as written),
    used when the replacement does not already start at ``have``:
    Qwen 1.5B searched ``    model = ...`` for a line nested at 8 spaces, and its replacement at
    4 spaces broke the ``if`` it belonged to."""
    return [have + line[len(said):] if line.strip() and line.startswith(said) else line
            for line in new]


def _nearest(lines: list[str], wanted: list[str]) -> str:
    size = max(len(wanted), 1)
    best, where = -1.0, 0
    needle = "\n".join(s.strip() for s in wanted)
    for i in range(max(len(lines) - size + 1, 1)):
        ratio = difflib.SequenceMatcher(None, needle, "\n".join(s.strip() for s in lines[i:i + size])).ratio()
        if ratio > best:
            best, where = ratio, i
    return "\n".join(lines[where:where + size])


MAX_EDIT_BLOCKS = 8  # Qwen 1.5B otherwise repeated one edit block until the token limit


def diff_grammar(spec: ArtifactSpec) -> str:
    """A GBNF grammar for ``diff`` answers: a reasoning block, then edit blocks whose header names
    a trainable parameter and whose SEARCH part is not empty, at most :data:`MAX_EDIT_BLOCKS` of
    them (content lines may not start with ``=======`` or ``>>>>>>>``)."""
    names = " | ".join(f'"{p.name}"' for p in spec.trainable)
    return "\n".join([
        f'root ::= "<reasoning>\\n" reasoning "</reasoning>\\n" edit{{1,{MAX_EDIT_BLOCKS}}}',
        *_REASONING_RULES,
        f'edit ::= "<<<<<<< SEARCH " ( {names} ) "\\n" sline dline* "=======\\n" dline* ">>>>>>> REPLACE\\n"',
        # the SEARCH part starts with a line that has text: an empty one would replace the whole
        # value, and Qwen 1.5B wrote empty SEARCH parts meaning "insert this line somewhere"
        'sline ::= [ \\t]* ( [^ \\t=>\\n] [^\\n]* | "=" [^=\\n] [^\\n]* | ">" [^>\\n] [^\\n]* ) "\\n"',
        'dline ::= ( [^=>\\n] [^\\n]* | "=" [^=\\n] [^\\n]* | ">" [^>\\n] [^\\n]* )? "\\n"',
    ]) + "\n"


FORMATS: dict[str, type[EditFormat]] = {"json": JsonFormat, "tagged": TaggedFormat, "diff": DiffFormat}


def parse_answer(fmt: EditFormat, raw: str, spec: ArtifactSpec,
                 current: ArtifactVersion) -> tuple[Answer, str | None]:
    """Parse ``raw`` in ``fmt``; when that fails, in the other formats (small models often answer
    in the layout they know best, e.g. JSON when tags were asked for). Returns the answer and,
    when another format was used, a note naming it (recorded as a repair of the candidate). When
    no format parses the answer, the error of ``fmt`` is raised: it is the one the optimizer was
    asked to follow, so the repair message quotes it."""
    try:
        return fmt.parse(raw, spec, current), None
    except InvalidProposal as first:
        for name, other in FORMATS.items():
            if name == fmt.name:
                continue
            try:
                answer = other().parse(raw, spec, current)
            except InvalidProposal:
                continue
            if answer.values:
                return answer, f"answer parsed as {name} (asked for {fmt.name})"
        raise first


def make_format(name: str) -> EditFormat:
    try:
        return FORMATS[name]()
    except KeyError:
        raise ValueError(f"edit_format: must be one of {', '.join(FORMATS)}, got {name!r}") from None


__all__ = ["Answer", "DiffFormat", "EditFormat", "FORMATS", "JsonFormat", "SCHEMA_MAX_LENGTH",
           "TaggedFormat", "apply_edit", "diff_grammar", "make_format", "parse_answer", "proposal_schema",
           "tagged_grammar"]
