"""What a GGUF file's header says about the model's window, read without loading the model.

A GGUF file starts with a key/value table (``general.architecture``, ``<arch>.context_length``,
layer and head counts, then the tokenizer's large arrays). Reading the few scalars we need costs
a few kilobytes of I/O, so a model spec can be checked, and its window chosen, before llama.cpp
maps gigabytes of weights.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlflow_genopt.llm.base import LLMError

MAGIC = b"GGUF"
# The largest window the embedded backend opens unless told otherwise, and the most memory its
# KV cache may take (f16 keys and values). SmolLM2-135M (8,192 trained) and Qwen2.5-Coder-1.5B
# (32,768 trained, ~0.9 GiB of KV cache at that size) get their full windows.
MAX_AUTO_N_CTX = 32768
KV_CACHE_BUDGET_BYTES = 4 * 1024**3
FALLBACK_N_CTX = 4096  # a header that names no context length

# value type -> struct format of a scalar (8 STRING and 9 ARRAY are variable-length)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_WANTED_SUFFIXES = ("context_length", "block_count", "embedding_length", "attention.head_count",
                    "attention.head_count_kv", "attention.key_length", "attention.value_length")


@dataclass(frozen=True)
class GGUFInfo:
    """The header fields that decide a window. ``context_length`` is the trained window
    (``None`` when the header does not say); the others size the KV cache (``None`` if absent)."""

    path: Path
    architecture: str | None
    context_length: int | None
    kv_bytes_per_token: int | None

    def default_n_ctx(self) -> int:
        """The trained window, bounded by :data:`MAX_AUTO_N_CTX` and by a KV cache of at most
        :data:`KV_CACHE_BUDGET_BYTES` (rounded down to a multiple of 256)."""
        n_ctx = min(self.context_length or FALLBACK_N_CTX, MAX_AUTO_N_CTX)
        if self.kv_bytes_per_token:
            fits = KV_CACHE_BUDGET_BYTES // self.kv_bytes_per_token
            if fits < n_ctx:
                n_ctx = max(256, fits // 256 * 256)
        return n_ctx


class _Reader:
    def __init__(self, handle: BinaryIO, size: int, version: int) -> None:
        self.handle, self.size = handle, size
        self.length_format = "<I" if version == 1 else "<Q"  # version 1 used 32-bit counts

    def take(self, fmt: str) -> Any:
        width = struct.calcsize(fmt)
        data = self.handle.read(width)
        if len(data) != width:
            raise ValueError("header ends early")
        return struct.unpack(fmt, data)[0]

    def length(self) -> int:
        n = self.take(self.length_format)
        if n > self.size:
            raise ValueError(f"a length of {n} exceeds the file size")
        return n

    def string(self) -> str:
        return self.handle.read(self.length()).decode("utf-8", "replace")

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.take("<" + _SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string()
            self.handle.seek(self.length(), 1)
            return None
        if kind == _ARRAY:
            item_kind, count = self.take("<I"), self.length()
            if item_kind in _SCALARS:
                self.handle.seek(struct.calcsize(_SCALARS[item_kind]) * count, 1)
            else:
                for _ in range(count):
                    self.value(item_kind, keep=False)
            return None
        raise ValueError(f"unknown value type {kind}")


def read_gguf_info(path: Path | str) -> GGUFInfo:
    """The window-related header fields of the GGUF file ``path``; one-line :class:`LLMError`
    when it is not a readable GGUF file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if handle.read(4) != MAGIC:
                raise LLMError(f"model file {path} is not a GGUF file (it does not start with "
                               "'GGUF'): pass a .gguf model, e.g. from Hugging Face")
            try:
                version = struct.unpack("<I", handle.read(4))[0]
                if version not in (1, 2, 3):
                    raise ValueError(f"unsupported GGUF version {version}")
                reader = _Reader(handle, size, version)
                reader.take(reader.length_format)  # tensor count
                kv_count = reader.take(reader.length_format)
                found = _scan(reader, kv_count)
            except (ValueError, struct.error) as exc:
                raise LLMError(f"model file {path} has an unreadable GGUF header ({exc}): "
                               "pass a complete .gguf model file") from None
    except OSError as exc:
        raise LLMError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    arch = found.get("general.architecture")
    field = lambda name: _positive(found.get(f"{arch}.{name}"))  # noqa: E731
    context_length = field("context_length")
    layers, heads, width = field("block_count"), field("attention.head_count"), field("embedding_length")
    kv_heads = field("attention.head_count_kv") or heads
    head_dim = (width // heads) if (width and heads) else None
    key_len = field("attention.key_length") or head_dim
    value_len = field("attention.value_length") or head_dim
    per_token = None
    if layers and kv_heads and key_len and value_len:
        per_token = layers * kv_heads * (key_len + value_len) * 2  # f16
    return GGUFInfo(path, arch if isinstance(arch, str) else None, context_length, per_token)


def _scan(reader: _Reader, kv_count: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for _ in range(kv_count):
        key = reader.string()
        arch = found.get("general.architecture")
        if key.startswith("tokenizer.") and f"{arch}.context_length" in found:
            break  # the model's fields come first; skip the tokenizer's large arrays
        kind = reader.take("<I")
        keep = key == "general.architecture" or key.endswith(_WANTED_SUFFIXES)
        value = reader.value(kind, keep)
        if keep:
            found[key] = value
    return found


def _positive(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def write_gguf_header(path: Path | str, metadata: dict[str, Any]) -> Path:
    """A GGUF file holding only a header with ``metadata`` (str, int or list-of-str values), no
    tensors: for tests of header reading; llama.cpp cannot load it."""
    out = bytearray(MAGIC + struct.pack("<IQQ", 3, 0, len(metadata)))

    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    for key, value in metadata.items():
        out += string(key)
        if isinstance(value, str):
            out += struct.pack("<I", _STRING) + string(value)
        elif isinstance(value, list):
            out += struct.pack("<IIQ", _ARRAY, _STRING, len(value))
            out += b"".join(string(v) for v in value)
        else:
            out += struct.pack("<II", 4, int(value))
    Path(path).write_bytes(bytes(out))
    return Path(path)
