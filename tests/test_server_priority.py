"""`--scheduling-policy priority` on a real server (embedded default model, one seat) driven by
the `openai` SDK: a request's `priority` reaches the scheduler, an urgent request takes the seat
of a running one, and the preempted request still gets the answer it would have alone."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.server_harness import ServerProcess, idle, wait_for

PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--kv-cache-memory-bytes", "160MiB", "--cpu-threads", "1", "--max-num-seqs", "1",
                       "--scheduling-policy", "priority") as s:
        yield s


def test_an_urgent_request_takes_the_seat_of_a_running_one(server):
    low = {"model": None, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
           "extra_body": {"ignore_eos": True, "priority": 10}}
    before = server.metrics()

    async def main() -> tuple[str, float, str, float]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        try:
            stream = await aclient.completions.create(stream=True, **low)
            chunks = stream.__aiter__()
            first = await chunks.__anext__()  # the low request holds the only seat
            urgent = await aclient.completions.create(model=None, prompt="Hi", max_tokens=3, temperature=0,
                                                      extra_body={"priority": -1})
            urgent_done = time.monotonic()
            texts = [first.choices[0].text] + [chunk.choices[0].text async for chunk in chunks]
            return urgent.choices[0].text, urgent_done, "".join(texts), time.monotonic()
        finally:
            await aclient.close()

    urgent_text, urgent_done, low_text, low_done = asyncio.run(main())
    assert urgent_text and urgent_done < low_done
    after = server.metrics()
    assert after["stoke_preemptions_total"] - before["stoke_preemptions_total"] == 1
    # recomputed after the preemption, the same greedy answer as alone
    alone = server.client().completions.create(**low)
    assert low_text == alone.choices[0].text and alone.usage.completion_tokens == 40
    assert wait_for(lambda: idle(server), 30), server.metrics()
    lines = server.log_lines()[-3:]
    assert [line["priority"] for line in lines] == [-1, 10, 10] and all(line["status"] == 200 for line in lines)
