"""Host time of Sampler.sample with every penalty, rows keyed (kept across steps), prompts of
real text (the repo's docs, tokenized by the default model). Run from the repo root, with PYTHONPATH=.:
`python docs/measurements/cpu-2026-12-01b/penalties_text.py ROWS PROMPT_TOKENS`.
"""
import sys, time, statistics, torch, random
from transformers import AutoTokenizer
from engine.default_model import default_model_path
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
torch.set_num_threads(1)
t = AutoTokenizer.from_pretrained(default_model_path())
text = open("README.md").read() + open("docs/architecture.md").read() + open("docs/metrics.md").read()
ids = t.encode(text)
rows_n, plen = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
params = SamplingParams(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.5)
seqs = []
for i in range(rows_n):
    s = rng.randrange(0, len(ids) - plen) if len(ids) > plen else 0
    seqs.append((ids * 2)[s:s + plen])
V = 49152
s = Sampler()
logits = torch.randn(rows_n, V)
times = []
for step in range(60):
    rows = [SamplingRow(params, seqs[i], plen, None, [], key=i) for i in range(rows_n)]
    t0 = time.perf_counter()
    out = s.sample(logits, rows)
    # host part only up to the device work start is hard to split on CPU; time the whole call
    toks = out.output().token_ids
    times.append(time.perf_counter() - t0)
    for i, tok in enumerate(toks): seqs[i].append(tok)
print(f"rows {rows_n} prompt {plen}: median {statistics.median(times[10:])*1e3:.2f} ms per step (whole sample call, CPU)")
