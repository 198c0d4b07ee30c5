"""What the HTTP process spends on each streamed token, by what it streams: the server's own
stream code (server/serving.py, server/responses.py) fed one engine frame per token, no engine
and no network. A chat's content, a reasoning model's thinking (`--reasoning-parser`) with and
without the tool call parser reading the answer, and the Responses API's typed events, in the
same run, alternated each round (medians). The HTTP process serves every stream on one core, so
its microseconds per token bound the tokens/s all streams together can get.

    python -m benchmarks.stream_rendering --tokens 2000 --out results/stream_rendering.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import write_json

WORDS = [" the", " answer", " is", " seven", ",", " because", " three", " plus", " four", "."]
CASES = ("chat content", "chat reasoning", "chat reasoning + tool parser", "responses content",
         "responses reasoning")


class Frames:
    """An engine's output frames, one token each, as a stream that keeps up gets them."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    async def batches(self) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
        last = len(self.texts) - 1
        for i, text in enumerate(self.texts):
            yield [(0, {"id": "e-0", "finished": i == last, "num_prompt_tokens": 3, "num_cached_tokens": 0,
                        "outputs": [{"index": 0, "text": text, "token_ids": [100 + i % 50], "logprobs": None,
                                     "num_tokens": i + 1, "finish_reason": "stop" if i == last else None,
                                     "stop_reason": None}]})]


def answer(case: str, tokens: int) -> list[str]:
    """The case's answer, one text per token: thinking (its tags one token each) for half of
    it where the case reasons, then content."""
    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    if "reasoning" not in case:
        return words
    half = tokens // 2
    return ["<think>", *words[:half - 2], "</think>", *words[half:]]


def serving_for(case: str, tokenizer: Any) -> Any:
    from server.config import ServerConfig
    from server.metrics import Metrics
    from server.request_log import RequestLogger
    from server.serving import OpenAIServing

    engine_args = {"reasoning_parser": "qwen3"} if "reasoning" in case else {}
    return OpenAIServing(ServerConfig(engine_args=engine_args), tokenizer, client=None,
                         metrics=Metrics(gpu=False), request_logger=RequestLogger(log_text=False), model_name="m")


async def stream_once(case: str, serving: Any, texts: list[str]) -> float:
    """Seconds to stream the answer through the case's stream code."""
    from engine.reasoning import FIRST
    from server.protocol import ResponsesRequest
    from server.request_log import RequestRecord
    from server.responses import ResponsesRenderer
    from server.serving import Job

    job = Job(kind="chat", request_id="resp-1", model="m", created=0, arrival=time.monotonic(), prompts=[[1, 2, 3]],
              prompt_texts=["p"], params={"temperature": 0.0}, n=1, stream=True, include_usage=True, echo=False,
              logprobs=None, record=RequestRecord("resp-1", "bench"))
    if "reasoning" in case:
        job.reasoning_opening = FIRST
    if "tool parser" in case:
        job.tool_parser = "hermes"
    if case.startswith("responses"):
        job.renderer = ResponsesRenderer(ResponsesRequest(input="x"))
        lines = job.renderer.stream(serving, job, Frames(texts))
    else:
        lines = serving._stream(job, Frames(texts))
    t0 = time.perf_counter()
    async for _ in lines:
        pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000, help="tokens per stream (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="results/stream_rendering.json")
    args = p.parse_args(argv)
    if args.tokens < 8 or args.rounds < 1:
        p.error("--tokens must be >= 8 and --rounds >= 1")
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.add_tokens(["<think>", "</think>"])  # as a reasoning model's vocabulary has them
    servings = {case: serving_for(case, tokenizer) for case in CASES}
    texts = {case: answer(case, args.tokens) for case in CASES}
    runs: dict[str, list[float]] = {case: [] for case in CASES}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for case in CASES:
            seconds = asyncio.run(stream_once(case, servings[case], texts[case]))
            if round_:
                runs[case].append(seconds / len(texts[case]) * 1e6)
    base = statistics.median(runs[CASES[0]])
    results = [{"case": case, "us_per_token": statistics.median(runs[case]),
                "vs_chat_content": statistics.median(runs[case]) / base, "runs_us_per_token": runs[case]}
               for case in CASES]
    print(f"HTTP process, one streamed token ({args.tokens} tokens a stream, {args.rounds} rounds, medians):")
    print(f"{'case':<30} {'us/token':>9} {'vs chat':>8}")
    for r in results:
        print(f"{r['case']:<30} {r['us_per_token']:>9.2f} {r['vs_chat_content']:>7.2f}x")
    report = {"args": vars(args), "results": results}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
