"""Classification and scoring (engine/scoring.py, LLM.classify, LLM.score): a sequence
classifier's probabilities equal transformers' `*ForSequenceClassification`, a cross-encoder's
score is its one logit through the activation its config names, any other model scores a pair
by its embeddings' cosine similarity; refusals queue nothing and no KV block is left behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine import LLM, PoolingParams
from tests.conftest import QWEN3_RERANKER_TEMPLATE, assert_engine_idle, save_tiny_causal_lm, save_tiny_classifier

TOLERANCE = 2e-5  # fp32, the same math in another order
TEXTS = ["hello", "What is the capital of France? Paris is the capital and the largest city of France, "
         "home to the Louvre and the Eiffel Tower.", "a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_classifier(str(tmp_path_factory.mktemp("ce")), "llama", num_labels=1)


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_classifier(str(tmp_path_factory.mktemp("cls")), "qwen3", num_labels=3)


def hf_logits(path: str, texts: list[str] | list[tuple[str, str]], pooling: str = "LAST") -> list[torch.Tensor]:
    """transformers' classifier logits for each text (or pair: the tokenizer's pair encoding, as
    sentence-transformers' CrossEncoder reads it) alone (MEAN: its score head over the mean of
    the last hidden states, as vLLM pools before the head)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(*text if isinstance(text, tuple) else (text,), return_tensors="pt").input_ids
            if pooling == "LAST":
                out.append(model(ids).logits[0])
            else:
                out.append(model.score(model.model(ids).last_hidden_state[0].mean(dim=0)))
    return out


def assert_close(have: list[float] | float, want: torch.Tensor) -> None:
    have = torch.tensor(have if isinstance(have, list) else [have])
    assert have.shape == want.reshape(-1).shape
    assert torch.allclose(have, want.reshape(-1), atol=TOLERANCE, rtol=0), (have - want).abs().max().item()


def test_classify_equals_transformers_softmax_and_logits(three_labels: str) -> None:
    """Three labels: a softmax over transformers' logits, and the logits themselves with
    use_activation=False, for prompts chunked across steps (32 tokens) and batched together."""
    llm = LLM(three_labels, num_kv_blocks=64, max_num_batched_tokens=32)
    probs = llm.classify(TEXTS, use_tqdm=False)
    logits = llm.classify(TEXTS, PoolingParams(use_activation=False), use_tqdm=False)
    for text, p, raw, want in zip(TEXTS, probs, logits, hf_logits(three_labels, TEXTS)):
        assert p.prompt == text and p.finished and p.outputs.num_classes == 3
        assert_close(p.outputs.probs, torch.softmax(want, dim=-1))
        assert_close(raw.outputs.probs, want)
    assert probs[0].prompt_token_ids == llm.get_tokenizer().encode(TEXTS[0])
    assert_engine_idle(llm)


def test_mean_pooling_classifies_the_mean_of_the_hidden_states(three_labels: str) -> None:
    llm = LLM(three_labels, num_kv_blocks=64, max_num_batched_tokens=32, pooler_config={"pooling_type": "MEAN"})
    outs = llm.classify(TEXTS, use_tqdm=False)
    for out, want in zip(outs, hf_logits(three_labels, TEXTS, "MEAN")):
        assert_close(out.outputs.probs, torch.softmax(want, dim=-1))
    assert_engine_idle(llm)


@pytest.mark.parametrize("problem_type, activation", [("regression", lambda x: x),
                                                      ("multi_label_classification", torch.sigmoid)])
def test_the_problem_type_picks_the_activation(tmp_path, problem_type: str, activation) -> None:
    path = save_tiny_classifier(str(tmp_path), "llama", num_labels=3, problem_type=problem_type)
    llm = LLM(path, num_kv_blocks=32)
    for out, want in zip(llm.classify(TEXTS, use_tqdm=False), hf_logits(path, TEXTS)):
        assert_close(out.outputs.probs, activation(want))


def test_a_cross_encoder_scores_the_encoded_pair_through_a_sigmoid(cross_encoder: str) -> None:
    """1:N and N:N pairs: each pair is one prompt, the tokenizer's encoding of the pair (as
    sentence-transformers' CrossEncoder and vLLM read it); classify gives the same sigmoid;
    without activation, the logit."""
    llm = LLM(cross_encoder, num_kv_blocks=64, max_num_batched_tokens=32)
    query, docs = "query: where is Paris? ", ["Paris is in France.", "Bananas are yellow.", "Paris, Texas."]
    wants = hf_logits(cross_encoder, [(query, d) for d in docs])
    one_to_n = llm.score(query, docs, use_tqdm=False)
    n_to_n = llm.score([query] * 3, docs, use_tqdm=False)
    raw = llm.score(query, docs, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    for a, b, r, want in zip(one_to_n, n_to_n, raw, wants):
        assert_close(a.outputs.score, torch.sigmoid(want))
        assert_close(b.outputs.score, torch.sigmoid(want))
        assert_close(r.outputs.score, want)
    tokenizer = llm.get_tokenizer()
    assert not llm.engine.classifier.joins_pairs
    assert one_to_n[0].prompt_token_ids == tokenizer(query, text_pair=docs[0])["input_ids"]
    assert one_to_n[0].prompt == tokenizer.decode(one_to_n[0].prompt_token_ids)
    single = llm.score(query, docs[1], use_tqdm=False)
    assert len(single) == 1 and single[0].outputs.score == pytest.approx(one_to_n[1].outputs.score, abs=TOLERANCE)
    classified = llm.classify([o.prompt_token_ids for o in one_to_n], use_tqdm=False)
    for c, a in zip(classified, one_to_n):
        assert c.outputs.probs == pytest.approx([a.outputs.score], abs=TOLERANCE)
    assert_engine_idle(llm)


def _set_config(path: str, **values: object) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config | values, f)


def test_a_cross_encoders_configured_activation_is_applied(tmp_path) -> None:
    """sentence-transformers' CrossEncoder config: its activation_fn (here none) for score;
    classify keeps the sigmoid of one label. A class outside torch.nn.modules is refused."""
    path = save_tiny_classifier(str(tmp_path), "llama", num_labels=1)
    _set_config(path, sentence_transformers={"activation_fn": "torch.nn.modules.linear.Identity"})
    llm = LLM(path, num_kv_blocks=32)
    want = hf_logits(path, [("a", "b")])[0]
    assert_close(llm.score("a", "b", use_tqdm=False)[0].outputs.score, want)
    assert_close(llm.classify([llm.get_tokenizer()("a", "b")["input_ids"]], use_tqdm=False)[0].outputs.probs,
                 torch.sigmoid(want))
    _set_config(path, sentence_transformers={"activation_fn": "torch.nn.modules.linear.Identity"}, use_sep_token=False)
    joined = LLM(path, num_kv_blocks=32)  # vLLM's use_sep_token false: the texts joined, as an LLM reranker's
    assert_close(joined.score("a", "b", use_tqdm=False)[0].outputs.score, hf_logits(path, ["ab"])[0])
    _set_config(path, sentence_transformers={"activation_fn": "os.system"})
    with pytest.raises(ValueError, match="activation 'os.system' is not supported"):
        LLM(path, num_kv_blocks=32)


def test_an_embedding_model_scores_by_cosine_similarity(default_model_dir: str) -> None:
    """A bi-encoder: each text embedded alone (the shared first text once), the score their
    embeddings' cosine similarity; a pair's prompt tokens are both texts'."""
    llm = LLM(None, num_kv_blocks=64)
    query, docs = "What is the capital of France?", ["Paris is the capital of France.", "Bananas are yellow."]
    scores = llm.score(query, docs, use_tqdm=False)
    embedded = llm.embed([query] + docs, use_tqdm=False)
    q = torch.tensor(embedded[0].outputs.embedding)
    for out, doc, e in zip(scores, docs, embedded[1:]):
        want = torch.nn.functional.cosine_similarity(q, torch.tensor(e.outputs.embedding), dim=0)
        assert out.outputs.score == pytest.approx(want.item(), abs=1e-6)
        assert out.prompt_token_ids == embedded[0].prompt_token_ids + e.prompt_token_ids
    assert scores[0].outputs.score > scores[1].outputs.score  # the embedded model is a real one
    pairs = llm.score([query, docs[0]], [docs[0], docs[0]], use_tqdm=False)
    assert pairs[0].outputs.score == pytest.approx(scores[0].outputs.score, abs=1e-6)
    assert pairs[1].outputs.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="cosine similarity"):
        llm.score(query, docs, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    with pytest.raises(ValueError, match="computes embeddings"):
        llm.classify(query, use_tqdm=False)
    assert_engine_idle(llm)


@pytest.mark.parametrize("data_1, data_2, error", [
    (["a", "b"], ["c", "d", "e"], "1:1, 1:N or N:N"),
    ([], ["c"], "at least one text"),
    ("a", [], "at least one text"),
    ([1, 2], "c", "data_1 must be a text"),
])
def test_bad_pairs_are_refused(cross_encoder: str, data_1, data_2, error: str) -> None:
    llm = LLM(cross_encoder, num_kv_blocks=16)
    with pytest.raises((ValueError, TypeError), match=error):
        llm.score(data_1, data_2, use_tqdm=False)
    assert_engine_idle(llm)


def test_refusals_queue_nothing(cross_encoder: str, three_labels: str) -> None:
    """A classifier generates nothing and embeds nothing; a classifier of three labels does not
    score; embeddings' params are refused for classify; nothing is left queued."""
    from engine import SamplingParams

    llm = LLM(cross_encoder, num_kv_blocks=16)
    with pytest.raises(ValueError, match="generates nothing"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="computes no embeddings"):
        llm.embed([[5, 6, 7]], use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions and normalize apply to embeddings"):
        llm.classify([[5, 6, 7]], PoolingParams(normalize=True), use_tqdm=False)
    with pytest.raises(ValueError, match="pooling params for embed were given to classify"):
        llm.classify([[5, 6, 7]], PoolingParams(task="embed"), use_tqdm=False)
    with pytest.raises(ValueError, match="task must be one of"):
        PoolingParams(task="rerank")
    assert_engine_idle(llm)
    multi = LLM(three_labels, num_kv_blocks=16)
    with pytest.raises(ValueError, match="3 labels: use classify"):
        multi.score("a", "b", use_tqdm=False)
    assert_engine_idle(multi)


def test_aborted_classifications_give_every_block_back(three_labels: str) -> None:
    """Aborted while waiting and halfway through its chunks: an output without probabilities,
    and no block kept; the request computed beside them gives what it gives alone."""
    first, second = [[(7 * i + j) % 400 + 3 for j in range(90)] for i in range(2)]
    want = LLM(three_labels, num_kv_blocks=64).classify(second, use_tqdm=False)[0].outputs.probs
    llm = LLM(three_labels, num_kv_blocks=16, max_num_seqs=1, max_num_batched_tokens=32)
    engine = llm.engine
    for request_id, tokens in (("mid", first), ("kept", second), ("waiting", first)):
        engine.add_pooling_request(request_id, tokens, PoolingParams(task="classify"))
    engine.step()  # the first's first chunk
    for request_id in ("mid", "waiting"):
        aborted = engine.abort_request(request_id)
        assert aborted.outputs is None and type(aborted).__name__ == "ClassificationRequestOutput"
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step(outputs="final")
    assert [o.request_id for o in outputs] == ["kept"]
    assert outputs[0].outputs.probs == pytest.approx(want, abs=TOLERANCE)
    assert_engine_idle(llm)


RERANKER = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
            "is_original_qwen3_reranker": True}


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Qwen3 causal LM with a tied head: an LLM reranker's checkpoint."""
    return save_tiny_causal_lm(str(tmp_path_factory.mktemp("reranker")), tie_word_embeddings=True)


def hf_last_logits(path: str, text: str) -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt").input_ids).logits[0, -1]


def test_an_llm_reranker_scores_the_softmax_of_its_two_tokens(causal_lm: str) -> None:
    """vLLM's hf_overrides for Qwen3-Reranker: a causal LM served as a cross-encoder whose score
    is the probability of "yes" against "no" after the pair, from transformers' logits."""
    llm = LLM(causal_lm, num_kv_blocks=32, hf_overrides=json.dumps(RERANKER))
    assert llm.engine.classifier.joins_pairs  # vLLM's use_sep_token false for an LLM reranker
    tokenizer = llm.get_tokenizer()
    no, yes = tokenizer.convert_tokens_to_ids("no"), tokenizer.convert_tokens_to_ids("yes")
    query, docs = "<Query>: the capital of France?\n", ["<Document>: Paris", "<Document>: bananas are yellow"]
    for out, doc in zip(llm.score(query, docs, use_tqdm=False), docs):
        logits = hf_last_logits(causal_lm, query + doc)
        assert_close(out.outputs.score, torch.softmax(logits[[no, yes]], dim=-1)[1])
    # Qwen3-Reranker's flag means the 2-way softmax, whatever method says (as in vLLM)
    flagged = LLM(causal_lm, num_kv_blocks=32, hf_overrides=RERANKER | {"method": "no_post_processing"})
    assert flagged.score(query, docs[0], use_tqdm=False)[0].outputs.score == pytest.approx(
        llm.score(query, docs[0], use_tqdm=False)[0].outputs.score, abs=1e-6)
    per_token = LLM(causal_lm, num_kv_blocks=32, hf_overrides=RERANKER | {
        "classifier_from_token": ["no", "yes", "maybe"], "method": "no_post_processing",
        "is_original_qwen3_reranker": False})
    out = per_token.classify(query + docs[0], PoolingParams(use_activation=False), use_tqdm=False)[0]
    ids = [no, yes, tokenizer.convert_tokens_to_ids("maybe")]
    assert_close(out.outputs.probs, hf_last_logits(causal_lm, query + docs[0])[ids])
    assert_engine_idle(llm)


def test_a_score_template_formats_each_pair(causal_lm: str) -> None:
    """vLLM's score template (chat_template): each pair rendered from its query and document
    messages, here in Qwen3-Reranker's format, then scored as transformers scores that text."""
    with open(QWEN3_RERANKER_TEMPLATE) as f:
        template = f.read()
    llm = LLM(causal_lm, num_kv_blocks=32, hf_overrides=RERANKER)
    tokenizer = llm.get_tokenizer()
    no, yes = tokenizer.convert_tokens_to_ids("no"), tokenizer.convert_tokens_to_ids("yes")
    query, docs = "the capital of France?", ["Paris", "bananas are yellow"]
    templated = llm.score(query, docs, chat_template=template, use_tqdm=False)
    for out, doc in zip(templated, docs):
        assert out.prompt.startswith("<|im_start|>system\nJudge whether the Document") and out.prompt.endswith(
            f"<Query>: {query}\n<Document>: {doc}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert out.prompt_token_ids == tokenizer.encode(out.prompt)
        assert_close(out.outputs.score, torch.softmax(hf_last_logits(causal_lm, out.prompt)[[no, yes]], dim=-1)[1])
    (instructed,) = llm.score(query, docs[0], chat_template=template, use_tqdm=False,
                              chat_template_kwargs={"instruction": "Find the city named in the query"})
    assert "<Instruct>: Find the city named in the query\n<Query>:" in instructed.prompt
    assert instructed.outputs.score != pytest.approx(templated[0].outputs.score, abs=1e-6)
    with pytest.raises(ValueError, match="chat_template applies to a cross-encoder"):
        LLM(causal_lm, num_kv_blocks=8).score(query, docs, chat_template=template, use_tqdm=False)


@pytest.mark.parametrize("overrides, error", [
    ({"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"}, "architecture must be one"),
    (RERANKER | {"classifier_from_token": ["no", "absolutelynotatoken"]}, "not a token of this model"),
    (RERANKER | {"is_original_qwen3_reranker": False}, "needs a method"),
    (RERANKER | {"classifier_from_token": ["yes"]}, "takes two tokens"),
    ({"architectures": ["Qwen3ForSequenceClassification"]}, "needs classifier_from_token"),
    ("{not json", "hf_overrides is not valid JSON"),
])
def test_bad_reranker_overrides_are_refused(causal_lm: str, overrides, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        LLM(causal_lm, num_kv_blocks=8, hf_overrides=overrides)


def test_a_bi_encoders_pairs_each_with_its_own_adapter(causal_lm: str, tmp_path) -> None:
    """Per-pair LoRA adapters on a bi-encoder: the one first text is embedded with each pair's
    adapter, so each pair scores as it does alone."""
    from engine import LoRARequest
    from tests.lora_adapters import save_adapter

    loras = [LoRARequest(name, i + 1, save_adapter(str(tmp_path / name), causal_lm, seed=i + 3))
             for i, name in enumerate(("a", "b"))]
    llm = LLM(causal_lm, num_kv_blocks=32, enable_lora=True, max_loras=2, max_lora_rank=8)
    query, docs = "the capital of France", ["Paris", "bananas are yellow"]
    together = llm.score(query, docs, lora_request=loras, use_tqdm=False)
    for out, doc, lora in zip(together, docs, loras):
        alone = llm.score(query, doc, lora_request=lora, use_tqdm=False)[0]
        assert out.outputs.score == pytest.approx(alone.outputs.score, abs=1e-6) and out.lora_request is lora
    assert together[0].outputs.score != pytest.approx(together[1].outputs.score, abs=1e-3)
    assert_engine_idle(llm)
