"""Host time of Sampler.sample with every penalty, rows keyed (kept across steps), prompts of
real text (the repo's docs, tokenized by the default model). Run from the repo root, with
PYTHONPATH=.: `python docs/measurements/cpu-2026-12-01b/penalties_text.py ROWS PROMPT_TOKENS`.
"""

import random
import statistics
import sys
import time

import torch
from transformers import AutoTokenizer

from engine.default_model import default_model_path
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams

torch.set_num_threads(1)
tokenizer = AutoTokenizer.from_pretrained(default_model_path())
text = "".join(open(p).read() for p in ("README.md", "docs/architecture.md", "docs/metrics.md"))
ids = tokenizer.encode(text) * 2
rows, prompt_tokens = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
params = SamplingParams(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.5)
sequences = []
for _ in range(rows):
    start = rng.randrange(0, max(1, len(ids) - prompt_tokens))
    sequences.append(ids[start:start + prompt_tokens])
sampler = Sampler()
logits = torch.randn(rows, 49152)
times = []
for step in range(60):
    batch = [SamplingRow(params, sequences[i], prompt_tokens, None, [], key=i) for i in range(rows)]
    t = time.perf_counter()
    tokens = sampler.sample(logits, batch).output().token_ids  # on the CPU, its "device" work too
    times.append(time.perf_counter() - t)
    for sequence, token in zip(sequences, tokens):
        sequence.append(token)
print(f"rows {rows} prompt {prompt_tokens}: median {statistics.median(times[10:]) * 1e3:.2f} ms a step "
      "(the whole sample call, CPU)")
