"""Incremental detokenizer on the embedded model's real (byte-level BPE) tokenizer: each test
both through the tokenizers library's DecodeStream (fast tokenizers) and through the window's
own decodes (other tokenizers, and after the stream rejects a prefix)."""

from __future__ import annotations

import random

import pytest

from engine import detokenizer
from engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "Emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 in one line",
    "中文测试：你好，世界。日本語のテキストも。한국어도",
    "Accents: café, naïve, résumé, Ångström, São Paulo, Zürich",
    "  leading spaces\n\nnew lines\ttabs   and ∑ math ∫ symbols →",
]


@pytest.fixture(autouse=True, params=["stream", "window"])
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "window":
        monkeypatch.setattr(detokenizer, "DecodeStream", None)
    return request.param


@pytest.fixture(scope="module")
def tok(default_model_dir: str):
    """The embedded model's tokenizer (byte-level BPE), as the engine loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def stream(tok, prompt, output, **kw):
    """Feed output ids one by one; returns (detokenizer, deltas, index of the stopping token)."""
    d = IncrementalDetokenizer(tok, prompt, **kw)
    deltas, stopped_at = [], None
    for i, t in enumerate(output):
        if d.add_token(t):
            stopped_at = i
            deltas.append(d.take_delta())
            break
        deltas.append(d.take_delta())
    else:
        d.finish()
        deltas.append(d.take_delta())
    return d, deltas, stopped_at


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_without_partial_chars(tok, text):
    prompt = encode(tok, "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    out = encode(tok, text)
    d, deltas, stopped = stream(tok, prompt, out)
    assert stopped is None and d.stop_reason is None
    assert "".join(deltas) == tok.decode(out, skip_special_tokens=True) == text
    assert d.text == text
    for delta in deltas:
        assert "\ufffd" not in delta


def test_multibyte_characters_split_over_tokens_are_held(tok):
    out = encode(tok, "😀")
    assert len(out) > 1  # byte-level BPE splits the emoji
    d = IncrementalDetokenizer(tok, [])
    for t in out[:-1]:
        d.add_token(t)
        assert d.take_delta() == ""
    d.add_token(out[-1])
    assert d.take_delta() == "😀"


def test_random_token_sequences_match_decode(tok):
    rng = random.Random(0)
    vocab = len(tok)
    for trial in range(60):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        # bias towards byte tokens (ids < 256ish) so partial UTF-8 sequences are common
        out = [rng.randrange(300) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(40)]
        if trial % 3 == 0:
            out[rng.randrange(40)] = rng.choice(tok.all_special_ids)
        for skip in (True, False):
            d, deltas, _ = stream(tok, prompt, out, skip_special_tokens=skip)
            want = tok.decode(out, skip_special_tokens=skip)
            assert "".join(deltas) == want == d.text, (trial, skip)


def test_skip_special_tokens_both_ways(tok):
    out = encode(tok, "Sure!") + [tok.convert_tokens_to_ids("<|im_end|>")] + encode(tok, " bye")
    _, deltas, _ = stream(tok, [], out, skip_special_tokens=True)
    assert "".join(deltas) == "Sure! bye"
    _, deltas, _ = stream(tok, [], out, skip_special_tokens=False)
    assert "".join(deltas) == "Sure!<|im_end|> bye"


def _check_stop(tok, text, stop, expect_reason, include=False):
    out = encode(tok, text)
    d, deltas, stopped = stream(tok, [], out, stop=stop, include_stop_str_in_output=include)
    i = text.index(expect_reason)
    want = text[: i + len(expect_reason)] if include else text[:i]
    assert stopped is not None and d.stop_reason == expect_reason
    assert d.text == want and "".join(deltas) == want
    # streaming never showed text beyond what the final text keeps
    shown = ""
    for delta in deltas:
        shown += delta
        assert want.startswith(shown)
    if not include:
        for s in stop:
            assert all(s not in delta for delta in deltas)
    # stopping happened at the token that completed the stop string, not later
    assert tok.decode(out[: stopped + 1]).find(expect_reason) >= 0
    assert tok.decode(out[:stopped]).find(expect_reason) < 0
    return out, deltas, stopped


def test_stop_string_spanning_tokens(tok):
    text = "The quick brown fox jumps over the lazy dog."
    out, _, stopped = _check_stop(tok, text, ["fox jum"], "fox jum")
    # the stop string really spans several tokens
    assert "fox jum" not in tok.decode([out[stopped]])


def test_stop_string_never_leaks_into_deltas(tok):
    text = "Counting: one, two, three, END of list, four"
    out = encode(tok, text)
    d = IncrementalDetokenizer(tok, [], stop=["END of list"])
    shown = ""
    for t in out:
        hit = d.add_token(t)
        shown += d.take_delta()
        # no prefix of the stop string longer than what is already final may be visible
        assert "E" not in shown, shown
        if hit:
            break
    assert shown == "Counting: one, two, three, "
    assert d.stop_reason == "END of list"


def test_include_stop_str_in_output(tok):
    _check_stop(tok, "Answer: 42. Done here.", ["Done"], "Done", include=True)
    _check_stop(tok, "你好，世界！再见", ["世界"], "世界", include=True)
    _check_stop(tok, "The quick brown fox jumps over the lazy dog.", ["fox jum"], "fox jum", include=True)


def test_included_stop_strings_hold_nothing_back(tok):
    """A stop string that is to be shown anyway holds no text back (as vLLM): every token's
    text streams at once, and one spanning tokens still stops at the token completing it."""
    text = "Answer: Do it. Done here."
    out = encode(tok, text)
    d = IncrementalDetokenizer(tok, [], stop=["Done"], include_stop_str_in_output=True)
    shown = ""
    for i, t in enumerate(out):
        hit = d.add_token(t)
        shown += d.take_delta()
        if hit:
            break
        assert shown == tok.decode(out[: i + 1]), "text held back"
    assert shown == d.text == "Answer: Do it. Done" and d.stop_reason == "Done"


def test_multiple_stop_strings_earliest_wins(tok):
    text = "alpha beta gamma delta epsilon"
    _check_stop(tok, text, ["delta", "beta", "epsilon"], "beta")
    # two stop strings completing on the same token: the one that starts earlier wins
    _check_stop(tok, "xx hello world yy", ["world", "hello world"], "hello world")


def test_stop_string_across_multibyte_characters(tok):
    _check_stop(tok, "Party time 🎉🎉 now, then sleep", ["🎉 now"], "🎉 now")


def test_partial_stop_prefix_is_released(tok):
    # "STO" looks like the start of "STOP" and is held, then released when it isn't
    text = "Please STOW the bags; then STO"
    out = encode(tok, text)
    d, deltas, stopped = stream(tok, [], out, stop=["STOP"])
    assert stopped is None and d.stop_reason is None
    assert "".join(deltas) == text
    assert not deltas[-2].endswith("STO")  # held until finish()
    assert deltas[-1].endswith("STO")


def test_add_token_after_stop_is_ignored(tok):
    out = encode(tok, "a b c d e")
    d = IncrementalDetokenizer(tok, [], stop=[" c"])
    results = [d.add_token(t) for t in out]
    assert results.count(True) == 1
    d.finish()
    assert d.text == "a b" and d.take_delta() == "a b"


def test_sentencepiece_style_leading_space_and_byte_fallback():
    """Metaspace + byte-fallback decoder (Llama/Mistral style): the first output token keeps
    its leading space thanks to the prompt context; byte tokens are held until complete."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "▁Hello", "▁world", "!", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    prompt = [2]  # "Hello"
    out = [3, 4, 9, 5, 6, 7, 8, 1, 3, 5, 6]  # " world! 😀</s> world" + an unfinished emoji
    d = IncrementalDetokenizer(sp, prompt)
    deltas = []
    for t in out:
        d.add_token(t)
        deltas.append(d.take_delta())
    assert deltas[:4] == [" world", "!", " ", ""]
    assert all("\ufffd" not in x for x in deltas)
    d.finish()
    deltas.append(d.take_delta())
    full = sp.decode(prompt + out, skip_special_tokens=True)
    assert "".join(deltas) == full[len(sp.decode(prompt)) :] == " world! 😀 world\ufffd\ufffd"


def test_text_released_at_the_end_is_not_cut_at_a_stop_string(tok) -> None:
    """The tail held for an unfinished character is released when the request ends (length,
    EOS): a stop string in it cut the text while the request reported that other finish."""
    unfinished = 40303  # " " and the first byte of a CJK character
    assert tok.decode([unfinished]).endswith("\ufffd")
    out = encode(tok, "Hi") + [unfinished]
    d = IncrementalDetokenizer(tok, [], stop=[" "])
    assert not any(d.add_token(t) for t in out)
    d.finish()
    assert d.text == tok.decode(out) == "Hi \ufffd" and not d.stop_reason


def test_stop_strings_are_not_checked_before_min_tokens(tok) -> None:
    ids = tok.encode(" one two one two three")
    detok = IncrementalDetokenizer(tok, [], stop=["two"])
    matched = [detok.add_token(t, check_stop=i >= 3) for i, t in enumerate(ids)]
    # The first "two" falls before min_tokens and is shown; the second one stops.
    assert matched.index(True) == 3
    assert detok.text == " one two one "


def test_the_path_taken(tok, decode_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = IncrementalDetokenizer(tok, encode(tok, "Say hi"))
    assert (d._stream is not None) == (decode_path == "stream")

    class Old:  # tokenizers 0.21: no prompt ids
        def __init__(self, skip_special_tokens: bool = False) -> None:
            pass

    monkeypatch.setattr(detokenizer, "DecodeStream", Old)
    assert IncrementalDetokenizer(tok, encode(tok, "Say hi"))._stream is None


def test_a_stream_that_rejects_a_prefix_hands_over_to_the_window(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """DecodeStream raises "invalid prefix" where a decoder rewrites earlier text: the request
    goes on with the window's decodes, and its text is still what tokenizer.decode gives."""
    from tokenizers.decoders import DecodeStream as real

    class Failing:
        def __init__(self, **kw):
            self.inner, self.calls = real(**kw), 0

        def step(self, backend, token_id):
            self.calls += 1
            if self.calls == 7:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(backend, token_id)

    monkeypatch.setattr(detokenizer, "DecodeStream", Failing)
    prompt, output = encode(tok, "Write:"), encode(tok, TEXTS[1] + " " + TEXTS[2])
    d, deltas, _ = stream(tok, prompt, output)
    assert d._stream is None
    assert "".join(deltas) == d.text == tok.decode(output, skip_special_tokens=True)
