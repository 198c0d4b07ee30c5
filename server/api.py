"""The FastAPI app: OpenAI routes, health/readiness, metrics, error shape, body-size cap.

`create_app(config)` builds everything the HTTP process needs; its lifespan starts the worker
(server/engine_client.py) and stops it after uvicorn has drained in-flight requests.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import errors
from server.config import ServerConfig
from server.embeddings import embedding_job
from server.engine_client import EngineClient
from server.errors import APIError
from server.heap import freeze_startup_heap
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from server.request_log import RequestLogger, RequestRecord, key_id
from server.responses import ResponseStore, response_owner, responses_job
from server.scoring import classify_job, rerank_job, score_job
from server.serving import Job, OpenAIServing

logger = logging.getLogger("stoke.server")

try:
    _VERSION = importlib.metadata.version("stoke")
except importlib.metadata.PackageNotFoundError:  # run from the tree (gpu-check: PYTHONPATH=.)
    _VERSION = "unknown"

# An API route's request id prefix and its log line's endpoint (vLLM's ids for score, rerank, classify).
_ENDPOINTS = {"/v1/completions": ("cmpl", "completions"), "/v1/chat/completions": ("chatcmpl", "chat.completions"),
              "/v1/responses": ("resp", "responses"), "/v1/embeddings": ("embd", "embeddings"),
              "/score": ("score", "score"), "/v1/score": ("score", "score"),
              "/rerank": ("rerank", "rerank"), "/v1/rerank": ("rerank", "rerank"), "/v2/rerank": ("rerank", "rerank"),
              "/classify": ("classify", "classify")}


def bearer_token(request: Request) -> str | None:
    """The key a request sends ("Authorization: Bearer <key>"), None without one."""
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return token or None


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class APIKeyMiddleware:
    """401 for a request without one of the server's keys, before its body is read or parsed
    (parsing a 4 MiB body of 135k chat messages held the event loop ~0.6 s for a client without
    a key). Open without one: the probes and metrics, and CORS preflights."""

    OPEN_PATHS = frozenset({"/health", "/ready", "/version", "/metrics"})

    def __init__(self, app: ASGIApp, keys: list[str], on_refused: Callable[[Request, APIError], None]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.on_refused = on_refused  # counts it, and logs its line

    def authorized(self, request: Request) -> bool:
        sent = (bearer_token(request) or "").encode()
        # compare_digest, against every key: how long the check takes says nothing of how much
        # of a key matched, or which one
        return bool(sent) and any([hmac.compare_digest(sent, key) for key in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.authorized(request):
            return await self.app(scope, receive, send)
        error = errors.unauthorized()
        self.on_refused(request, error)
        await error_response(error)(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over the cap, before any of it is parsed (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refused: Callable[[Request, APIError], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused  # counts it, and logs its line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = False
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                too_large = False
        chunks: list[bytes] = []
        if not too_large:
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":  # gone before its whole body came
                    self.on_refused(Request(scope), APIError(499, "the client disconnected", code="client_closed",
                                                             metric="aborted"))
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    too_large = True
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
        if too_large:
            error = errors.too_large(self.max_bytes)
            self.on_refused(Request(scope), error)
            response = error_response(error)
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(config: ServerConfig, *, tokenizer: Any = None, model_path: str | None = None,
               on_worker_death: Callable[[], None] | None = None) -> FastAPI:
    """model_path: the resolved checkpoint dir (for the tokenizer and the model name)."""
    metrics = Metrics(lora_adapters=[name for name, _ in config.lora_modules])
    request_logger = RequestLogger(config.log_request_text)
    engine_args = dict(config.engine_args)
    if model_path is not None:
        engine_args["model"] = model_path
    model_name = config.served_model_name or ServerConfig.model_name(model_path or str(engine_args.get("model")))

    def died() -> None:
        logger.error("the engine worker is gone: /health now answers 503")
        metrics.on_engine_gone()
        if on_worker_death is not None:
            on_worker_death()

    client = EngineClient(engine_args, on_death=died, on_frame=metrics.on_frame, log_level=config.log_level,
                          cpu_threads=config.cpu_threads, lora_modules=config.lora_modules)
    serving = OpenAIServing(config, tokenizer, client, metrics, request_logger, model_name)
    # The Responses API's stored responses (server/responses.py), with --max-stored-responses
    responses_store = ResponseStore(config.max_stored_responses) if config.max_stored_responses > 0 else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        # This process's start-up objects (FastAPI, pydantic, the tokenizer, torch's modules:
        # ~370 k) live as long as it does; a full collection over them stalls every stream for
        # ~150 ms. Only these are frozen: per-connection objects are cyclic (transport <->
        # protocol) and must stay collectable.
        logger.info("HTTP process: %d start-up objects frozen out of the cyclic collector's reach",
                    freeze_startup_heap())
        try:
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="stoke", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.metrics = metrics
    app.state.client = client
    app.state.serving = serving
    def new_record(request: Request, body: Any = None) -> RequestRecord:
        path = request.scope["path"]  # not request.url: that parses a whole URL per request
        prefix, endpoint = _ENDPOINTS.get(path, ("req", path))
        record = RequestRecord(client.new_request_id(prefix), endpoint)
        record.key_id = key_id(bearer_token(request))
        if body is not None:
            record.model = getattr(body, "model", None)
            record.user = getattr(body, "user", None)
        return record

    def refused(request: Request, error: APIError) -> None:
        """A request refused before its handler ran: counted, and on an API route logged (a
        scanner's 401s on paths stoke does not serve are neither)."""
        path = request.scope["path"]
        if path in _ENDPOINTS:
            serving.fail(new_record(request), error)
        elif path in ("/tokenize", "/detokenize", "/v1/load_lora_adapter", "/v1/unload_lora_adapter") \
                or path == "/v1/models" or path.startswith("/v1/models/"):
            metrics.on_error(error.metric)

    def utility_error(error: APIError) -> JSONResponse:
        """The models, tokenize and detokenize routes' errors: counted, no log line (no model call)."""
        metrics.on_error(error.metric)
        return error_response(error)

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, on_refused=refused)
    if config.api_keys:  # outside the body limit: a client without a key gets its 401 first
        app.add_middleware(APIKeyMiddleware, keys=config.api_keys, on_refused=refused)
    if config.allowed_origins:  # outermost: preflights answered, and errors carry the headers too
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"])

    def check_access() -> None:
        """The server can take the request (its key was checked before its body was read)."""
        if serving.draining:
            raise errors.unavailable("the server is shutting down", code="shutting_down")
        if client.dead:
            raise errors.engine_dead()

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = errors.from_validation_errors(list(exc.errors()))
        refused(request, error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read the body: bad UTF-8, an int too long
            error = APIError(400, "the request body is not valid JSON (or not UTF-8, or a number too long "
                                  "for it)", code="invalid_json")
            refused(request, error)
            return error_response(error)
        if exc.status_code == 404:
            error = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed")
        else:
            error = APIError(exc.status_code, "request failed", code="http_error")
        return error_response(error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        metrics.on_error("internal")
        return error_response(errors.internal())

    async def handle(request: Request, body: Any, make_job: Callable[..., Awaitable[Job]]) -> Response:
        arrival = time.monotonic()
        record = new_record(request, body)
        try:
            check_access()
            await serving.wait_ready()
            job = await make_job(body, record, arrival)
            return await serving.run(job, request)
        except APIError as exc:
            serving.fail(record, exc)
            return error_response(exc)
        except asyncio.CancelledError:
            serving.cancelled(record)
            raise
        except Exception:
            logger.exception("request %s failed", record.request_id)
            error = errors.internal()
            serving.fail(record, error)
            return error_response(error)

    # ------------------------------------------------------------------ routes
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await handle(request, body, serving.completion_job)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await handle(request, body, serving.chat_job)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await handle(request, body, partial(responses_job, serving, responses_store))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await handle(request, body, partial(embedding_job, serving))

    # vLLM's pooling APIs beyond embeddings (server/scoring.py), at vLLM's paths
    @app.post("/score")
    @app.post("/v1/score")
    async def score(body: ScoreRequest, request: Request) -> Response:
        return await handle(request, body, partial(score_job, serving))

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(body: RerankRequest, request: Request) -> Response:
        return await handle(request, body, partial(rerank_job, serving))

    @app.post("/classify")
    async def classify(body: ClassificationRequest, request: Request) -> Response:
        return await handle(request, body, partial(classify_job, serving))

    # A stored response (--max-stored-responses) is its client's alone: as OpenAI's, a 404 for
    # any other client, or once it is gone.
    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> Response:
        owner = response_owner(config, key_id(bearer_token(request)))
        stored = responses_store.get(response_id, owner) if responses_store is not None else None
        return JSONResponse(stored.body) if stored is not None else utility_error(errors.response_not_found(response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request) -> Response:
        owner = response_owner(config, key_id(bearer_token(request)))
        if responses_store is not None and responses_store.delete(response_id, owner):
            return JSONResponse({"id": response_id, "object": "response", "deleted": True})
        return utility_error(errors.response_not_found(response_id))

    def model_card(name: str = model_name) -> dict[str, Any]:
        """The base model's card, or (as vLLM's) a LoRA adapter's: its directory as root, the
        base model as parent."""
        info = client.info
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "stoke",
                "root": info.model_path if info else model_path, "parent": None,
                "max_model_len": info.max_model_len if info else None}
        if name in serving.loras:
            card.update(root=serving.loras[name][2], parent=model_name)
        return card

    # The model list answers while the model loads or the server drains.
    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card(), *map(model_card, serving.loras)]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        try:
            name = serving.check_model(model)
        except APIError as exc:
            return utility_error(exc)
        return JSONResponse(model_card(name))

    async def utility(work: Callable[[], Awaitable[Any]], response: type[Response] = JSONResponse) -> Response:
        """A utility route's answer (tokenize, detokenize, LoRA updates) once the engine is ready."""
        try:
            check_access()
            await serving.wait_ready()
            return response(await work())
        except APIError as exc:
            return utility_error(exc)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        return await utility(lambda: serving.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        async def work() -> dict[str, Any]:
            return serving.detokenize(body)
        return await utility(work)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        return await utility(lambda: serving.load_lora_adapter(body.lora_name, body.lora_path), PlainTextResponse)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        return await utility(lambda: serving.unload_lora_adapter(body.lora_name), PlainTextResponse)

    @app.get("/health")
    async def health() -> Response:
        if client.dead:
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if client.dead:
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        if serving.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not client.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": _VERSION})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
