"""OpenAI's embeddings (`POST /v1/embeddings`), as vLLM serves them: each input one engine
request (engine/pooling.py) whose one output is its vector, run as a completion's prompts are
(server/serving.py: the same checks, limits, timeout, aborts and log line; no tokens are
generated, so no completion tokens are reserved, charged or counted).

The worker packs each vector as little-endian float32 in base64 (server/ipc.py), which is what
the `base64` encoding_format sends: the openai SDK asks for it unless told otherwise and
decodes it itself, so that costs the HTTP process nothing. `float` sends JSON numbers, the
float32 values exactly (a float's shortest repr); a body of many of them is rendered off the
event loop, a vector at a time, as a long chat is (JSON numbers cost ~0.6 µs each).

Score, rerank and classify (server/scoring.py) are pooling requests too, run the same way with
the helpers here: their packed values read back in prompt order (`packed_values`), a large body
built off the event loop (`render_off_loop`), a refused prompt named by its field (`PromptField`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response

from engine.pooling import PoolerConfig, PoolingParams
from server import errors
from server.errors import APIError
from server.ipc import unpack_embedding
from server.protocol import EmbeddingRequest
from server.request_log import RequestRecord
from server.serving import Choice, Job, OpenAIServing, _dumps

# A float body of more numbers than this (~5 ms of JSON) is rendered on the tokenizer thread.
RENDER_INLINE_FLOATS = 8192

T = TypeVar("T")


def packed_values(job: Job) -> list[str]:
    """Every prompt's packed values (server/ipc.py), in prompt order, once the job finished."""
    values = [job.embeddings.get(i) for i in range(len(job.prompts))]
    if any(v is None for v in values):  # every prompt's output came, none aborted: never
        raise RuntimeError(f"{job.request_id}: a pooling output is missing from a finished request")
    return values


def render_off_loop(serving: OpenAIServing, render: Callable[[], T], numbers: int) -> T | Awaitable[T]:
    """`render()` now, or, for a body of more than RENDER_INLINE_FLOATS numbers, an awaitable of
    it run on the tokenizer thread (the event loop gets the GIL back between its pieces)."""
    if numbers <= RENDER_INLINE_FLOATS:
        return render()
    return asyncio.get_running_loop().run_in_executor(serving._tokenizer_thread, render)


async def embedding_job(serving: OpenAIServing, req: EmbeddingRequest, record: RequestRecord,
                        arrival: float) -> Job:
    """A Job for an embeddings request: one prompt per input, every one checked before any is
    queued; its params are the worker's pooling params."""
    record.priority = req.priority or 0  # logged, refused or not
    record.model = serving.check_model(req.model)
    serving.check_pooling_task("embed")
    params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize)  # their types are the body's
    info = serving.client.info
    pooler = PoolerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info.pooler.items()})
    try:  # the engine's own rules, before the request takes from its client's limits
        pooler.check_dimensions(params.dimensions, info.hidden_size)
    except ValueError as exc:
        raise errors.invalid(str(exc), param="dimensions") from None
    raw, add_special_tokens, field = await serving.pooling_prompts(req)
    prompts, texts = await serving.prompt_ids(req, raw, add_special_tokens, field)
    pooling = {"dimensions": params.dimensions, "normalize": params.normalize}
    job = serving.new_job("embedding", record, arrival, prompts, texts, {"pooling": pooling})
    job.renderer = EmbeddingRenderer(req.encoding_format or "float", field)
    return job


class PromptField:
    """A renderer's naming of the engine's refusals: the field its prompts came from (`input`,
    `messages`), where the engine says `prompt`."""

    def __init__(self, field: str) -> None:
        self.field = field

    def renamed(self, exc: APIError, prompt_index: int | None = None) -> APIError:
        if exc.param == "prompt":
            exc.param = self.field
        return exc


class EmbeddingRenderer(PromptField):
    """An embeddings request's response: OpenAI's list of vectors, in input order."""

    def __init__(self, encoding_format: str, field: str = "input") -> None:
        super().__init__(field)
        self.encoding_format = encoding_format

    def body(self, serving: OpenAIServing, job: Job, choices: list[Choice], usage: dict[str, Any]) -> Any:
        """The response (JSON text, built here: the vectors are the bulk of it); an awaitable
        of it where its floats are many."""
        vectors = packed_values(job)
        head = _dumps({"id": job.request_id, "object": "list", "created": job.created, "model": job.model})
        tail = _dumps({"usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]}})

        def render() -> Response:
            items = ",".join(f'{{"object":"embedding","index":{i},"embedding":{self._vector(v)}}}'
                             for i, v in enumerate(vectors))
            return Response(f'{head[:-1]},"data":[{items}],{tail[1:]}', media_type="application/json")

        if self.encoding_format == "base64":
            return render()
        # json.dumps holds the GIL for one vector's numbers at a time (~2.5 ms for 4,096), and the
        # event loop gets it back between vectors
        return render_off_loop(serving, render, sum(len(v) for v in vectors) * 3 // 16)  # base64: 4 digits per 3 bytes

    def _vector(self, packed: str) -> str:
        """One vector's JSON: its packed bytes as they came (base64), or its floats."""
        return f'"{packed}"' if self.encoding_format == "base64" else _dumps(unpack_embedding(packed))
