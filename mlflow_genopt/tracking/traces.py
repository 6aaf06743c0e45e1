"""LLM calls as MLflow traces: one trace per loop phase, one ``CHAT_MODEL`` span per call.

A phase is evaluating the starting version (``initial``), one step (``step``), the final test
(``test``), or the part of a phase that a failure cut short (``failed``). Its trace is linked
to the loop's run (``mlflow.sourceRun``) and to the LoggedModel of the version the phase
produced; every span starts and ends at the call's real times and carries token usage, cost,
cache hits and errors.

Durability. A trace is written synchronously, straight to the tracking store, by the tracker's
writer at its phase's commit point (before the step's metrics batch that commits the step),
never through MLflow's background exporter, which a killed process takes down with it. The
trace's info, with its run, phase and step, is written first and in one transaction, then its
spans; so no trace ever lacks its run. Its id is derived from (run, phase, step): a rewrite of
the same phase lands on the same trace. A resumed run first deletes the traces of phases that
never committed (:func:`delete_uncommitted`), so every committed phase has exactly one trace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any, Sequence

from mlflow.entities import LiveSpan, SpanType, TraceInfo, TraceLocation, TraceState
from mlflow.entities.trace_data import TraceData
from mlflow.tracing.client import TracingClient
from mlflow.tracing.constant import (
    TRACE_SCHEMA_VERSION,
    TRACE_SCHEMA_VERSION_KEY,
    SpanAttributeKey,
    TraceMetadataKey,
    TraceTagKey,
)
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from ..events import StepRecord
from ..llm.base import LLMCall
from . import layout

_logger = logging.getLogger(__name__)

PHASE_INITIAL = "initial"
PHASE_STEP = "step"
PHASE_TEST = "test"
PHASE_FAILED = "failed"
_PREVIEW_CHARS = 1000


class _FixedIds(IdGenerator):
    """The trace id a phase is keyed by, and span ids 1, 2, ... in creation order."""

    def __init__(self, trace_id: int) -> None:
        self._trace_id = trace_id
        self._next_span = 0

    def generate_trace_id(self) -> int:
        return self._trace_id

    def generate_span_id(self) -> int:
        self._next_span += 1
        return self._next_span


def trace_key(run_id: str, phase: str, step: int) -> int:
    """The OpenTelemetry trace id of a phase (128 bits); a failed phase gets a fresh one."""
    salt = secrets.token_hex(8) if phase == PHASE_FAILED else ""
    digest = hashlib.sha256(f"genopt:{run_id}:{phase}:{step}:{salt}".encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1


def write_trace(
    client: TracingClient,
    calls: Sequence[LLMCall],
    name: str,
    *,
    run_id: str,
    experiment_id: str,
    phase: str,
    step: int,
    model_id: str | None = None,
    step_record: StepRecord | None = None,
    error: str | None = None,
) -> str | None:
    """Write the trace of one phase's LLM calls (a root span over them, a child per call) and
    return its id; nothing is written when there are none. Raises if the store refuses."""
    if not calls:
        return None
    calls = sorted(calls, key=lambda c: c.start_time_ns)
    otel_id = trace_key(run_id, phase, step)
    trace_id = f"tr-{otel_trace.format_trace_id(otel_id)}"
    provider = TracerProvider(sampler=ALWAYS_ON, resource=Resource.get_empty(),
                              id_generator=_FixedIds(otel_id))
    tracer = provider.get_tracer("mlflow_genopt")

    inputs: dict[str, Any] = {"step": step, "phase": phase, "llm_calls": len(calls)}
    outputs: dict[str, Any] = {}
    if step_record is not None:
        inputs.update(current_id=step_record.current_id, batch_ids=list(step_record.batch_ids))
        outputs = {
            "candidate_id": step_record.candidate_id,
            "invalid_reason": step_record.invalid_reason,
            "accepted": step_record.accepted,
            "val_score": step_record.val_score,
        }
    if error is not None:
        outputs["error"] = error
    start = calls[0].start_time_ns
    end = max(c.end_time_ns for c in calls)
    root = LiveSpan(tracer.start_span(name, start_time=start), trace_id, SpanType.CHAIN)
    root.set_inputs(inputs)
    spans = [root]
    failed = error is not None
    parent = otel_trace.set_span_in_context(root._span)
    for index, call in enumerate(calls):
        failed |= call.error is not None
        spans.append(_call_span(tracer, parent, trace_id, index, call))
    status = "ERROR" if failed else "OK"
    root.end(outputs=outputs or None, status=status, end_time_ns=end)
    finished = [s.to_immutable_span() for s in spans]

    info = TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=start // 1_000_000,
        execution_duration=max(end - start, 0) // 1_000_000,
        state=TraceState.ERROR if failed else TraceState.OK,
        request_preview=_preview(inputs),
        response_preview=_preview(outputs) if outputs else None,
        trace_metadata={
            TraceMetadataKey.SOURCE_RUN: run_id,
            TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
            **({TraceMetadataKey.MODEL_ID: model_id} if model_id is not None else {}),
        },
        tags={
            TraceTagKey.TRACE_NAME: name,
            layout.TAG_RUN_ID: run_id,
            layout.TAG_STEP: str(step),
            layout.TAG_PHASE: phase,
        },
    )
    # One transaction: the trace with its run, phase and step; then its spans.
    stored = client.start_trace(info)
    try:
        client.log_spans(experiment_id, finished)
    except NotImplementedError:  # a store without span logging keeps spans as an artifact
        client._upload_trace_data(stored, TraceData(spans=finished))
    return trace_id


def _preview(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 3] + "..."


def _call_span(tracer, parent, trace_id: str, index: int, call: LLMCall) -> LiveSpan:
    completion = call.completion
    attributes: dict[str, Any] = {
        "call_index": index,
        "purpose": call.purpose,
        "model": call.model,
        "params": dict(call.params),
        SpanAttributeKey.MODEL: call.model,
    }
    if completion is not None:
        total = completion.prompt_tokens + completion.completion_tokens
        attributes.update(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cached=completion.cached,
            attempts=completion.attempts,
            latency_s=completion.latency_s,
            cost_usd=completion.cost_usd,
        )
        attributes[SpanAttributeKey.CHAT_USAGE] = {
            "input_tokens": completion.prompt_tokens,
            "output_tokens": completion.completion_tokens,
            "total_tokens": total,
        }
        if completion.cost_usd is not None:
            attributes[SpanAttributeKey.LLM_COST] = {"total_cost": completion.cost_usd}
    span = LiveSpan(tracer.start_span(f"{call.purpose} llm", context=parent,
                                      start_time=call.start_time_ns),
                    trace_id, SpanType.CHAT_MODEL)
    span.set_inputs({"messages": [dict(m) for m in call.messages], **dict(call.params)})
    span.set_attributes(attributes)
    if call.error is not None:
        span.record_exception(call.error)
        span.end(status="ERROR", end_time_ns=call.end_time_ns)
        return span
    outputs = None
    if completion is not None:
        outputs = {
            "model": completion.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": attributes[SpanAttributeKey.CHAT_USAGE],
        }
    span.end(outputs=outputs, end_time_ns=call.end_time_ns)
    return span


def run_traces(client: TracingClient, experiment_id: str, run_id: str) -> list[TraceInfo]:
    """Every trace of ``run_id`` (by its ``mlflow.sourceRun``), without spans."""
    found: list[TraceInfo] = []
    token = None
    while True:
        page, token = client._search_traces(
            locations=[experiment_id], max_results=500, page_token=token,
            filter_string=f"metadata.`{TraceMetadataKey.SOURCE_RUN}` = '{run_id}'")
        found.extend(page)
        if not token:
            return found


def committed(tags: dict[str, str], last_step: int) -> bool:
    """Whether a trace's phase was committed in a run whose last logged step is ``last_step``
    (the run is not finished: its test phase is not committed yet)."""
    phase = tags.get(layout.TAG_PHASE)
    if phase is None or phase == PHASE_FAILED:
        return True  # not ours to judge / a failure's record, kept
    if phase == PHASE_INITIAL:
        return last_step >= 1
    if phase == PHASE_STEP:
        try:
            return int(tags.get(layout.TAG_STEP, "")) <= last_step
        except ValueError:
            return True
    return False  # test


def delete_uncommitted(client: TracingClient, experiment_id: str, run_id: str,
                       last_step: int) -> int:
    """Delete the traces of ``run_id`` whose phase never committed; the number deleted."""
    doomed = [t.trace_id for t in run_traces(client, experiment_id, run_id)
              if not committed(t.tags, last_step)]
    for i in range(0, len(doomed), 100):
        client.delete_traces(experiment_id, trace_ids=doomed[i: i + 100])
    return len(doomed)


__all__ = ["PHASE_FAILED", "PHASE_INITIAL", "PHASE_STEP", "PHASE_TEST", "committed",
           "delete_uncommitted", "run_traces", "write_trace"]
