"""A checkpoint whose greedy answer to any chat is a given text: what lets server tests see a
model make tool calls (no small real model does so reliably).

One Llama layer that does nothing (zero attention and MLP outputs), with the embedded default's
tokenizer (plus `added_tokens`, as Qwen's tokenizer has `<tool_call>`): the answer is spelled
as tokens that are all different (a text's own tokenization repeats some, e.g. `"`), and each
token's embedding is a one-hot row that the LM head maps to the next token of the answer, the
last to EOS. The chat template's last token (the assistant header's newline) starts it. The
weights are fp32 and tiny.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file


def _spelled(text: str, pieces: dict[str, list[int]], banned: set[int]) -> list[int]:
    """Token ids, no two alike and none banned, whose texts joined are `text` (depth-first,
    longest pieces first)."""
    longest = max(map(len, pieces))

    def spell(at: int, used: set[int]) -> list[int] | None:
        if at == len(text):
            return []
        for end in range(min(len(text), at + longest), at, -1):
            for token in pieces.get(text[at:end], ()):
                if token in used or token in banned:
                    continue
                rest = spell(end, used | {token})
                if rest is not None:
                    return [token, *rest]
        return None

    tokens = spell(0, set())
    if tokens is None:
        raise ValueError(f"no spelling of {text!r} in distinct tokens")
    return tokens


def scripted_checkpoint(path: str, answer: str, added_tokens: tuple[str, ...] = (), special: bool = False) -> str:
    """Write the checkpoint to `path`; its greedy chat answer is `answer`. `special`: the
    added tokens are special ones (skip_special_tokens drops them from text)."""
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    reserved = set(tokenizer.all_special_ids)  # BOS, EOS ...: never part of the answer
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added_tokens)})
    else:
        tokenizer.add_tokens(list(added_tokens))
    added = {token: tokenizer.convert_tokens_to_ids(token) for token in added_tokens}
    pieces: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        if token_id not in reserved and token_id not in added.values():
            pieces.setdefault(tokenizer.decode([token_id]), []).append(token_id)
    header = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
    start = tokenizer.encode(header, add_special_tokens=False)[-1]
    chain: list[int] = []  # the added tokens where the answer has them, the text between spelled
    for part in re.split("(" + "|".join(map(re.escape, added)) + ")", answer) if added else [answer]:
        chain += [added[part]] if part in added else _spelled(part, pieces, banned={start, *chain}) if part else []
    if len(set(chain)) < len(chain):
        raise ValueError(f"an added token comes twice in {answer!r}")
    eos = tokenizer.eos_token_id
    inputs, outputs = [start, *chain], [*chain, eos]
    hidden = 16 * -(-len(inputs) // 16)
    vocab = len(tokenizer)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": hidden // 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    embed, head = torch.zeros(vocab, hidden), torch.zeros(vocab, hidden)
    for j, (token_in, token_out) in enumerate(zip(inputs, outputs)):
        embed[token_in, j] = 1.0
        head[token_out, j] = 100.0
    zeros = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
             "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
             "mlp.gate_proj": (16, hidden), "mlp.up_proj": (16, hidden), "mlp.down_proj": (hidden, 16)}
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": torch.ones(hidden),
               "model.layers.0.input_layernorm.weight": torch.ones(hidden),
               "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden)}
    weights |= {f"model.layers.0.{name}.weight": torch.zeros(shape) for name, shape in zeros.items()}
    os.makedirs(path, exist_ok=True)
    save_file(weights, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.save_pretrained(path)
    return path


def scripted_tokens(path: str, after: int, eos: int, limit: int = 256) -> list[int]:
    """The checkpoint's greedy tokens after token `after` up to EOS, read off its weights (each
    token's one-hot embedding, through the LM head, to the next): what it answers a prompt
    that ends with `after`."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "model.safetensors"))
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    ids: list[int] = []
    while (after := int((head @ embed[after]).argmax())) != eos and len(ids) < limit:
        ids.append(after)
    return ids
