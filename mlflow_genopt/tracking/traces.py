"""LLM calls as MLflow traces: one trace per loop phase, one ``CHAT_MODEL`` span per call.

A phase is evaluating the starting version, one step, or the final test. Its trace is linked to
the loop's run and to the LoggedModel of the version the phase produced; every span starts and
ends at the call's real times and carries token usage, cost, cache hits and errors. Spans are
handed to MLflow's asynchronous trace exporter (see the guarantees in
:mod:`mlflow_genopt.tracking`).
"""

from __future__ import annotations

from typing import Any, Sequence

import mlflow
from mlflow.entities import LiveSpan, SpanType
from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey

from ..events import StepRecord
from ..llm.base import LLMCall
from . import layout


def write_trace(
    calls: Sequence[LLMCall],
    name: str,
    *,
    run_id: str,
    experiment_id: str,
    phase: int,
    model_id: str | None = None,
    step_record: StepRecord | None = None,
    error: str | None = None,
) -> None:
    """One trace for the LLM calls of one phase: a root span over them, a child per call.
    ``calls`` must be sorted by start time; nothing is written when there are none."""
    if not calls:
        return
    metadata = {TraceMetadataKey.SOURCE_RUN: run_id}
    if model_id is not None:
        metadata[TraceMetadataKey.MODEL_ID] = model_id
    trace_tags = {layout.TAG_STEP: str(phase), layout.TAG_RUN_ID: run_id}
    inputs: dict[str, Any] = {"step": phase, "llm_calls": len(calls)}
    outputs: dict[str, Any] = {}
    if step_record is not None:
        inputs.update(current_id=step_record.current_id, batch_ids=list(step_record.batch_ids))
        outputs = {
            "candidate_id": step_record.candidate_id,
            "invalid_reason": step_record.invalid_reason,
            "accepted": step_record.accepted,
            "val_score": step_record.val_score,
        }
    with mlflow.tracing.context(metadata=metadata, tags=trace_tags):
        root = mlflow.start_span_no_context(
            name=name,
            span_type=SpanType.CHAIN,
            inputs=inputs,
            experiment_id=experiment_id,
            start_time_ns=calls[0].start_time_ns,
        )
    failed = error is not None
    for call in calls:
        failed |= call.error is not None
        _trace_call(root, call)
    end = max(c.end_time_ns for c in calls)
    if error is not None:
        outputs["error"] = error
    root.end(outputs=outputs or None, status="ERROR" if failed else "OK", end_time_ns=end)


def _trace_call(root: LiveSpan, call: LLMCall) -> None:
    completion = call.completion
    attributes: dict[str, Any] = {
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
    span = mlflow.start_span_no_context(
        name=f"{call.purpose} llm",
        span_type=SpanType.CHAT_MODEL,
        parent_span=root,
        inputs={"messages": [dict(m) for m in call.messages], **dict(call.params)},
        attributes=attributes,
        start_time_ns=call.start_time_ns,
    )
    if call.error is not None:
        span.record_exception(call.error)
        span.end(status="ERROR", end_time_ns=call.end_time_ns)
        return
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
