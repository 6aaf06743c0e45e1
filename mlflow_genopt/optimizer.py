"""The optimizer: builds the learning context, asks the LLM for candidates, repairs and checks
what comes back.

One update (:meth:`Optimizer.step`) draws ``candidates`` answers from the same context with
distinct seeds (concurrently: backends that can run calls in parallel do). Each answer is
parsed in the loop's edit format (:mod:`mlflow_genopt.formats`) and checked
(:mod:`mlflow_genopt.proposals`); an answer that cannot be adopted -- it does not parse, breaks a
constraint, was cut at the token limit, changes nothing, or equals a version the loop already
evaluated (or an earlier sibling) -- goes back to the optimizer as a follow-up message with the
one-line reason and the offending lines (not the whole answer: small models resend it), up to
``repair_attempts`` times. Every attempt is kept
(:class:`~mlflow_genopt.events.Attempt`). A context that does not fit the model's window is
rebuilt smaller (:data:`mlflow_genopt.context.SHRINK_LEVELS`) before the step is given up.
Nothing here runs or scores a candidate: that is the loop's job.
"""

from __future__ import annotations

import re

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .artifact import ArtifactSpec, ArtifactVersion, content_hash
from .config import LoopConfig
from .context import SHRINK_LEVELS, MemoryEntry, build_context, truncate_trace
from .events import Attempt
from .formats import EditFormat, SCHEMA_MAX_LENGTH, make_format, parse_answer, proposal_schema
from .llm.base import LLM, Completion, PromptTooLong
from .proposals import InvalidProposal, strip_fences, validate_value
from .task import Trial

# A repair request does not quote the failed answer back: with its own answer in the context,
# Qwen2.5-Coder-1.5B resent it word for word, reasoning included, in 4 of 5 repairs on the ML
# pipeline (a different seed at temperature 0.7 made no difference), so each repair was a wasted
# minute. The request names why the answer failed and quotes the lines that matter (the error's
# detail: the offending lines, the nearest lines of a missed SEARCH, a traceback tail), then asks
# for a new answer to the same context; earlier failures of the candidate are listed in one line
# each. A detail is cut at a line boundary, unmarked (the same model copied an inline "[...]").
_REPAIR_DETAIL_CHARS = 3000

# Repairs from failed values: an answer whose new values exist but fail a later check (a syntax
# error, the task's quick run) is repaired from those values: the follow-up shows them and asks
# for a fix, and a diff repair edits them, not the current version. A missing import or a wrong
# keyword is one line of the failed code, while a new answer to the context is a new change
# that can fail in a new way. Values longer than _FIX_CHARS in all are not quoted (the repair
# would crowd the model's window): their repair asks for a new answer.
_FIX_CHARS = 2 * _REPAIR_DETAIL_CHARS

# ``seen`` maps a content hash to what the proposal would repeat (its description ends the
# refusal's "proposal is identical to ..."); known versions are described by the loop.
_EVALUATED = ", which was already evaluated"
_FAILED_QUICK_RUN = "a proposal of this step that failed the quick run (precheck)"
# A task's cheap run of a candidate's values: None when it works, else the error (first line)
# and its detail (e.g. the traceback tail), which go back to the optimizer as a repair.
Precheck = Callable[[Mapping[str, str]], "str | None"]
# A task's mechanical fix of a precheck problem (Task.quick_fix): the complete fixed values and a
# note, or None. Tried before the problem goes back to the optimizer.
QuickFix = Callable[[Mapping[str, str], str], "tuple[Mapping[str, str], str] | None"]
_QUICK_FIXES = 3  # fixes in a row for one answer (each fixes one name, say)


@dataclass(frozen=True)
class Proposal:
    """One candidate's outcome: the adopted answer's values, or why every attempt failed.

    ``attempts`` holds every answer (the first and each repair) with its reason; ``repairs``
    lists automatic fixes applied to the adopted values."""

    raw: str
    values: Mapping[str, str] | None
    reasoning: str
    invalid_reason: str | None
    completion: Completion
    attempts: tuple[Attempt, ...] = ()
    repairs: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.invalid_reason is None


@dataclass(frozen=True)
class Draft:
    """What one update produced: the context actually sent (after any shrinking), its shrink
    level, and one proposal per candidate."""

    context: tuple[Mapping[str, str], ...]
    level: int
    proposals: tuple[Proposal, ...]


class Optimizer:
    """Turns trials into a learning context and validated candidate proposals.

    ``credit_horizon`` truncates every trial's trace; ``edit_format`` is how answers are
    written; ``repair_attempts`` how often an unusable answer is sent back with its reason.
    """

    def __init__(
        self,
        llm: LLM,
        *,
        temperature: float = 0.7,
        max_tokens: int = 768,
        credit_horizon: int | None = None,
        edit_format: str | EditFormat = "json",
        repair_attempts: int = 0,
        repeat_temperature: float | None = None,
    ) -> None:
        self.llm = llm
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.credit_horizon = credit_horizon
        self.format = make_format(edit_format) if isinstance(edit_format, str) else edit_format
        self.repair_attempts = repair_attempts
        self.repeat_temperature = temperature if repeat_temperature is None else repeat_temperature

    @classmethod
    def from_config(cls, config: LoopConfig, llm: LLM) -> "Optimizer":
        """The optimizer a loop with ``config`` uses: every optimizer field of the config, and
        nothing else, decides how it builds contexts and reads answers."""
        return cls(llm, temperature=config.optimizer_temperature,
                   max_tokens=config.optimizer_max_tokens, credit_horizon=config.credit_horizon,
                   edit_format=config.edit_format, repair_attempts=config.repair_attempts,
                   repeat_temperature=config.repeat_temperature)

    # --- context ----------------------------------------------------------------------------
    def build_context(self, objective: str, spec: ArtifactSpec, current: ArtifactVersion,
                      trials: Sequence[Trial], memory: Sequence[MemoryEntry] = (),
                      level: int = 0) -> list[dict[str, str]]:
        return build_context(objective, spec, current, trials, memory, self.format,
                             credit_horizon=self.credit_horizon, level=level)

    # --- one update -------------------------------------------------------------------------
    def step(self, objective: str, spec: ArtifactSpec, current: ArtifactVersion,
             trials: Sequence[Trial], memory: Sequence[MemoryEntry], *, seeds: Sequence[int],
             known: Mapping[str, str] = {}, precheck: Precheck | None = None,
             quick_fix: QuickFix | None = None) -> Draft:
        """One update: the context (shrunk as needed) and one proposal per seed. ``known`` maps
        the content hash of every version the loop has evaluated to a description."""
        for level in range(len(SHRINK_LEVELS)):
            context = self.build_context(objective, spec, current, trials, memory, level)
            proposals = self.propose_candidates(context, spec, current, seeds=seeds, known=known,
                                                precheck=precheck, quick_fix=quick_fix)
            too_long = all(p.attempts and p.attempts[0].raw == "" and p.invalid_reason
                           and p.invalid_reason.startswith("learning context too long")
                           for p in proposals)
            if not too_long:
                break
        return Draft(tuple(context), level, tuple(proposals))

    def propose_candidates(self, context: Sequence[Mapping[str, str]], spec: ArtifactSpec,
                           current: ArtifactVersion, *, seeds: Sequence[int],
                           known: Mapping[str, str] = {},
                           precheck: Precheck | None = None,
                           quick_fix: QuickFix | None = None) -> list[Proposal]:
        """One proposal per seed, each repaired up to ``repair_attempts`` times. Rounds run the
        candidates' calls concurrently and check the answers in candidate order, so the result
        does not depend on which call finished first."""
        seen = {digest: what + _EVALUATED for digest, what in known.items()}
        attempts: list[list[Attempt]] = [[] for _ in seeds]
        errors: list[list[InvalidProposal]] = [[] for _ in seeds]
        # what a repair fixes: the values the candidate's latest answer made when they failed a
        # check after parsing (repairs from failed values, above), else nothing: a new answer
        fixing: list[dict[str, str]] = [{} for _ in seeds]
        done: list[Proposal | None] = [None] * len(seeds)
        for round_ in range(self.repair_attempts + 1):
            pending = [i for i, p in enumerate(done) if p is None]
            if not pending:
                break
            followups = {i: tuple(self._repair_messages(errors[i], fixing[i])) if errors[i] else ()
                         for i in pending}
            temperatures = {i: self.repeat_temperature if errors[i] and errors[i][-1].repeat
                            else self.temperature for i in pending}
            answers = self._call_all([list(context) + list(followups[i]) for i in pending],
                                     [seeds[i] + 7 * round_ for i in pending],
                                     [temperatures[i] for i in pending], spec)
            for i, (completion, error) in zip(pending, answers):
                seed, temperature = seeds[i] + 7 * round_, temperatures[i]
                if error is not None:  # the context does not fit: no repair can help
                    attempts[i].append(Attempt("", error, followups[i], None, seed, temperature))
                    done[i] = Proposal("", None, "", error, _empty(self.llm), tuple(attempts[i]))
                    continue
                raw = completion.text
                try:
                    values, reasoning, repairs = self._check(raw, completion, spec, current, seen,
                                                             precheck, fixing[i], quick_fix)
                except InvalidProposal as exc:
                    if errors[i] and str(exc) == str(errors[i][-1]):
                        # the repair failed as the answer before it did (Qwen 1.5B resent the
                        # same broken line through 3 answers): drawn again, it would repeat it
                        exc.repeat = True
                    attempts[i].append(Attempt(raw, str(exc), followups[i],
                                               completion.finish_reason, seed, temperature))
                    if round_ == self.repair_attempts:
                        done[i] = Proposal(raw, None, "", str(exc), completion, tuple(attempts[i]))
                    else:
                        errors[i].append(exc)
                        quotable = exc.values and sum(map(len, exc.values.values())) <= _FIX_CHARS
                        fixing[i] = exc.values if quotable else {}
                    continue
                attempts[i].append(Attempt(raw, None, followups[i], completion.finish_reason, seed,
                                           temperature))
                seen[content_hash({**current.values, **values})] = (f"candidate {i} of this step"
                                                                    + _EVALUATED)
                done[i] = Proposal(raw, values, reasoning, None, completion, tuple(attempts[i]), repairs)
        return [p for p in done if p is not None]

    def propose(self, context: Sequence[Mapping[str, str]], spec: ArtifactSpec,
                current: ArtifactVersion, *, seed: int | None = None) -> Proposal:
        """One candidate (with repairs)."""
        return self.propose_candidates(context, spec, current, seeds=[seed or 0])[0]

    # --- internals ----------------------------------------------------------------------------
    def _call_all(self, requests: list[list[dict[str, str]]], seeds: list[int],
                  temperatures: list[float], spec: ArtifactSpec):
        kwargs = self.format.request(spec)  # json_schema or grammar

        def call(messages, seed, temperature):
            try:
                return self.llm.complete(messages, temperature=temperature,
                                         max_tokens=self.max_tokens, seed=seed, **kwargs), None
            except PromptTooLong as exc:
                return None, f"learning context too long for the optimizer: {exc}"

        if len(requests) == 1:
            return [call(requests[0], seeds[0], temperatures[0])]
        with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="genopt-candidate") as pool:
            return list(pool.map(call, requests, seeds, temperatures))

    def _check(self, raw: str, completion: Completion, spec: ArtifactSpec,
               current: ArtifactVersion, seen: dict[str, str], precheck: Precheck | None = None,
               fixing: Mapping[str, str] = {}, quick_fix: QuickFix | None = None):
        """The values ``raw`` changes (against ``current``), its reasoning and the repairs made,
        or :class:`InvalidProposal`. ``fixing``: the failed values a repair answer edits (a
        parameter it leaves out keeps its ``fixing`` value)."""
        if completion.finish_reason == "length":
            raise _cut(raw, self.max_tokens)
        base = ArtifactVersion({**current.values, **fixing}, current.step) if fixing else current
        try:
            answer, fallback = parse_answer(self.format, raw, spec, base)
        except InvalidProposal as asked:
            if not fixing:
                raise
            try:  # not a fix of the failed values: perhaps a new edit of the current version
                answer, fallback = parse_answer(self.format, raw, spec, current)
            except InvalidProposal:
                raise asked from None
            fixing = {}
        written = {**fixing, **answer.values}
        changed: dict[str, str] = {}
        repairs: list[str] = ([fallback] if fallback else []) + list(answer.notes)
        for parameter in spec.trainable:
            if parameter.name not in written:
                continue
            try:
                value, fixed = validate_value(parameter, written[parameter.name])
            except InvalidProposal as exc:
                if exc.detail and parameter.kind == "code":  # a syntax error: fix this code
                    made = {n: strip_fences(w).strip("\n") + "\n" for n, w in written.items()}
                    exc.values = {n: v for n, v in {**made, **changed}.items()
                                  if v.rstrip() != current.values[n].rstrip()}
                raise
            repairs.extend(fixed)
            # the value ends as the current one does: blocks drop the final newline, and a
            # resent function differing only there was scored as a new version
            was = current.values[parameter.name]
            value = value.rstrip() + was[len(was.rstrip()):]
            if value != was:
                changed[parameter.name] = value
        if not changed:
            if not answer.values:
                raise InvalidProposal("answer has none of the trainable parameters "
                                      + ", ".join(p.name for p in spec.trainable))
            # Qwen 1.5B, told only that its prompt was identical, resent it in 4 of 4 repairs
            # on BBEH, reasoning that "no changes are needed"
            raise InvalidProposal(f"proposal is identical to the current version {current.version_id}: "
                                  "it changes nothing; write a changed value that addresses the feedback",
                                  repeat=True)
        digest = content_hash({**current.values, **changed})
        if digest in seen:
            raise InvalidProposal(f"proposal is identical to {seen[digest]}; propose a different change",
                                  repeat=True)
        if precheck is not None:
            problem = precheck({**current.values, **changed})
            if problem and quick_fix is not None:
                fixed, problem, notes = self._quick_fixes(spec, current, changed, problem, seen,
                                                          precheck, quick_fix)
                if notes:  # kept: each fix made the quick run pass or fail later
                    seen[digest] = _FAILED_QUICK_RUN
                    changed, digest = fixed, content_hash({**current.values, **fixed})
                    repairs.extend(notes)
            if problem:
                seen[digest] = _FAILED_QUICK_RUN
                first, _, rest = problem.strip().partition("\n")
                failed = InvalidProposal(f"the new version fails a quick run: {first}", rest.strip())
                failed.values = changed
                raise failed
        return changed, answer.reasoning, tuple(repairs)

    @staticmethod
    def _quick_fixes(spec: ArtifactSpec, current: ArtifactVersion, changed: Mapping[str, str],
                     problem: str, seen: Mapping[str, str], precheck: Precheck,
                     quick_fix: QuickFix) -> tuple[dict[str, str], str | None, list[str]]:
        """The task's fixes of the quick run's problems, one after another: the changed values,
        the problem left (``None`` once the quick run passes) and the fixes' notes. A fix is
        kept when the problem it fixed is gone (the quick run passes, or fails later, e.g. on
        the next missing import), and dropped when the same problem comes back."""
        changed, notes = dict(changed), []
        for _ in range(_QUICK_FIXES):
            fix = quick_fix({**current.values, **changed}, problem)
            if fix is None:
                break
            values, note = fix
            fixed = {p.name: values[p.name] for p in spec.trainable
                     if values.get(p.name, current.values[p.name]) != current.values[p.name]}
            if fixed == changed or content_hash({**current.values, **fixed}) in seen:
                break
            after = precheck({**current.values, **fixed})
            if after and after.partition("\n")[0] == problem.partition("\n")[0]:
                break
            changed, problem = fixed, after
            notes.append(note)
            if not problem:
                break
        return changed, problem, notes

    def _repair_messages(self, errors: Sequence[InvalidProposal],
                         fixing: Mapping[str, str] = {}) -> list[dict[str, str]]:
        """The follow-up of a repair: one user message after the context (see
        :data:`_REPAIR_DETAIL_CHARS` for why it does not quote the answer; ``fixing``: the failed
        values it shows to fix, see the note on repairs from failed values above it)."""
        *earlier, error = errors
        text = f"An answer to this request could not be used: {error}."
        if error.detail:
            detail = re.sub(r"\n(?:[ \t]*\n){3,}", "\n\n\n", error.detail).rstrip()
            if len(detail) > _REPAIR_DETAIL_CHARS:
                cut = detail.rfind("\n", 0, _REPAIR_DETAIL_CHARS)
                detail = detail[:cut if cut > 0 else _REPAIR_DETAIL_CHARS]
            text += f"\n{detail}"
        if earlier:
            text += "\nEarlier answers could not be used either:" + "".join(
                f"\n- {e}" for e in earlier)
        if fixing:
            text += "\nThe values to fix, as that answer made them:" + "".join(
                f"\n<{name}>\n{value.rstrip()}\n</{name}>" for name, value in fixing.items())
            text += ("\nFix these values: keep the change they make and correct only what "
                     "fails. " + self.format.fix_hint())
        else:
            text += ("\nWrite a new answer to the request above that avoids these problems. "
                     + self.format.repair_hint())
        return [{"role": "user", "content": text}]


# An answer cut at the token limit is never adopted, and its reason comes before any parse
# error: Qwen2.5-Coder-1.5B's cut answers on Spaceship Titanic were loops (a FunctionTransformer
# line with the index counting up, one sentence of its reasoning) to the limit, read as "answer
# has no SEARCH/REPLACE block". A loop -- the answer's last _LOOP_LINES lines are at most half
# as many distinct ones, by their shape (digits ignored) -- is named by its most frequent line,
# and its repair is drawn at the repeat temperature.
_LOOP_LINES = 24


def _cut(raw: str, max_tokens: int) -> InvalidProposal:
    lines = [line.strip() for line in raw.splitlines() if line.strip()][-_LOOP_LINES:]
    shapes = [re.sub(r"\d+", "N", line) for line in lines]
    top = max(set(shapes), key=shapes.count, default=None)
    if top is None or len(lines) < 8 or len(set(shapes)) > len(shapes) // 2:
        return InvalidProposal(f"answer was cut at the token limit ({max_tokens} tokens) before it "
                               "was complete; write a shorter answer")
    line = lines[shapes.index(top)]
    return InvalidProposal(f"answer was cut at the token limit ({max_tokens} tokens): it repeated "
                           f"a line like `{line[:80]}` until the limit; write a shorter answer that "
                           "says each thing once", repeat=True)


def _empty(llm: LLM) -> Completion:
    return Completion(text="", model=getattr(llm, "model", "?"))


__all__ = ["Draft", "InvalidProposal", "MemoryEntry", "Optimizer", "Proposal", "SCHEMA_MAX_LENGTH",
           "proposal_schema", "strip_fences", "truncate_trace", "validate_value"]
