"""What structured outputs cost: the token masks alone, and the engine's tokens/s with and
without them on the same prompts, in the same run.

1. Masks: for a JSON-schema grammar over the model's vocabulary, and for an EBNF grammar of
   the same records, the time of a mask computed cold (a fresh TokenMasks: the walk) and
   cached (a lookup and an unpack), over the states a real answer passes through, and of a
   Guide's advance per token.
2. Engine: `--prompts` chat prompts asking for a JSON record, greedy, `--max-tokens` each,
   run free, held to a JSON schema, to any JSON object, and to the EBNF grammar (`--rounds`
   rounds, the kinds alternated; medians). Reported: output tokens/s and the host's sampling
   time per token.

    python -m benchmarks.structured --out results/structured.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import write_json
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.structured_outputs import StructuredOutputsParams
from engine.token_bytes import vocabulary_bytes
from engine.token_masks import Guide, TokenMasks, TokenVocabulary

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                         "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}}
ANSWER = '{\n  "name": "Ann Lee",\n  "age": 31,\n  "city": "Paris",\n  "hobbies": ["chess", "tennis"]\n}'
PEOPLE = ["Ann", "Bob", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
# SCHEMA's records as an EBNF grammar (GBNF), whitespace bounded as the JSON grammar bounds it.
RECORD_GBNF = r'''
root    ::= "{" ws "\"name\"" ws ":" ws string ws "," ws "\"age\"" ws ":" ws integer ws "," ws
            "\"city\"" ws ":" ws string ws "," ws "\"hobbies\"" ws ":" ws hobbies ws "}"
hobbies ::= "[" ws ( string ws ( "," ws string ws ){0,3} )? "]"
string  ::= "\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
integer ::= "-"? ( "0" | [1-9] [0-9]* )
ws      ::= [ \t\n]{0,16}
'''
KINDS = ("free", "json_schema", "json_object", "grammar")
STRUCTURES = {"json_schema": dict(json=SCHEMA), "json_object": dict(json_object=True), "grammar": dict(grammar=RECORD_GBNF)}


def _ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 4)


def mask_costs(llm: LLM, kind: str) -> dict[str, Any]:
    """Cold and cached mask times over the states ANSWER's tokens pass through, under the
    structure of `kind`."""
    engine = llm.engine
    t0 = time.perf_counter()
    vocabulary = TokenVocabulary(vocabulary_bytes(engine.tokenizer, engine.model_config.vocab_size))
    build = time.perf_counter() - t0
    grammar = StructuredOutputsParams(**STRUCTURES[kind]).compile()
    tokens = engine.tokenizer.encode(ANSWER, add_special_tokens=False)
    cold, warm, advance = [], [], []
    masks = TokenMasks(vocabulary)
    for times in (cold, warm):  # the second pass finds every mask cached
        guide = Guide(grammar, masks, engine.eos_token_ids)
        for token in tokens:
            t0 = time.perf_counter()
            guide.mask()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert guide.advance(token), f"the grammar refused token {token} of its own example"
            advance.append(time.perf_counter() - t0)
    return {"vocabulary": vocabulary.size, "vocabulary_build_ms": round(build * 1e3, 1), "states": len(tokens),
            "cold_mask_ms": _ms(cold), "cold_mask_max_ms": round(max(cold) * 1e3, 3), "cached_mask_ms": _ms(warm),
            "advance_ms": _ms(advance)}


def engine_run(llm: LLM, kind: str, prompts: int, max_tokens: int) -> dict[str, Any]:
    structure = StructuredOutputsParams(**STRUCTURES[kind]) if kind in STRUCTURES else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=structure)
    conversations = [[{"role": "user", "content": f"Describe {PEOPLE[i % len(PEOPLE)]}, a person, as JSON with "
                                                   "name, age, city and hobbies."}] for i in range(prompts)]
    stats = llm.engine.stats
    sample_before = stats.sample_seconds
    t0 = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "sample_ms_per_token": (stats.sample_seconds - sample_before) / tokens * 1e3,
            "stopped": sum(o.outputs[0].finish_reason == "stop" for o in outs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint (default: the embedded default model)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/structured.json")
    args = p.parse_args(argv)
    if min(args.prompts, args.max_tokens, args.rounds, args.threads) < 1:
        p.error("--prompts, --max-tokens, --rounds and --threads must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    llm = LLM(args.model)
    masks = {kind: mask_costs(llm, kind) for kind in ("json_schema", "grammar")}
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            runs[kind].append(engine_run(llm, kind, args.prompts, args.max_tokens))
    engine = {kind: {"tok_s": statistics.median(r["tok_s"] for r in rs),
                     "sample_ms_per_token": statistics.median(r["sample_ms_per_token"] for r in rs),
                     "tokens": rs[0]["tokens"], "stopped": rs[0]["stopped"], "runs": rs}
              for kind, rs in runs.items()}
    report = {"args": vars(args), "masks": masks, "engine": engine}
    for kind, m in masks.items():
        print(f"{kind} masks over a {m['vocabulary']}-token vocabulary ({m['states']} states of one answer): "
              f"cold {m['cold_mask_ms']} ms (max {m['cold_mask_max_ms']}), cached {m['cached_mask_ms']} ms, "
              f"advance {m['advance_ms']} ms; vocabulary read in {m['vocabulary_build_ms']} ms")
    print(f"{'kind':<12} {'tok/s':>8} {'vs free':>8} {'sample ms/tok':>14} {'tokens':>7} {'stopped':>8}")
    for kind, e in engine.items():
        print(f"{kind:<12} {e['tok_s']:>8.1f} {e['tok_s'] / engine['free']['tok_s']:>7.2f}x "
              f"{e['sample_ms_per_token']:>14.3f} {e['tokens']:>7} {e['stopped']:>5}/{args.prompts}")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
