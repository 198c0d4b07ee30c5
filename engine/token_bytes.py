"""A token's own bytes, as OpenAI's chat logprobs give them (`bytes`) and as structured outputs
read them: joined over a completion they are its text's UTF-8. Decoding a token alone shows
U+FFFD for a token that is part of a character (an emoji spread over byte tokens); its bytes
are that part, read from the vocabulary: byte-level BPE (GPT-2's alphabet: Llama 3, Qwen,
SmolLM2) or SentencePiece byte fallback (`<0xE4>`: Llama 2, Mistral). Other tokens' bytes are
their text's UTF-8.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the characters its vocabulary spells bytes with, to the bytes: printable
    bytes stand for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = {b: b for b in printable}
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + len(codes) - len(printable)
    return {chr(code): b for b, code in codes.items()}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    # The decoder's own JSON (its pickled state), not the whole tokenizer's: ~0.1 ms, not ~0.2 s.
    config = json.loads(decoder.__getstate__())
    return {d.get("type") for d in config.get("decoders", [config])}


def token_bytes_reader(tokenizer: Any) -> Callable[[int, str], bytes]:
    """`read(token_id, text)`: the token's bytes, given its text decoded alone."""
    piece_bytes = _piece_reader(tokenizer)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})

    def read(token_id: int, text: str) -> bytes:
        if "\ufffd" not in text or token_id in added:
            return text.encode()
        return piece_bytes(tokenizer.convert_ids_to_tokens(token_id) or "") or text.encode()

    return read


def _piece_reader(tokenizer: Any) -> Callable[[str], bytes | None]:
    """A vocabulary piece's bytes where its spelling says them (GPT-2's byte alphabet, or a
    SentencePiece byte fallback `<0xE4>`); None where it does not."""
    kinds = _decoder_kinds(tokenizer)
    alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
    byte_fallback = "ByteFallback" in kinds

    def piece_bytes(piece: str) -> bytes | None:
        if alphabet is not None and piece and all(ch in alphabet for ch in piece):
            return bytes(alphabet[ch] for ch in piece)
        match = _BYTE_FALLBACK.fullmatch(piece) if byte_fallback else None
        return bytes([int(match.group(1), 16)]) if match else None

    return piece_bytes


def vocabulary_bytes(tokenizer: Any, size: int) -> list[bytes | None]:
    """Every token's bytes as it adds them to a text, for ids below `size` (the model's
    vocabulary, which may be larger than the tokenizer's); None for special tokens (BOS, EOS,
    chat markers: no text of their own) and for ids the tokenizer does not have."""
    piece_bytes = _piece_reader(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}
    known = min(size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
    out: list[bytes | None] = [None] * size
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            continue
        if token_id in added:
            out[token_id] = str(added[token_id]).encode()
        else:  # otherwise SentencePiece's: ▁ is a space
            out[token_id] = piece_bytes(piece) or piece.replace("\u2581", " ").encode()
    return out
