"""Framing for the pipes between the HTTP process and its worker: length-prefixed JSON.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. Only plain
data crosses (dicts, lists, str, numbers, bool, None): nothing is ever unpickled, so a frame
can at worst be rejected, never run code. One writer per fd (or a lock); one reader per fd.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
import sys
import threading
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30


class FrameError(RuntimeError):
    """The byte stream does not hold a well-formed frame."""


# A step's output for one engine request travels as a list of these fields, and each of its
# samples as a list of COMPLETION_FIELDS: at 256 streams a step, named fields were twice the
# bytes and twice the JSON time at both ends of the pipe. Optional fields travel as null.
# A pooling request's one output (an embedding, a classification, a score) has no samples; its
# `embedding` is its values packed as an embedding's vector (`pack_embedding`): the vector, the
# probabilities, or the one score; "" when it was aborted before it had them.
OUTPUT_FIELDS = ("id", "finished", "num_prompt_tokens", "num_cached_tokens", "outputs", "prompt_logprobs",
                 "metrics", "embedding")
COMPLETION_FIELDS = ("index", "text", "token_ids", "logprobs", "num_tokens", "finish_reason", "stop_reason")
OPTIONAL_FIELDS = ("prompt_logprobs", "metrics", "embedding")


def unpack_output(row: list[Any]) -> dict[str, Any]:
    """An output as the worker sends it, by field name; the optional fields only when present,
    logprobs as `[[token id, logprob], ...]` per token (None for a prompt's first). A pooling
    request's output has `embedding`: its values as `pack_embedding` packed them (for an
    embedding, the bytes OpenAI's base64 encoding_format sends), None if it was aborted."""
    if not isinstance(row, list) or len(row) != len(OUTPUT_FIELDS):
        raise FrameError(f"an output has {len(OUTPUT_FIELDS)} fields: {row!r:.200}")
    output = dict(zip(OUTPUT_FIELDS, row))
    for name in OPTIONAL_FIELDS:
        if output[name] is None:
            del output[name]
    if "prompt_logprobs" in output:
        output["prompt_logprobs"] = unpack_logprobs(output["prompt_logprobs"])
    if "embedding" in output:
        vector = output["embedding"]
        if not isinstance(vector, str):
            raise FrameError(f"an embedding is packed float32: {vector!r:.100}")
        output["embedding"] = vector or None
    output["outputs"] = completions = [dict(zip(COMPLETION_FIELDS, c)) for c in output["outputs"]]
    for c in completions:
        if c["logprobs"] is not None:
            c["logprobs"] = unpack_logprobs(c["logprobs"])
    return output


# Logprobs cross as packed binary in a base64 string: formatting thousands of floats as JSON
# text every step cost the worker's step loop 5 ms a frame at 256 streams of 20 logprobs
# (~1 ms packed), and parsing them the HTTP process 3.3 ms (1.7 ms). The values come from
# float32 tensors, so float32 holds them exactly.
def pack_logprobs(entries: Sequence[Mapping[int, float] | None]) -> str:
    """Per-token {token id: logprob} maps (None where a token has none: a prompt's first) as
    int32 [tokens, count per token (0: None), ids...] then float32 [logprobs...], base64."""
    counts = array("i", [len(e) if e else 0 for e in entries])
    ids, values = array("i"), array("f")
    for entry in entries:
        if entry:
            ids.extend(entry.keys())
            values.extend(entry.values())
    header = array("i", [len(entries)])
    return base64.b64encode(header.tobytes() + counts.tobytes() + ids.tobytes() + values.tobytes()).decode("ascii")


def unpack_logprobs(data: Any) -> list[list[list[float]] | None]:
    """`pack_logprobs`' entries as `[[token id, logprob], ...]` per token (None where none)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise FrameError(f"logprobs are not base64: {data!r:.100}") from None
    if len(raw) < 4:
        raise FrameError("logprobs without a header")
    (n,) = array("i", raw[:4])
    counts = array("i", raw[4:4 + 4 * n]) if n >= 0 and len(raw) >= 4 + 4 * n else None
    total = sum(counts) if counts is not None and min(counts, default=0) >= 0 else -1
    if total < 0 or len(raw) != 4 + 4 * n + 8 * total:
        raise FrameError(f"malformed logprobs ({len(raw)} bytes for {n} tokens)")
    start = 4 + 4 * n
    ids = array("i", raw[start:start + 4 * total]).tolist()
    values = array("f", raw[start + 4 * total:]).tolist()
    out: list[list[list[float]] | None] = []
    k = 0
    for count in counts:
        out.append([[ids[j], values[j]] for j in range(k, k + count)] if count else None)
        k += count
    return out


# Embeddings cross packed too: 64 vectors of 4,096 floats took the worker's step loop 160 ms
# as JSON numbers (and the HTTP process 120 ms to parse), 12 ms packed (13 ms). The values are
# float32 (the engine's), so float32 holds them exactly, and the packed bytes are what OpenAI's
# base64 `encoding_format` sends: little-endian float32, base64.
def pack_embedding(values: Sequence[float]) -> str:
    """An embedding as little-endian float32, base64."""
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def unpack_embedding(data: str) -> list[float]:
    """`pack_embedding`'s floats."""
    try:
        values = array("f", base64.b64decode(data, validate=True))
    except (binascii.Error, TypeError, ValueError):
        raise FrameError(f"an embedding is packed float32: {data!r:.100}") from None
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def encode_frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None


class FrameWriter:
    """Writes frames to a pipe fd; thread-safe. Raises BrokenPipeError once the reader is gone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def write(self, message: Any) -> None:
        data = memoryview(encode_frame(message))
        with self._lock:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class FrameReader:
    """Reads frames from a pipe fd. read() blocks; it returns None at end of stream."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _read_exact(self, n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = os.read(self.fd, min(n - got, 1 << 20))
            if not chunk:
                if got:
                    raise FrameError("stream ended inside a frame")
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def read(self) -> Any | None:
        header = self._read_exact(_HEADER.size)
        if header is None:
            return None
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME_BYTES:
            raise FrameError(f"frame header announces {length} bytes (max {MAX_FRAME_BYTES})")
        body = self._read_exact(length) if length else b""
        if body is None:
            raise FrameError("stream ended inside a frame")
        return decode_body(body)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
