"""µs to build one streamed chat chunk whose token carries 20 top logprobs: the objects
encoded (`_chat_logprobs`, what bodies use) against the JSON text (`_chat_logprobs_json`,
what streams use), on the default model's tokenizer; the two lines are checked equal first.

    python docs/measurements/cpu-2026-12-01c/chat_logprobs.py
"""

from __future__ import annotations

import os
import random
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from transformers import AutoTokenizer  # noqa: E402

from engine.default_model import default_model_path  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.ipc import pack_logprobs, unpack_logprobs  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.request_log import RequestLogger, RequestRecord  # noqa: E402
from server.serving import _PLACEHOLDER, Job, OpenAIServing, _with_logprobs, sse  # noqa: E402

serving = OpenAIServing(ServerConfig(), AutoTokenizer.from_pretrained(default_model_path()), client=None,
                        metrics=Metrics(), request_logger=RequestLogger(log_text=False), model_name="m")
job = Job("chat", "chatcmpl-1", "m", 0, 0.0, [[1]], ["p"], {}, 1, True, False, False, 20, RequestRecord("c", "chat"))
rng = random.Random(0)
tokens = []
for _ in range(64):  # (chosen id, its entries as they come off the pipe)
    ids = rng.sample(range(1000, 40000), 21)
    values = sorted((-rng.random() * 10 for _ in ids), reverse=True)
    tokens.append((ids[0], unpack_logprobs(pack_logprobs([dict(zip(ids, values))]))))


def objects(tid: int, entries: list) -> str:
    return sse(serving._chat_chunk(job, 0, {"content": "x"}, serving._chat_logprobs(job, [tid], entries), None))


def text(tid: int, entries: list) -> str:
    line = sse(serving._chat_chunk(job, 0, {"content": "x"}, _PLACEHOLDER, None))
    return _with_logprobs(line, serving._chat_logprobs_json(job, [tid], entries))


assert all(objects(*t) == text(*t) for t in tokens)
for build in (objects, text):
    best = min(timeit.repeat(lambda: [build(*t) for t in tokens], number=50, repeat=5))
    print(f"{build.__name__:8} {best / (50 * len(tokens)) * 1e6:5.1f} us a chunk")
