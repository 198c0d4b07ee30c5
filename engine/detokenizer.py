"""Incremental (streaming) detokenization with stop strings.

Decoding token by token is not `decode([t])` per token: byte-level BPE splits one emoji or
CJK character over several tokens, and sentencepiece tokenizers drop the leading space of
whatever token comes first. So, as vLLM does, each step decodes a small window of recent
tokens and emits only what the newest tokens added:

    window = ids[prefix_offset:]        prefix_text = decode(ids[prefix_offset:read_offset])
    new = decode(window)                emit new[len(prefix_text):] unless new ends in '\ufffd'

then slides `prefix_offset = read_offset; read_offset = len(ids)`. Text that ends in an
incomplete UTF-8 character (U+FFFD) is held until a later token completes it, or until
`finish()`, which releases it as `tokenizer.decode` would show it. The window starts with the
prompt's last few tokens, so the first output token gets the same spacing it has in context.
Cost per token: two decodes of a few tokens. With a Rust (fast) tokenizer the same algorithm
runs inside the tokenizers library (`DecodeStream`, one call per token, about 2.7x faster);
the window here still slides alongside, undecoded, so `finish()` can release held bytes, and
should the stream reject a prefix (its "invalid prefix" error, where a decoder rewrites
earlier text) the request carries on with the decodes here.

Stop strings may span tokens. The trailing characters that could still become the start of
a stop string are held back, so no streamed delta ever contains any part of a stop string;
on a match the text is cut before it. A match can only start in the held-back text, so only
that tail is searched and ever rewritten; the text before it is kept as a list of pieces, not
one string that every token would copy. With `include_stop_str_in_output` nothing is held
back (a stop string is shown anyway; vLLM's too): the search also covers the shown text's last
characters, and on a match the new text is cut after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21: the window's decodes only
    DecodeStream = None

_PROMPT_CONTEXT = 5  # prompt tokens decoded as context for the first output tokens
_REPLACEMENT = "\ufffd"


def held_back(text: str, marker: str) -> int:
    """How many of the text's last characters could begin `marker`: a stream holds them until
    the next text says (a tool call's or a reasoning tag's start, as stop strings here)."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return keep
    return 0


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids skip_special_tokens leaves out: the added tokens marked special."""
    return frozenset(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        special_skipped: frozenset[int] | None = None,
    ) -> None:
        """`special_skipped`: the special tokens skip_special_tokens leaves out, by id before
        decoding (as the tokenizer skips them), where some must show: all special tokens but a
        reasoning parser's tags (engine/reasoning.py). None: the tokenizer skips them all."""
        self._skipped: frozenset[int] = frozenset()
        if skip_special_tokens and special_skipped is not None:
            self._skipped = special_skipped
            skip_special_tokens = False
        # The Rust tokenizer decodes without transformers' Python overhead; transformers'
        # decode adds only clean_up_tokenization_spaces, which incremental decoding cannot
        # honour (it rewrites across token boundaries) and vLLM ignores as well.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode_fn = lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
        else:
            self._decode_fn = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._max_stop = max((len(s) for s in self._stop), default=0)

        context = [t for t in prompt_token_ids[-_PROMPT_CONTEXT:] if t not in self._skipped]
        self._prefix_text = self._decode(context) if context else ""
        if self._prefix_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: its text is no stable prefix. Decode the
            # output on its own instead (as tokenizer.decode(output_ids) would).
            context, self._prefix_text = [], ""
        self._ids: list[int] = context  # window: context + tokens not yet settled
        self._read = len(context)  # window[:_read] decodes to _prefix_text (stale while streaming)
        self._backend, self._stream = backend, None
        if backend is not None and DecodeStream is not None:
            try:
                self._stream = DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
            except TypeError:  # tokenizers before 0.22 take no prompt ids: the window's decodes
                pass

        self._shown: list[str] = []  # the text that may be shown, in pieces
        self._num_taken = 0  # pieces already returned by take_delta
        self._held = ""  # decoded text after it: a stop string may yet start there
        self._recent = ""  # with include_stop_str_in_output: the shown text's last characters
        self.stop_reason: str | None = None
        self._done = False

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids)

    @property
    def text(self) -> str:
        """All output text safe to show so far."""
        return "".join(self._shown)

    @property
    def finished(self) -> bool:
        return self._done

    def take_delta(self) -> str:
        """Text appended to `text` since the last call."""
        delta = "".join(self._shown[self._num_taken:])
        self._num_taken = len(self._shown)
        return delta

    def add_token(self, token_id: int, check_stop: bool = True) -> bool:
        """Add one generated token; True iff a stop string matched now (text is then final).
        With check_stop False (before min_tokens) stop strings are not looked for."""
        if self._done or token_id in self._skipped:
            return False
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001 - "invalid prefix": on with the window's decodes
                self._stream = None
                self._prefix_text = self._decode(self._ids[: self._read])
            else:
                if piece is None:
                    return False
                self._slide()
                return self._append(piece, check_stop)
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return False  # nothing new, or an incomplete character: wait for more tokens
        return self._append(self._settle(new_text), check_stop)

    def finish(self) -> None:
        """The request ended: release text held for incomplete characters or stop strings. It
        ended for another reason (length, EOS, abort), so no stop string is looked for in the
        released tail: a cut there would contradict that reason (and may fall before min_tokens)."""
        if self._done:
            return
        if len(self._ids) > self._read:
            if self._stream is not None:  # the window's prefix text was not kept up to date
                self._prefix_text = self._decode(self._ids[: self._read])
            new_text = self._decode(self._ids)
            if len(new_text) > len(self._prefix_text):
                self._append(self._settle(new_text), check_stop=False)
        self._show(len(self._held))
        self._done = True

    def _settle(self, new_text: str) -> str:
        """The text the unsettled tokens add; slide the window so it starts at the last chunk."""
        # The window starts on a character boundary, so new_text extends prefix_text for the
        # decoders in use (byte-level, metaspace, byte-fallback); were it to rewrite earlier
        # text, this keeps going as vLLM does rather than retract what was shown.
        delta = new_text[len(self._prefix_text) :]
        self._slide()
        self._prefix_text = self._decode(self._ids)
        return delta

    def _slide(self) -> None:
        """The window after a settle: the tokens just settled are the new prefix."""
        del self._ids[: self._read]
        self._read = len(self._ids)

    def _append(self, delta: str, check_stop: bool = True) -> bool:
        if not self._stop:
            self._shown.append(delta)
            return False
        recent = self._recent
        start = len(recent) + len(self._held)
        self._held += delta
        text = recent + self._held if recent else self._held
        # Earliest stop string that ends inside the new text (ties: the first listed).
        best: tuple[int, str] | None = None
        for s in self._stop if check_stop else ():
            i = text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self._held = self._held[: (i + len(s) if self._include_stop else i) - len(recent)]
            self._show(len(self._held))
            self.stop_reason = s
            self._done = True
            return True
        if self._include_stop:
            self._recent = (recent + self._held)[-(self._max_stop - 1):] if self._max_stop > 1 else ""
            self._show(len(self._held))
        else:
            self._show(len(self._held) - self._held_back())
        return False

    def _show(self, n: int) -> None:
        """The first n held characters may be shown."""
        if n > 0:
            self._shown.append(self._held[:n])
            self._held = self._held[n:]

    def _held_back(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of a stop string."""
        tail = self._held[-(self._max_stop - 1) :] if self._max_stop > 1 else ""
        for n in range(len(tail), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
