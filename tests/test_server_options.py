"""`stoke serve` options that change what requests get, on a real server (embedded default
model) driven by the `openai` SDK: `--chat-template` and `--generation-config`."""

from __future__ import annotations

import json

import openai
import pytest

from server.launch import load_chat_template
from tests.server_harness import ServerProcess

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("options")
    (root / "chat.jinja").write_text(TEMPLATE)
    (root / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    s = ServerProcess("--kv-cache-memory-bytes", "64MiB", "--cpu-threads", "1",
                      "--chat-template", str(root / "chat.jinja"), "--generation-config", str(root)).start()
    yield s
    s.stop()
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_chat_template_option_renders_chats(server, client):
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = AutoTokenizer.from_pretrained(default_model_path()).encode(
        "<system> Be brief.\n<user> Hi\n<assistant>", add_special_tokens=False)
    root = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)  # vLLM's /tokenize is not under /v1
    tokenized = root.post("/tokenize", body={"messages": messages}, cast_to=object)
    assert tokenized["tokens"] == expected
    chat = client.chat.completions.create(model=None, messages=messages, max_tokens=2)
    assert chat.usage.prompt_tokens == len(expected)


def test_generation_config_option_sets_what_requests_leave_unset(client):
    unset = [client.completions.create(model=None, prompt="1, 2, 3,", extra_body={"ignore_eos": True})
             for _ in range(2)]
    assert [u.usage.completion_tokens for u in unset] == [3, 3]  # max_new_tokens
    assert unset[0].choices[0].text == unset[1].choices[0].text  # temperature 0
    greedy = client.completions.create(model=None, prompt="1, 2, 3,", max_tokens=5, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert greedy.usage.completion_tokens == 5 and greedy.choices[0].text.startswith(unset[0].choices[0].text)


def test_chat_template_values(tmp_path):
    assert load_chat_template(TEMPLATE) == TEMPLATE  # braces: the template itself
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert load_chat_template(str(tmp_path / "t.jinja")) == TEMPLATE
    with pytest.raises(ValueError, match="looks like a path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_chat_template("{% for m in messages %}{{ m }}")
