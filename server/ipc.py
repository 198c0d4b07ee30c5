"""Framing for the pipes between the HTTP process and its worker: length-prefixed JSON.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. Only plain
data crosses (dicts, lists, str, numbers, bool, None): nothing is ever unpickled, so a frame
can at worst be rejected, never run code. One writer per fd (or a lock); one reader per fd.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30


class FrameError(RuntimeError):
    """The byte stream does not hold a well-formed frame."""


# A step's output for one engine request travels as a list of these fields, and each of its
# samples as a list of COMPLETION_FIELDS: at 256 streams a step, named fields were twice the
# bytes and twice the JSON time at both ends of the pipe. Optional fields travel as null.
OUTPUT_FIELDS = ("id", "finished", "num_prompt_tokens", "num_cached_tokens", "outputs", "prompt_logprobs",
                 "metrics")
COMPLETION_FIELDS = ("index", "text", "token_ids", "logprobs", "num_tokens", "finish_reason", "stop_reason")
OPTIONAL_FIELDS = ("prompt_logprobs", "metrics")


def unpack_output(row: list[Any]) -> dict[str, Any]:
    """An output as the worker sends it, by field name; the optional fields only when present."""
    if not isinstance(row, list) or len(row) != len(OUTPUT_FIELDS):
        raise FrameError(f"an output has {len(OUTPUT_FIELDS)} fields: {row!r:.200}")
    output = dict(zip(OUTPUT_FIELDS, row))
    for name in OPTIONAL_FIELDS:
        if output[name] is None:
            del output[name]
    output["outputs"] = [dict(zip(COMPLETION_FIELDS, c)) for c in output["outputs"]]
    return output


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
