"""`stoke serve`: parse options, set up logging, run uvicorn with stoke's shutdown rules.

- SIGTERM / Ctrl-C: /ready turns 503 and new requests get 503 at once, uvicorn stops
  accepting connections, in-flight requests get up to --drain-timeout seconds to finish (then
  they are aborted), the worker is stopped, and the process exits 0. A second Ctrl-C forces it.
- The worker dies: in-flight requests fail with 503, /health answers 503 for
  --worker-death-grace seconds, then the process exits 1 so a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Generator
from typing import Any

import uvicorn

from scheduler import SCHEDULING_POLICIES
from server.config import ServerConfig
from server.limits import COST_CAP_PERIODS, limits_from_config
from server.tool_parsers import TOOL_CALL_PARSERS

logger = logging.getLogger("stoke.server")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 10 ** 9, "gb": 10 ** 9, "gib": 2 ** 30, "t": 10 ** 12, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_size(text: str) -> int:
    """'268435456', '256MiB', '2GiB', '512MB' → bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 268435456, 256MiB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def speculative_config(text: str) -> dict[str, Any]:
    """A --speculative-config value, checked before the worker starts (a JSON object of vLLM's keys)."""
    from engine.speculative import SpeculativeConfig  # the engine's imports (torch), only when asked

    try:
        return SpeculativeConfig.from_value(text).to_dict()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def json_object(text: str) -> dict[str, Any]:
    """A --pooler-config or --hf-overrides value: a JSON object (its keys are checked against the
    model, once it is known, by `main`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'a JSON object, e.g. \'{{"pooling_type": "MEAN"}}\', got {text!r}')
    return value


def lora_module(text: str) -> tuple[str, str]:
    """A --lora-modules value: name=path, or vLLM's JSON {"name": ..., "path": ...}."""
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("path"), str):
            raise argparse.ArgumentTypeError(f'a JSON LoRA module is {{"name": ..., "path": ...}}, got {text!r}')
        name, path = raw["name"], raw["path"]
    else:
        name, _, path = text.partition("=")
    name, path = name.strip(), os.path.expanduser(path)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"a LoRA module is NAME=PATH, got {text!r}")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise argparse.ArgumentTypeError(f"{path!r} is not a PEFT LoRA adapter directory (no adapter_config.json)")
    return name, path


def api_key(text: str) -> str:
    """An --api-key value: an empty one (`--api-key "$KEY"` with KEY unset) must not start a
    server that takes requests without a key."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an API key must not be empty")
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stoke serve", description="OpenAI-compatible HTTP server (FastAPI + uvicorn) "
                                "in front of an engine worker process")
    p.add_argument("model", nargs="?", default=None,
                   help="HF checkpoint dir, or a llama.cpp GGUF file (converted once into the cache) "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: every "
                                                        "interface)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the dir name)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY", type=api_key,
                   help="require 'Authorization: Bearer <key>'; repeated for several keys, each a client with "
                        "limits of its own (env STOKE_API_KEY, several separated by commas; default: none, no key)")
    p.add_argument("--log-request-text", action="store_true",
                   help="put prompt and output text in the per-request log line")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default: %(default)s)")
    p.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="a browser origin whose pages may call the API (CORS), e.g. https://chat.example.com, "
                        "repeated for several; '*' for any (default: none, same-origin pages only)")
    p.add_argument("--chat-template", default=None,
                   help="the chat template for /v1/chat/completions instead of the tokenizer's: a Jinja file, or "
                        "the template itself; for a cross-encoder, the score template /score and /rerank render "
                        "each pair with, from its query and document messages (as vLLM's)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request bring its own chat template (vLLM's chat_template field; a template runs "
                        "sandboxed, but may take any time: for trusted clients)")
    p.add_argument("--max-stored-responses", type=int, default=0, metavar="N",
                   help="keep the last N Responses API responses (store: true) in memory, each for its own API "
                        "key, for previous_response_id and GET/DELETE /v1/responses/{id} (default: 0, none)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="read tool calls in chat answers (tool_choice 'auto', the default with tools); needs "
                        "--tool-call-parser")
    p.add_argument("--tool-call-parser", default=None, choices=list(TOOL_CALL_PARSERS),
                   help="how tool calls look in the model's text: hermes (<tool_call> JSON </tool_call>: Qwen2.5, "
                        "Qwen3, SmolLM3, Hermes), llama3_json (Llama 3.1+), mistral ([TOOL_CALLS]: Mistral, "
                        "Mixtral, Ministral), pythonic ([f(x=1), ...]: Llama 3.2 and 4, Gemma 3, with a template "
                        "that asks for it) or qwen3_coder (<tool_call><function=...>: Qwen3-Coder)")
    p.add_argument("--reasoning-parser", default=None,
                   help="split a reasoning model's chat answers into reasoning (<think>...</think>) and content, "
                        "and hold structured outputs to their schema only once the reasoning ended: deepseek_r1 "
                        "(DeepSeek-R1 and its distills, QwQ) or qwen3 (Qwen3)")
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA, fp32 on the CPU), float32, float16 or bfloat16")
    e.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    e.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights from the config alone (benchmarks)")
    e.add_argument("--seed", type=int, default=0,
                   help="seeds the sampling of requests without a seed of their own, and dummy weights "
                        "(default: %(default)s)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default: %(default)s)")
    e.add_argument("--kv-cache-memory-bytes", type=parse_size, default=None, help="the CPU's KV pool, e.g. 512MiB (default: 2GiB)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: the fraction of the GPU's memory this server may use, its KV cache sized to fill "
                        "it (default: %(default)s)")
    e.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="the longest sequence served (default: the model's max_position_embeddings, stretched "
                        "by a yarn or dynamic rope scaling's factor; LongRoPE takes its long factors past its "
                        "pretraining length)")
    e.add_argument("--max-num-seqs", type=int, default=256, help="requests in the running batch (default: %(default)s)")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens an engine step computes at most (default: %(default)s)")
    e.add_argument("--max-num-partial-prefills", type=int, default=2,
                   help="prompts whose prefill a step may advance at once (default: %(default)s)")
    e.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="the most prompt tokens of one request per step (0: max-num-batched-tokens / 2); lower bounds the "
                        "steps that running requests wait through (inter-token latency), at some TTFT")
    e.add_argument("--scheduling-policy", default="fcfs", choices=list(SCHEDULING_POLICIES),
                   help="fcfs: requests run in arrival order; priority: by each request's `priority` (lower first, "
                        "then arrival), a waiting request preempting running ones of lower priority "
                        "(default: %(default)s)")
    e.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads in the worker (default: torch's choice; 1 is best on a busy shared CPU)")
    e.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="compute every prompt in full (no prefix cache)")
    e.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                   help="a model with sliding-window layers keeps every KV block of its sequences in every layer, "
                        "instead of giving a sliding layer's blocks before its window back to the pool")
    e.add_argument("--quantization", "-q", default=None,
                   help="fp8: hold the projections' weights in fp8 e4m3 with a scale per row, quantized at load "
                        "(half of bf16's memory); an fp8 checkpoint (quant_method fp8 or compressed-tensors' "
                        "float8) is served in fp8 without it (default: as the checkpoint is)")
    e.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="fp8 (= fp8_e4m3): store K/V in fp8 e4m3, scaled by the checkpoint's per-layer k_scale / "
                        "v_scale (else 1.0): twice bf16's blocks in the same memory (default: the model's dtype)")
    e.add_argument("--kv-offloading-size", type=float, default=0.0, metavar="GIB",
                   help="GiB of host memory for a second tier of the prefix cache: blocks the KV pool evicts are "
                        "saved there, and loaded back on a hit instead of computed again (default: none)")
    e.add_argument("--kv-offloading-backend", default="native", choices=["native"],
                   help="the offloader (vLLM's option; stoke has its own)")
    e.add_argument("--cuda-graph-mode", default="full", choices=["full", "decode"],
                   help="CUDA: replay graphs for pure-decode steps and steps with prefills (full), or the first only "
                        "(default: %(default)s)")
    e.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare and launch each step before the previous step's tokens reach the host "
                        "(default: on for CUDA, off for the CPU)")
    e.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help='speculative decoding by prompt lookup, as vLLM\'s: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (while drafts '
                        'are proposed, steps run without async scheduling; default: off)')
    e.add_argument("--pooler-config", type=json_object, default=None, metavar="JSON",
                   help='how /v1/embeddings pools the model\'s hidden states, as vLLM\'s: \'{"pooling_type": "MEAN", '
                        '"normalize": true}\' (LAST, MEAN or CLS; "matryoshka_dimensions": [...] or true lets requests '
                        'ask for fewer dimensions) over what the checkpoint says (sentence-transformers modules; '
                        'default: the last token, normalised)')
    e.add_argument("--hf-overrides", type=json_object, default=None, metavar="JSON",
                   help="keys set over the checkpoint's config.json, as vLLM's; e.g. a causal LM served as an LLM "
                        'reranker (Qwen3-Reranker): \'{"architectures": ["Qwen3ForSequenceClassification"], '
                        '"classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": true}\'')
    e.add_argument("--generation-config", default="auto",
                   help="where requests' default temperature, top_p, top_k, min_p, repetition_penalty and "
                        "max_tokens come from: auto (the model's generation_config.json), none (OpenAI's "
                        "defaults), or a directory with a generation_config.json")
    e.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters: requests name one as their model (see --lora-modules)")
    e.add_argument("--lora-modules", nargs="+", action="extend", type=lora_module, default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters (PEFT checkpoint directories) clients may send as the model, as NAME=PATH or "
                        'vLLM\'s JSON \'{"name": ..., "path": ...}\'; needs --enable-lora')
    e.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve vLLM's POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter "
                        "{lora_name} (any client with a key may then load any adapter directory the server can "
                        "read); needs --enable-lora")
    e.add_argument("--max-loras", type=int, default=1,
                   help="LoRA adapters running at once (their requests batch together; others wait) "
                        "(default: %(default)s)")
    e.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank (default: %(default)s)")
    e.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory while no request uses them (default: as many as "
                        "--lora-modules names, at least --max-loras)")
    limits = p.add_argument_group("limits")
    d = ServerConfig()
    limits.add_argument("--max-n", type=int, default=d.max_n, help="choices (n) a request may ask for (default: "
                                                                   "%(default)s)")
    limits.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help="prompts one completions request may list (each runs n choices), or inputs one "
                             "embeddings request may (default: %(default)s)")
    limits.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                        help="the largest max_tokens (default: none, the context bounds it)")
    limits.add_argument("--max-stop", type=int, default=d.max_stop, help="stop strings, and stop token ids, per request "
                                                                         "(default: %(default)s)")
    limits.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                        help="logprobs / top_logprobs per token (default: %(default)s)")
    limits.add_argument("--max-body-bytes", type=parse_size, default=d.max_body_bytes,
                        help="the largest request body, e.g. 4MiB; beyond it: 413 (default: %(default)s bytes)")
    limits.add_argument("--max-pending-requests", type=int, default=d.max_pending_requests,
                        help="API requests in flight; beyond them: 503 (default: %(default)s)")
    limits.add_argument("--request-timeout", type=float, default=d.request_timeout,
                        help="seconds from a request's arrival; then 504 (or an error event, streaming) "
                             "(default: none)")
    limits.add_argument("--rate-limit-requests", type=int, default=d.rate_limit_requests, metavar="PER_MINUTE",
                        help="requests a minute per API key (every client together without keys); beyond: 429 "
                             "with Retry-After (default: none)")
    limits.add_argument("--rate-limit-tokens", type=int, default=d.rate_limit_tokens, metavar="PER_MINUTE",
                        help="tokens a minute per API key: a request's prompts + n x max_tokens for each, held "
                             "when it starts, settled to the tokens it used (default: none)")
    limits.add_argument("--price-prompt", type=float, default=d.price_prompt, metavar="PRICE",
                        help="per million prompt tokens (not from the prefix cache): the cost in each request's "
                             "log line and stoke_cost_total, in any currency (default: %(default)s)")
    limits.add_argument("--price-cached-prompt", type=float, default=d.price_cached_prompt, metavar="PRICE",
                        help="per million prompt tokens from the prefix cache (default: --price-prompt's)")
    limits.add_argument("--price-completion", type=float, default=d.price_completion, metavar="PRICE",
                        help="per million generated tokens (default: %(default)s)")
    limits.add_argument("--cost-cap", type=float, default=d.cost_cap, metavar="AMOUNT",
                        help="the most an API key may spend per --cost-cap-period at these prices: a request "
                             "that might take it past is refused, 429 insufficient_quota (default: none)")
    limits.add_argument("--cost-cap-period", default=d.cost_cap_period, choices=COST_CAP_PERIODS,
                        help="the cost cap's period, UTC (default: %(default)s)")
    limits.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                        help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    limits.add_argument("--worker-death-grace", type=float, default=d.worker_death_grace,
                        help="seconds /health answers 503 after the worker died, before the server exits "
                             "(default: %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine_args: dict[str, Any] = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "load_format": args.load_format,
        "seed": args.seed, "block_size": args.block_size, "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
        "gpu_memory_utilization": args.gpu_memory_utilization, "num_kv_blocks": args.num_kv_blocks,
        "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "enable_prefix_caching": args.enable_prefix_caching,
        "disable_hybrid_kv_cache_manager": args.disable_hybrid_kv_cache_manager,
        "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype, "kv_offloading_size": args.kv_offloading_size, "kv_offloading_backend": args.kv_offloading_backend,
        "max_num_partial_prefills": args.max_num_partial_prefills,
        "long_prefill_token_threshold": args.long_prefill_token_threshold,
        "scheduling_policy": args.scheduling_policy,
        "cuda_graph_mode": args.cuda_graph_mode, "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling, "generation_config": args.generation_config,
        "speculative_config": args.speculative_config, "reasoning_parser": args.reasoning_parser,
        "pooler_config": args.pooler_config, "hf_overrides": args.hf_overrides,
        "enable_lora": args.enable_lora, "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank,
        # The served adapters stay in memory by default: one read from disk would stall every step.
        "max_cpu_loras": args.max_cpu_loras if args.max_cpu_loras is not None
        else max(args.max_loras, len(args.lora_modules or [])) if args.enable_lora else None,
    }
    return ServerConfig(
        engine_args=engine_args, host=args.host, port=args.port, served_model_name=args.served_model_name,
        api_keys=args.api_key or [k.strip() for k in os.environ.get("STOKE_API_KEY", "").split(",") if k.strip()],
        log_request_text=args.log_request_text,
        max_n=args.max_n, max_prompts=args.max_prompts, max_tokens_limit=args.max_tokens_limit, max_stop=args.max_stop,
        max_logprobs=args.max_logprobs, max_body_bytes=args.max_body_bytes,
        max_pending_requests=args.max_pending_requests, request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout, worker_death_grace=args.worker_death_grace, log_level=args.log_level,
        rate_limit_requests=args.rate_limit_requests, rate_limit_tokens=args.rate_limit_tokens,
        price_prompt=args.price_prompt, price_cached_prompt=args.price_cached_prompt,
        price_completion=args.price_completion, cost_cap=args.cost_cap, cost_cap_period=args.cost_cap_period,
        cpu_threads=args.cpu_threads, chat_template=args.chat_template, allowed_origins=args.allowed_origins,
        trust_request_chat_template=args.trust_request_chat_template,
        max_stored_responses=args.max_stored_responses,
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
        short_tool_call_ids=args.tool_call_parser == "mistral",
        lora_modules=list(args.lora_modules or []), allow_runtime_lora_updating=args.allow_runtime_lora_updating,
    )


def setup_logging(level: str) -> None:
    """Server logs to stderr; the per-request JSON lines (stoke.requests) alone to stdout."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    requests_logger = logging.getLogger("stoke.requests")
    requests_logger.setLevel(logging.INFO)
    requests_logger.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    requests_logger.handlers[:] = [out]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:  # as vLLM
        parser.error("--enable-auto-tool-choice needs --tool-call-parser")
    if args.max_stored_responses < 0:
        parser.error("--max-stored-responses must be >= 0")
    if args.lora_modules and not args.enable_lora:  # as vLLM
        parser.error("--lora-modules needs --enable-lora")
    if args.allow_runtime_lora_updating and not args.enable_lora:
        parser.error("--allow-runtime-lora-updating needs --enable-lora")
    names = [name for name, _ in args.lora_modules or []]
    if len(set(names)) < len(names):
        parser.error(f"--lora-modules names an adapter twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    config = config_from_args(args)
    setup_logging(config.log_level)

    from engine.config import EngineConfig, generation_defaults
    from server.api import create_app

    try:
        EngineConfig(**config.engine_args).check()  # fail fast on a bad option, before anything starts
    except (TypeError, ValueError) as exc:
        logger.error("bad engine option: %s", exc)
        return 2
    try:
        limits_from_config(config)
    except ValueError as exc:
        logger.error("bad limit option: %s", exc)
        return 2
    from engine.default_model import model_dir

    model_path = config.engine_args.get("model")
    if model_path is not None and model_path.endswith(".gguf") and os.path.isfile(model_path):
        try:  # the worker loads the conversion; clients name the file, as they would its directory
            config.engine_args["model"] = model_dir(model_path)
        except Exception as exc:  # whatever a corrupt file makes the reader raise: not served
            logger.error("cannot serve %s: %s", model_path, exc)
            return 2
        config.served_model_name = config.served_model_name or os.path.basename(model_path)
    elif model_path is not None and not os.path.isfile(os.path.join(model_path, "config.json")):
        logger.error("%s is not a Hugging Face checkpoint directory (no config.json) nor a GGUF file", model_path)
        return 2
    model_path = model_dir(config.engine_args.get("model"))
    try:
        generation_defaults(config.engine_args["generation_config"], model_path)
    except (OSError, ValueError) as exc:
        logger.error("bad --generation-config: %s", exc)
        return 2
    from engine.config import ModelConfig
    from engine.fp8 import resolve_scheme
    from engine.pooling import PoolerConfig

    try:  # what the worker would refuse: an architecture the overrides name, a classifier's keys
        model_config = ModelConfig.from_dir(model_path, config.engine_args["hf_overrides"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.error("bad --hf-overrides (or the checkpoint's config.json): %s", exc)
        return 2
    try:
        resolve_scheme(model_config.quantization, config.engine_args["quantization"])
    except ValueError as exc:
        logger.error("bad --quantization: %s", exc)
        return 2
    try:  # the checkpoint's own (sentence-transformers modules) too: the worker would refuse it
        PoolerConfig.for_model(model_path, config.engine_args["pooler_config"], config.engine_args["hf_overrides"])
    except (OSError, ValueError, TypeError) as exc:
        logger.error("bad --pooler-config (or the checkpoint's pooling): %s", exc)
        return 2
    if config.lora_modules:
        error = check_lora_modules(config, model_path)
        if error:
            logger.error("bad --lora-modules: %s", error)
            return 2
    tokenizer = load_tokenizer(model_path)
    if model_config.classifier_from_token is not None:
        from engine.scoring import classifier_token_ids

        try:
            classifier_token_ids(tokenizer, model_config.classifier_from_token)
        except ValueError as exc:
            logger.error("bad --hf-overrides: %s", exc)
            return 2
    if config.chat_template is not None:
        try:
            if tokenizer is None:
                raise ValueError("the model has no tokenizer to render it with")
            tokenizer.chat_template = load_chat_template(config.chat_template)
        except (OSError, ValueError) as exc:
            logger.error("bad --chat-template: %s", exc)
            return 2
    if config.engine_args["reasoning_parser"] is not None:
        from engine.reasoning import Reasoning

        try:
            Reasoning.for_tokenizer(config.engine_args["reasoning_parser"], tokenizer)
        except ValueError as exc:
            logger.error("bad --reasoning-parser: %s", exc)
            return 2

    state = {"worker_died": False}
    server: StokeServer | None = None

    def on_worker_death() -> None:
        state["worker_died"] = True
        if server is not None:
            asyncio.get_running_loop().call_later(config.worker_death_grace, server.stop)

    app = create_app(config, tokenizer=tokenizer, model_path=model_path, on_worker_death=on_worker_death)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                               timeout_graceful_shutdown=config.drain_timeout + 5.0, lifespan="on",
                               log_level=config.log_level.lower())
    server = StokeServer(uv_config, app)
    server.run()
    if state["worker_died"]:
        logger.error("exiting with status 1: the engine worker died")
        return 1
    return 0


def check_lora_modules(config: ServerConfig, model_path: str) -> str | None:
    """What is wrong with the --lora-modules for this model, read as the worker will read them
    (before anything starts); None: nothing."""
    from engine.config import EngineConfig, ModelConfig
    from engine.lora import LoRARequest, load_adapter

    served = config.served_model_name or ServerConfig.model_name(model_path)
    model_config = ModelConfig.from_dir(model_path, config.engine_args["hf_overrides"])
    engine_config = EngineConfig(**config.engine_args)
    dtype = engine_config.resolve_dtype(engine_config.resolve_device())  # an fp16 overflow shows in fp16 only
    for lora_id, (name, path) in enumerate(config.lora_modules, 1):
        if name == served:
            return f"{name!r} is the base model's name"
        try:
            load_adapter(LoRARequest(name, lora_id, path), model_config, engine_config.max_lora_rank, dtype)
        except ValueError as exc:
            return f"{name}: {exc}"
    return None


def load_chat_template(value: str) -> str:
    """`--chat-template`: the template itself if it looks like one (as vLLM tells them apart:
    Jinja's braces or a line break), else the file it names; checked for Jinja syntax."""
    if any(c in value for c in "{}\n"):
        template = value
    else:
        try:
            with open(value, encoding="utf-8") as f:
                template = f.read()
        except OSError as exc:
            raise ValueError(f"{value!r} looks like a path, but cannot be read: {exc.strerror}") from None
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # the environment transformers renders chat templates in
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from None
    return template


def load_tokenizer(path: str) -> Any:
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        logger.warning("no tokenizer in %s: only token-id prompts will work", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class StokeServer(uvicorn.Server):
    """uvicorn.Server with stoke's shutdown rules."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        serving = self.app.state.serving
        if not serving.draining:
            timeout = serving.config.drain_timeout
            logger.info("received %s: no new requests; draining in-flight ones (up to %ss)",
                        signal.Signals(sig).name, timeout)
            serving.draining = True
            # A signal handler may not touch the loop's timers directly; this hop is safe.
            self.loop.call_soon_threadsafe(self.loop.call_later, timeout, serving.cut_off)
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after its shutdown (exit status -15); for stoke a
        # drained shutdown is a clean exit, so this only swaps the handlers in and out.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
