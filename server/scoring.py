"""vLLM's `/score`, `/rerank` (Jina's and Cohere's API) and `/classify`: pooling requests, run
as embeddings are (server/embeddings.py; server/serving.py: the same checks, limits, timeout,
aborts and log line; nothing is generated, so no completion tokens are reserved or counted).

- A cross-encoder (a sequence classifier with one label: a reranker) scores each pair as one
  engine request: task "score" on the pair's prompt (engine/scoring.py's `cross_encoder_prompt`:
  the tokenizer's pair encoding, or an LLM reranker's texts joined), its activation applied in
  the engine.
- Any other model that embeds (a bi-encoder) embeds each distinct text once (the one text of a
  1:N request, a rerank's query), and this process scores each pair by its two embeddings'
  cosine similarity (engine/scoring.py's, as the offline `LLM.score`).
- A sequence classifier classifies each input: its labels' probabilities and the most probable
  one's name (config.json's id2label, from the worker's ready frame).

Usage counts the engine requests' prompt tokens: what was computed, what the client's limits are
charged and what --max-prompts caps (vLLM counts a 1:N request's shared text once per pair).
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from engine.scoring import cosine_similarity, cross_encoder_prompt, score_pairs
from server import errors
from server.embeddings import PromptField, packed_values, render_off_loop
from server.errors import APIError
from server.ipc import unpack_embedding
from server.protocol import ClassificationRequest, PairsRequest, RerankRequest, ScoreRequest
from server.request_log import RequestRecord
from server.serving import (RENDER_INLINE_MESSAGES, TOKENIZE_INLINE_CHARS, Choice, Job, OpenAIServing,
                            check_not_empty)


async def score_job(serving: OpenAIServing, req: ScoreRequest, record: RequestRecord, arrival: float) -> Job:
    """A Job for a /score request: its pairs of text_1 and text_2 (or vLLM's other names for
    them), 1:1, 1:N or N:N."""
    record.priority = req.priority or 0  # logged, refused or not
    record.model = serving.check_model(req.model)
    serving.check_pooling_task("score")
    sides = req.sides()
    data_1, data_2 = (getattr(req, side) for side in sides)
    try:
        pairs = score_pairs(data_1, data_2)
    except ValueError as exc:  # a side without texts, or N:M
        raise errors.invalid(str(exc), param=sides[0] if not data_1 else sides[1]) from None
    for side, data in zip(sides, (data_1, data_2)):
        check_not_empty([data] if isinstance(data, str) else data, side)
    job, scores = await _pairs_job(serving, req, record, arrival, "score", pairs, sides)
    job.renderer = ScoreRenderer(scores)
    return job


async def rerank_job(serving: OpenAIServing, req: RerankRequest, record: RequestRecord, arrival: float) -> Job:
    """A Job for a /rerank request: the query's pair with each document."""
    record.priority = req.priority or 0  # logged, refused or not
    record.model = serving.check_model(req.model)
    serving.check_pooling_task("score")
    documents = [d if isinstance(d, str) else d.text for d in req.documents]
    try:
        pairs = score_pairs(req.query, documents)
    except ValueError as exc:  # no documents
        raise errors.invalid(str(exc), param="documents") from None
    check_not_empty([req.query], "query")
    check_not_empty(documents, "documents")
    if req.max_tokens_per_doc:  # 0 or none: whole documents (vLLM's)
        serving.check_prompt_count(len(documents), "documents")  # before they are tokenized
        pairs = list(zip([req.query] * len(pairs), await _first_tokens(serving, documents, req.max_tokens_per_doc)))
    job, scores = await _pairs_job(serving, req, record, arrival, "rerank", pairs, ("query", "documents"))
    job.renderer = RerankRenderer(scores, documents, req.top_n or 0, req.return_documents is not False)
    return job


async def classify_job(serving: OpenAIServing, req: ClassificationRequest, record: RequestRecord,
                       arrival: float) -> Job:
    """A Job for a /classify request: one prompt per input, as an embeddings request's."""
    record.priority = req.priority or 0  # logged, refused or not
    record.model = serving.check_model(req.model)
    serving.check_pooling_task("classify")
    raw, add_special_tokens, field = await serving.pooling_prompts(req)
    prompts, texts = await serving.prompt_ids(req, raw, add_special_tokens, field)
    pooling = {"task": "classify", "use_activation": req.use_activation}
    job = serving.new_job("classify", record, arrival, prompts, texts, {"pooling": pooling})
    job.renderer = ClassificationRenderer(serving.client.info.labels, field)
    return job


async def _first_tokens(serving: OpenAIServing, documents: list[str], limit: int) -> list[str]:
    """Each document cut to the text of its first `limit` tokens (Cohere's max_tokens_per_doc;
    the document itself where it is no longer): its characters up to that token's end, so a cut
    never splits a character (as vLLM's, by the tokenizer's offsets)."""
    if limit < 0:
        raise errors.invalid(f"max_tokens_per_doc must be at least 0 (0: whole documents), got {limit}",
                             param="max_tokens_per_doc")
    if serving.tokenizer is None:
        raise errors.invalid("this model has no tokenizer to count a document's tokens with",
                             param="max_tokens_per_doc")
    tokenizer = serving.tokenizer

    def cut(document: str) -> str:
        offsets = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return document if len(offsets) <= limit else document[:offsets[limit - 1][1]]

    return await serving.on_tokenizer(lambda: [cut(document) for document in documents],
                                      sum(map(len, documents)) <= TOKENIZE_INLINE_CHARS)


async def _pairs_job(serving: OpenAIServing, req: PairsRequest, record: RequestRecord,
                     arrival: float, kind: str, pairs: list[tuple[str, str]],
                     sides: tuple[str, str]) -> tuple[Job, PairScores]:
    """A Job that scores `pairs`, and how its outputs become their scores; `sides`: the fields
    the pairs' first and second texts came from (errors name them)."""
    cross_encoder = serving.client.info.labels is not None
    if cross_encoder:
        # A 1:N request's one text is in every pair's prompt: a 3 MB text sent with 1,024
        # documents would have 3 GB tokenized. The prompts may hold no more than a request may send.
        joined = sum(len(first) + len(second) for first, second in pairs)
        if joined > serving.config.max_body_bytes:
            raise errors.invalid(f"a cross-encoder reads each pair as one prompt, the two texts joined: these pairs' "
                                 f"prompts would hold {joined} characters, more than the {serving.config.max_body_bytes} "
                                 f"a request may send (--max-body-bytes); send a shorter {sides[0]} or fewer pairs",
                                 param=sides[0])
        serving.check_prompt_count(len(pairs), sides[1], "pairs (prompts of a cross-encoder)")
        if serving.tokenizer is None:
            raise errors.invalid("this model has no tokenizer to read pairs of texts with", param=sides[0])
        joins = serving.client.info.joins_pairs
        # vLLM's score template: --chat-template, where given (a model's own chat template is
        # for its chats, and rerankers inherit ones that are not theirs)
        template = serving.tokenizer.chat_template if serving.config.chat_template is not None else None
        # A template costs a render a pair, however short: many of them render off the event loop.
        inline = joined <= TOKENIZE_INLINE_CHARS and (template is None or len(pairs) <= RENDER_INLINE_MESSAGES)
        try:
            encoded = await serving.on_tokenizer(
                lambda: [cross_encoder_prompt(serving.tokenizer, first, second, joins, template,
                                              req.chat_template_kwargs)[1] for first, second in pairs], inline)
        except TemplateError as exc:  # the score template's own message, e.g. a role it refuses
            raise errors.invalid(f"score template (--chat-template) error: {exc}", param=sides[0]) from None
        texts: list[str | list[int]] = list(encoded)
        pair_prompts = [(i, i) for i in range(len(pairs))]
        prompt_params = [sides[1]] * len(texts)  # a pair's own text is its second (1:N)
        pooling: dict[str, Any] = {"task": "score", "use_activation": req.use_activation}
    else:
        if req.use_activation is not None:
            raise errors.invalid("use_activation applies to a cross-encoder's score; this model scores a pair by "
                                 "its embeddings' cosine similarity", param="use_activation")
        prompt_of: dict[str, int] = {}  # each distinct text embedded once
        prompt_params = []
        for side, param in zip(zip(*pairs), sides):
            for text in side:
                if text not in prompt_of:
                    prompt_of[text] = len(prompt_of)
                    prompt_params.append(param)
        texts = list(prompt_of)
        pair_prompts = [(prompt_of[first], prompt_of[second]) for first, second in pairs]
        pooling = {"dimensions": None, "normalize": None}  # the model's own, as LLM.score's
        serving.check_prompt_count(len(texts), sides[1], "distinct texts (each embedded once)")
    prompts, prompt_texts = await serving.prompt_ids(req, texts, True, sides[1])
    job = serving.new_job(kind, record, arrival, prompts, prompt_texts, {"pooling": pooling})
    return job, PairScores(pair_prompts, cross_encoder, prompt_params)


class PairScores:
    """A scoring job's pairs: which prompts each pair's score comes from, and how."""

    def __init__(self, pair_prompts: list[tuple[int, int]], cross_encoder: bool, prompt_params: list[str]) -> None:
        self.pair_prompts = pair_prompts  # a cross-encoder's pair: (its prompt, again); else its texts'
        self.cross_encoder = cross_encoder
        self.prompt_params = prompt_params  # the field each prompt came from

    def renamed(self, exc: APIError, prompt_index: int | None = None) -> APIError:
        """The engine's refusal of a prompt, naming the field it came from (the pairs' second
        where it is not known: the worker refuses a request's prompts together)."""
        if exc.param == "prompt":
            exc.param = self.prompt_params[-1 if prompt_index is None else prompt_index]
        return exc

    def scores(self, job: Job) -> list[float]:
        """Each pair's score: the cross-encoder's, or its embeddings' cosine similarity."""
        values = [unpack_embedding(packed) for packed in packed_values(job)]
        if self.cross_encoder:
            return [values[i][0] for i, _ in self.pair_prompts]
        return [cosine_similarity(values[i], values[j]) for i, j in self.pair_prompts]

    def render(self, serving: OpenAIServing, job: Job, body: Any) -> Any:
        """`body(scores)`, its cosine similarities computed off the event loop where the
        embeddings are many (as a large embeddings body is rendered)."""
        floats = 0 if self.cross_encoder else sum(len(packed) for packed in packed_values(job)) * 3 // 16
        return render_off_loop(serving, lambda: body(self.scores(job)), floats)


class ScoreRenderer:
    """A /score response: each pair's score, in pair order, with the usage."""

    def __init__(self, pairs: PairScores) -> None:
        self.pairs = pairs
        self.renamed = pairs.renamed

    def body(self, serving: OpenAIServing, job: Job, choices: list[Choice], usage: dict[str, Any]) -> Any:
        def body(scores: list[float]) -> dict[str, Any]:
            return {"id": job.request_id, "object": "list", "created": job.created, "model": job.model,
                    "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                    "usage": usage}

        return self.pairs.render(serving, job, body)


class RerankRenderer:
    """A /rerank response: the documents by score, best first (the top_n best where top_n > 0),
    each with its text unless return_documents is false."""

    def __init__(self, pairs: PairScores, documents: list[str], top_n: int, return_documents: bool) -> None:
        self.pairs = pairs
        self.renamed = pairs.renamed
        self.documents = documents
        self.top_n = top_n
        self.return_documents = return_documents

    def body(self, serving: OpenAIServing, job: Job, choices: list[Choice], usage: dict[str, Any]) -> Any:
        def body(scores: list[float]) -> dict[str, Any]:
            ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties in document order
            if self.top_n > 0:
                ranked = ranked[:self.top_n]
            results = []
            for i in ranked:
                result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
                if self.return_documents:
                    result["document"] = {"text": self.documents[i]}
                results.append(result)
            return {"id": job.request_id, "model": job.model, "results": results,
                    "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]}}

        return self.pairs.render(serving, job, body)


class ClassificationRenderer(PromptField):
    """A /classify response: each input's probabilities (one per label), the most probable
    label's name, in input order."""

    def __init__(self, labels: list[str], field: str = "input") -> None:
        super().__init__(field)
        self.labels = labels

    def body(self, serving: OpenAIServing, job: Job, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        data = []
        for i, packed in enumerate(packed_values(job)):
            probs = unpack_embedding(packed)
            best = max(range(len(probs)), key=probs.__getitem__)  # the first of equals, as numpy's argmax
            data.append({"index": i, "label": self.labels[best], "probs": probs, "num_classes": len(probs)})
        return {"id": job.request_id, "object": "list", "created": job.created, "model": job.model, "data": data,
                "usage": usage}
