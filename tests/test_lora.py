"""LoRA adapters (vLLM's multi-LoRA serving, engine/lora.py).

LoRARequest's checks and the engine's LoRA limits; PEFT checkpoints read as PEFT reads them
(scaling by alpha/r, rsLoRA, alpha_pattern, rank_pattern, safetensors and .bin) and refused with
a message naming what stoke does not serve; the scheduler's rule (at most max_loras adapters
among the running requests, the others passed over, the base model never held up by them); and
end to end: greedy tokens and logprobs equal to transformers' with the adapter applied, for
several adapters and the base model in one batch, with fewer device slots than adapters, on the
other attention backends and through the CUDA-graph replay path; the prefix cache kept apart per
adapter; the host registry (LRU, adapters in use kept, ids re-used); bad input that leaves the
engine as it was; and LoRA beside n > 1, speculative decoding, async scheduling and prompt
logprobs.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernels
from engine import LLM, EngineConfig, LoRARequest, ModelConfig, SamplingParams
from engine.lora import LoRARegistry, load_adapter
from scheduler import Request, RequestStatus, ScheduledBatch, Scheduler, SchedulerConfig
from tests.conftest import assert_engine_idle
from tests.lora_adapters import apply_adapter, hf_lora_greedy, save_adapter

# Imported for its eager stand-in of a captured CUDA graph; importing it sets TRITON_INTERPRET
# when there is no CUDA (before any Triton kernel module is imported), as its own tests need.
from tests.test_runner_gpu_path import CUDA, with_eager_graphs

MAX_TOKENS = 8
GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 13, 40, 77], [1, 100, 200, 300], [1, *range(20, 41)]]  # the last one: past a block
# The adapters saved for each tiny model: name → save_adapter's arguments. Different ranks,
# module subsets, scalings, layers and file formats.
ADAPTERS = {
    "all": dict(rank=8, seed=1),
    "qv": dict(rank=4, modules=["q_proj", "v_proj"], seed=2, alpha=8.0, use_rslora=True),
    "mlp": dict(rank=2, modules=["gate_proj", "up_proj", "down_proj"], seed=3, alpha=4.0),
    "mixed": dict(rank=4, modules=["q_proj", "k_proj", "o_proj", "down_proj"], layers=[1], seed=4,
                  rank_pattern={"k_proj": 2, "down_proj": 6}, alpha_pattern={"o_proj": 2.0}, fmt="bin"),
}
IDS = {name: i for i, name in enumerate(ADAPTERS, start=1)}


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_idle(llm: LLM) -> None:
    """assert_engine_idle, and no adapter held by a request."""
    assert_engine_idle(llm)
    assert not llm.engine.loras.users, f"adapters still held: {dict(llm.engine.loras.users)}"


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """kind → adapter name → its directory."""
    root = tmp_path_factory.mktemp("lora")
    return {kind: {name: save_adapter(str(root / kind / name), tiny_checkpoints[kind], **spec)
                   for name, spec in ADAPTERS.items()}
            for kind in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="module")
def requests_for(adapters: dict[str, dict[str, str]]) -> Callable[[str, str | None], LoRARequest | None]:
    def lora(kind: str, name: str | None) -> LoRARequest | None:
        return None if name is None else LoRARequest(name, IDS[name], adapters[kind][name])
    return lora


@pytest.fixture(scope="module")
def hf() -> Callable[..., list[list[int]]]:
    """hf_lora_greedy, each answer computed once for the module."""
    cache: dict[tuple, list[list[int]]] = {}

    def reference(base_dir: str, adapter_dir: str | None, prompts: list[list[int]],
                  max_new_tokens: int = MAX_TOKENS) -> list[list[int]]:
        key = (base_dir, adapter_dir, tuple(map(tuple, prompts)), max_new_tokens)
        if key not in cache:
            cache[key] = hf_lora_greedy(base_dir, adapter_dir, prompts, max_new_tokens)
        return cache[key]
    return reference


def lora_llm(path: str, **kwargs) -> LLM:
    args = dict(enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=64) | kwargs
    return LLM(path, **args)


@dataclass
class Step:
    running: list[tuple[str, int]]  # (request id, lora id) of the running requests after scheduling
    waiting: list[tuple[str, int]]
    drafted: list[int]  # lora ids of the requests whose drafts the step verifies

    @property
    def adapters(self) -> set[int]:
        return {lora for _, lora in self.running if lora}


def record_steps(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[Step]:
    """Wrap the scheduler: what each step's schedule left running and waiting, and its batch."""
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule
    steps: list[Step] = []

    def spy():
        batch = schedule()
        steps.append(Step(running=[(r.request_id, r.lora_id) for r in scheduler.running],
                          waiting=[(r.request_id, r.lora_id) for r in scheduler.waiting],
                          drafted=[r.lora_id for r in batch.spec_token_ids]))
        return batch

    monkeypatch.setattr(scheduler, "schedule", spy)
    return steps


# =============================================================================================
# 1. LoRARequest, and the engine's LoRA limits


@pytest.mark.parametrize("fields, names", [
    (("", 1, "/a"), "lora_name"),
    ((None, 1, "/a"), "lora_name"),
    (("a", 0, "/a"), "lora_int_id"),
    (("a", -3, "/a"), "lora_int_id"),
    (("a", True, "/a"), "lora_int_id"),
    (("a", 1.0, "/a"), "lora_int_id"),
    (("a", "1", "/a"), "lora_int_id"),
    (("a", 1, ""), "lora_path"),
    (("a", 1, None), "lora_path"),
], ids=["name-empty", "name-none", "id-0", "id-negative", "id-bool", "id-float", "id-str", "path-empty", "path-none"])
def test_lora_request_rejects_bad_fields(fields: tuple, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        LoRARequest(*fields)


def test_lora_request_fields_and_equality() -> None:
    r = LoRARequest("sql", 3, "/adapters/sql")
    assert (r.lora_name, r.lora_int_id, r.lora_path) == ("sql", 3, "/adapters/sql")
    assert r == LoRARequest("sql", 3, "/adapters/sql") and hash(r) == hash(LoRARequest("sql", 3, "/adapters/sql"))
    assert r != LoRARequest("sql", 3, "/adapters/other")


@pytest.mark.parametrize("limits, names", [
    (dict(max_loras=0), "max_loras"),
    (dict(max_loras=-1), "max_loras"),
    (dict(max_loras=True), "max_loras"),
    (dict(max_loras=1.5), "max_loras"),
    (dict(max_lora_rank=0), "max_lora_rank"),
    (dict(max_loras=2, max_cpu_loras=1), "max_cpu_loras"),
    (dict(max_cpu_loras=0), "max_cpu_loras"),
], ids=["loras-0", "loras-negative", "loras-bool", "loras-float", "rank-0", "cpu-below-loras", "cpu-0"])
def test_engine_refuses_bad_lora_limits(tiny_checkpoints: dict[str, str], limits: dict, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        EngineConfig(enable_lora=True, **limits).check()
    with pytest.raises(ValueError, match=names):
        LLM(tiny_checkpoints["llama"], enable_lora=True, num_kv_blocks=16, **limits)


def test_engine_lora_limits_defaults(tiny_checkpoints: dict[str, str]) -> None:
    assert EngineConfig(enable_lora=True, max_loras=3).resolve_max_cpu_loras() == 3  # None: max_loras
    assert EngineConfig(enable_lora=True, max_loras=3, max_cpu_loras=5).resolve_max_cpu_loras() == 5
    llm = LLM(tiny_checkpoints["llama"], enable_lora=True, max_loras=3, max_lora_rank=4, num_kv_blocks=16)
    assert (llm.engine.scheduler.config.max_loras, llm.engine.loras.max_cpu_loras,
            llm.engine.loras.max_lora_rank) == (3, 3, 4)
    plain = LLM(tiny_checkpoints["llama"], num_kv_blocks=16)
    assert plain.engine.loras is None and plain.engine.scheduler.config.max_loras == 0
    assert plain.engine.list_loras() == set() and plain.engine.remove_lora(1) is False


# =============================================================================================
# 2. Reading PEFT checkpoints


def file_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.exists(path):
        return load_file(path)
    return torch.load(os.path.join(adapter_dir, "adapter_model.bin"), weights_only=True)


def file_pair(tensors: dict[str, torch.Tensor], layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    name = f"base_model.model.model.layers.{layer}.{parent}.{module}"
    return tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_adapter_scales_b_by_alpha_over_rank(tiny_checkpoints: dict[str, str], tmp_path, fmt: str) -> None:
    base = tiny_checkpoints["llama"]
    config = ModelConfig.from_dir(base)
    path = save_adapter(str(tmp_path / fmt), base, rank=4, alpha=12.0, seed=5, fmt=fmt)
    assert os.listdir(path) and any(f.endswith(fmt) for f in os.listdir(path))
    adapter = load_adapter(LoRARequest("a", 1, path), config, max_rank=8)
    tensors = file_tensors(path)
    assert adapter.rank == 4 and adapter.request == LoRARequest("a", 1, path)
    assert set(adapter.weights) == {(layer, m) for layer in range(2) for m in
                                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    for (layer, module), (a, sb) in adapter.weights.items():
        fa, fb = file_pair(tensors, layer, module)
        assert a.dtype == sb.dtype == torch.float32
        torch.testing.assert_close(a, fa, rtol=0, atol=0)
        torch.testing.assert_close(sb, fb * (12.0 / 4), rtol=1e-6, atol=1e-6)


def test_load_adapter_rslora_alpha_pattern_and_rank_pattern(tiny_checkpoints: dict[str, str], tmp_path) -> None:
    base = tiny_checkpoints["llama"]
    config = ModelConfig.from_dir(base)
    # rsLoRA: alpha / sqrt(r)
    path = save_adapter(str(tmp_path / "rs"), base, rank=4, alpha=6.0, modules=["q_proj", "down_proj"],
                        use_rslora=True, seed=6)
    tensors = file_tensors(path)
    adapter = load_adapter(LoRARequest("rs", 1, path), config, max_rank=4)
    assert set(adapter.weights) == {(0, "q_proj"), (0, "down_proj"), (1, "q_proj"), (1, "down_proj")}
    for (layer, module), (a, sb) in adapter.weights.items():
        fa, fb = file_pair(tensors, layer, module)
        torch.testing.assert_close(a, fa)
        torch.testing.assert_close(sb, fb * (6.0 / math.sqrt(4)), rtol=1e-6, atol=1e-6)
    # rank_pattern: other ranks for the modules it names; alpha_pattern: another alpha for the
    # modules it names (a suffix of the dotted name: one layer's down_proj only).
    path = save_adapter(str(tmp_path / "patterns"), base, rank=4, alpha=8.0, seed=7,
                        modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                        rank_pattern={"k_proj": 2, "down_proj": 6},
                        alpha_pattern={"o_proj": 2.0, "layers.0.mlp.down_proj": 30.0})
    tensors = file_tensors(path)
    adapter = load_adapter(LoRARequest("p", 2, path), config, max_rank=6)
    assert adapter.rank == 6
    ranks = {"q_proj": 4, "k_proj": 2, "o_proj": 4, "down_proj": 6}
    for (layer, module), (a, sb) in adapter.weights.items():
        fa, fb = file_pair(tensors, layer, module)
        r = ranks[module]
        assert a.shape[0] == sb.shape[1] == r, (layer, module, a.shape, sb.shape)
        alpha = 2.0 if module == "o_proj" else 30.0 if (layer, module) == (0, "down_proj") else 8.0
        torch.testing.assert_close(a, fa)
        torch.testing.assert_close(sb, fb * (alpha / r), rtol=1e-6, atol=1e-6, msg=f"{layer} {module}")


def _edit_config(**changes) -> Callable[[str], None]:
    def edit(path: str) -> None:
        with open(os.path.join(path, "adapter_config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(config | changes, f)
    return edit


def _write_config(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            f.write(text)
    return write


def _edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[str], None]:
    def edit(path: str) -> None:
        file = os.path.join(path, "adapter_model.safetensors")
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file)
    return edit


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"

BAD_ADAPTERS = {  # id: (what to break in a valid rank-4 q/v adapter for llama, what the error must name)
    "no-config": (lambda p: os.remove(os.path.join(p, "adapter_config.json")), "no adapter_config.json"),
    "config-not-json": (_write_config("{"), "JSON"),
    "config-a-list": (_write_config("[]"), "JSON object"),
    "no-weights": (lambda p: os.remove(os.path.join(p, "adapter_model.safetensors")),
                   "no adapter_model.safetensors or adapter_model.bin"),
    "dora": (_edit_config(use_dora=True), "use_dora"),
    "bias-all": (_edit_config(bias="all"), "bias"),
    "bias-lora-only": (_edit_config(bias="lora_only"), "bias"),
    "modules-to-save": (_edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "fan-in-fan-out": (_edit_config(fan_in_fan_out=True), "fan_in_fan_out"),
    "not-lora": (_edit_config(peft_type="IA3"), "peft_type"),
    "embedding": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 512)})), "embed_tokens"),
    "lm-head": (_edit_tensors(lambda t: t.update({
        "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})), "lm_head"),
    "unknown-module": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.rotary_proj.lora_A.weight": torch.zeros(4, 64)})), "rotary_proj"),
    "module-under-wrong-parent": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": torch.zeros(4, 64)})), "mlp.q_proj"),
    "layer-past-the-model": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)})), "layer 2"),
    "a-does-not-fit": (_edit_tensors(lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 65)})),
                       "do not fit"),
    "b-does-not-fit": (_edit_tensors(lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(32, 4)})),
                       "do not fit"),
    "ranks-differ": (_edit_tensors(lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(64, 3)})), "do not fit"),
    "a-without-b": (_edit_tensors(lambda t: t.pop(f"{Q0}.lora_B.weight")), "lora_A without lora_B"),
    "b-without-a": (_edit_tensors(lambda t: t.pop(f"{Q0}.lora_A.weight")), "lora_B without lora_A"),
    "no-tensors": (_edit_tensors(lambda t: t.clear()), "no LoRA weights"),
}


@pytest.mark.parametrize("break_it, names", list(BAD_ADAPTERS.values()), ids=list(BAD_ADAPTERS))
def test_load_adapter_refuses_naming_the_problem(tiny_checkpoints: dict[str, str], tmp_path,
                                                 break_it: Callable[[str], None], names: str) -> None:
    base = tiny_checkpoints["llama"]
    path = save_adapter(str(tmp_path / "bad"), base, rank=4, modules=["q_proj", "v_proj"])
    load_adapter(LoRARequest("ok", 1, path), ModelConfig.from_dir(base), max_rank=4)  # valid before
    break_it(path)
    with pytest.raises(ValueError, match="LoRA adapter") as info:
        load_adapter(LoRARequest("bad", 1, path), ModelConfig.from_dir(base), max_rank=4)
    assert names in str(info.value), str(info.value)


def test_load_adapter_refuses_ranks_and_shapes_that_do_not_fit(tiny_checkpoints: dict[str, str], tmp_path) -> None:
    llama, qwen3 = tiny_checkpoints["llama"], tiny_checkpoints["qwen3"]
    path = save_adapter(str(tmp_path / "r8"), llama, rank=8, modules=["v_proj"])
    with pytest.raises(ValueError, match="rank 8 exceeds max_lora_rank 4"):
        load_adapter(LoRARequest("big", 1, path), ModelConfig.from_dir(llama), max_rank=4)
    assert load_adapter(LoRARequest("big", 1, path), ModelConfig.from_dir(llama), max_rank=8).rank == 8
    # An adapter of another model: Qwen3's heads are 32 wide, q_proj has 128 outputs, not 64.
    other = save_adapter(str(tmp_path / "qwen3"), qwen3, rank=4, modules=["q_proj"])
    with pytest.raises(ValueError, match=r"q_proj: lora_A \(4, 64\) and lora_B \(128, 4\) do not fit"):
        load_adapter(LoRARequest("other", 1, other), ModelConfig.from_dir(llama), max_rank=8)


def _set_tensor(adapter_dir: str, key: str, value: torch.Tensor) -> None:
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    tensors[key] = value
    save_file(tensors, path)


def test_load_adapter_refuses_weights_that_are_not_finite(tiny_checkpoints: dict[str, str], tmp_path) -> None:
    """Every slot's B multiplies every token's masked columns, so one NaN or inf (in the file, or
    from the cast to the model's dtype) would reach other requests: refused at load."""
    llama = tiny_checkpoints["llama"]
    config = ModelConfig.from_dir(llama)
    path = save_adapter(str(tmp_path / "nan"), llama, rank=4, modules=["q_proj"], layers=[0])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    a = load_file(os.path.join(path, "adapter_model.safetensors"))[key]
    a[0, 0] = float("nan")
    _set_tensor(path, key, a)
    with pytest.raises(ValueError, match="layer 0 q_proj: weights hold NaN or infinity"):
        load_adapter(LoRARequest("nan", 1, path), config, max_rank=8)
    big = save_adapter(str(tmp_path / "big"), llama, rank=4, modules=["q_proj"], layers=[0], scale=1.0)
    _set_tensor(big, key, torch.full((4, 64), 1e5))  # finite in fp32, inf in fp16
    assert load_adapter(LoRARequest("big", 1, big), config, max_rank=8).weights[0, "q_proj"][0].dtype == torch.float32
    with pytest.raises(ValueError, match=r"NaN or infinity \(in float16\)"):
        load_adapter(LoRARequest("big", 1, big), config, max_rank=8, dtype=torch.float16)


def test_an_adapter_whose_products_overflow_leaves_its_neighbours_alone(tiny_checkpoints: dict[str, str],
                                                                       tmp_path) -> None:
    """fp16: finite weights whose x·A overflows to inf on the adapter's own rows; the other
    slots' rows are masked with where (inf × 0 would be NaN), so the base request and another
    adapter's beside it come out as they do alone."""
    llama = tiny_checkpoints["llama"]
    hot = save_adapter(str(tmp_path / "hot"), llama, rank=4, modules=["q_proj"], layers=[0], scale=1.0)
    _set_tensor(hot, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.full((4, 64), 6e4))
    calm = save_adapter(str(tmp_path / "calm"), llama, rank=4, modules=["v_proj"], seed=3, scale=0.3)
    args = dict(dtype="float16", device="cpu", max_loras=3)
    prompt = [1, 5, 9, 13, 40, 77]
    params = SamplingParams(max_tokens=6, **GREEDY)
    calm_request = LoRARequest("calm", 2, calm)
    alone = [lora_llm(llama, **args).generate([prompt], params, lora_request=r, use_tqdm=False)[0].outputs[0].token_ids
             for r in (None, calm_request)]
    llm = lora_llm(llama, **args)
    outs = llm.generate([prompt] * 3, params, lora_request=[None, LoRARequest("hot", 1, hot), calm_request],
                        use_tqdm=False)
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    assert_idle(llm)


def test_an_adapter_rewritten_in_place_does_not_meet_its_old_prefixes(tiny_checkpoints: dict[str, str],
                                                                     tmp_path, hf) -> None:
    """Other weights written over an adapter's files with their old size and time (cp -p,
    rsync -a, a coarse clock): its prefixes are named by what was read, not by the files' stat,
    so the old KV is never served to the new weights; the same weights read again hit it."""
    base = tiny_checkpoints["llama"]
    path = save_adapter(str(tmp_path / "adapter"), base, rank=8, seed=21)
    stats = {name: os.stat(os.path.join(path, name)) for name in os.listdir(path)}
    llm = lora_llm(base, max_loras=1)
    prompt = [1, *range(10, 50)]  # two full blocks
    params = SamplingParams(max_tokens=MAX_TOKENS, **GREEDY)
    first = llm.generate([prompt], params, lora_request=LoRARequest("v", 7, path), use_tqdm=False)[0]
    assert llm.engine.remove_lora(7)
    again = llm.generate([prompt], params, lora_request=LoRARequest("v", 7, path), use_tqdm=False)[0]
    assert again.num_cached_tokens == 32 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.remove_lora(7)
    save_adapter(path, base, rank=8, seed=22)  # same shapes: same sizes
    for name, st in stats.items():
        os.utime(os.path.join(path, name), ns=(st.st_atime_ns, st.st_mtime_ns))
    new = llm.generate([prompt], params, lora_request=LoRARequest("v", 7, path), use_tqdm=False)[0]
    assert new.num_cached_tokens == 0 and new.outputs[0].token_ids == hf(base, path, [prompt])[0]
    assert new.outputs[0].token_ids != first.outputs[0].token_ids
    assert_idle(llm)


@pytest.mark.parametrize("damage, message", [
    ("rank0", "rank 0 (a module's rank is at least 1)"),
    ("bad-regex", "malformed (error"),
    ("pattern-list", "malformed (AttributeError"),
    ("deep-json", "malformed (RecursionError"),
])
def test_a_malformed_adapter_is_a_value_error(tiny_checkpoints: dict[str, str], tmp_path, damage: str,
                                              message: str) -> None:
    """Files no adapter has: one ValueError that says so (a server answers it with a 400 and
    keeps serving), never another exception out of the loader."""
    llama = tiny_checkpoints["llama"]
    path = save_adapter(str(tmp_path / damage), llama, rank=4, modules=["q_proj"], layers=[0])
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    if damage == "rank0":
        _set_tensor(path, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(0, 64))
        _set_tensor(path, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", torch.zeros(64, 0))
    elif damage == "bad-regex":
        config["alpha_pattern"] = {"q_proj(": 4}
    elif damage == "pattern-list":
        config["alpha_pattern"] = ["q_proj"]
    if damage == "deep-json":
        text = "[" * 100_000 + "]" * 100_000
    else:
        text = json.dumps(config)
    with open(config_path, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_adapter(LoRARequest("bad", 1, path), ModelConfig.from_dir(llama), max_rank=8)


def test_pinned_adapters_stay_and_a_removed_one_in_use_goes_when_its_requests_finish(
        tiny_checkpoints: dict[str, str], requests_for) -> None:
    """vLLM's pin_lora: kept whatever max_cpu_loras says; remove_lora of an adapter in use is
    False and drops it once its last request finishes (not at some later eviction)."""
    llm = lora_llm(tiny_checkpoints["llama"], max_loras=1, max_cpu_loras=1)
    engine, registry = llm.engine, llm.engine.loras
    all_, qv, mlp = (requests_for("llama", n) for n in ("all", "qv", "mlp"))
    engine.add_lora(all_, pin=True)
    engine.add_lora(qv)
    engine.add_lora(mlp)  # past max_cpu_loras: qv (idle, unpinned) goes, the pinned one stays
    assert engine.list_loras() == {IDS["all"], IDS["mlp"]}
    assert engine.pin_lora(IDS["mlp"]) and not engine.pin_lora(IDS["qv"])  # not loaded
    engine.add_request("r", [1, 5, 9], SamplingParams(max_tokens=3, **GREEDY), lora_request=mlp)
    engine.step()
    assert not engine.remove_lora(IDS["mlp"]) and IDS["mlp"] in engine.list_loras()  # in use: later
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.list_loras() == {IDS["all"]} and not registry.users.get(IDS["mlp"])
    assert engine.remove_lora(IDS["all"]) and engine.list_loras() == set() and not registry.users
    assert_idle(llm)


def test_an_adapter_path_may_start_with_a_tilde(tiny_checkpoints: dict[str, str], tmp_path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    save_adapter(str(tmp_path / "adapters" / "a"), tiny_checkpoints["llama"], rank=4, modules=["o_proj"])
    adapter = load_adapter(LoRARequest("a", 1, "~/adapters/a"), ModelConfig.from_dir(tiny_checkpoints["llama"]), 8)
    assert set(adapter.weights) == {(0, "o_proj"), (1, "o_proj")}


# =============================================================================================
# 3. The scheduler: at most max_loras adapters among the running requests


def test_scheduler_admits_at_most_max_loras_adapters_and_passes_over_the_rest() -> None:
    s = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=64, max_loras=2))
    loras = [1, 2, 3, 0, 1, 3, 0]
    reqs = [Request(f"r{i}", [1, 2, 3, 4], 4, lora_id=lora) for i, lora in enumerate(loras)]
    for r in reqs:
        s.add_request(r)

    def step() -> list[str]:
        batch = s.schedule()
        s.update(batch, [7] * len(batch))
        return [r.request_id for r in batch.requests]

    # adapter 3 finds no slot: it waits, and adapter 1, which has held its slot the longest,
    # drains for it (r4 waits too); adapter 3's r5 waits behind r2; the base model goes on
    assert step() == ["r0", "r1", "r3", "r6"]
    assert s.draining_lora == 1
    assert [r.request_id for r in s.waiting] == ["r2", "r4", "r5"], "the passed-over requests keep their order"
    assert step() == ["r0", "r1", "r3", "r6"]  # still full
    s.finish(reqs[0])  # adapter 1 drained: its slot goes to r2 (adapter 3), first in line, and r5 with it
    # decodes first, then the prompts; r4 (adapter 1) now finds no slot, and adapter 2 drains for it
    assert step() == ["r1", "r3", "r6", "r2", "r5"]
    assert [r.request_id for r in s.waiting] == ["r4"] and s.draining_lora == 2
    s.finish(reqs[1])  # adapter 2's last request: its slot is free
    batch = s.schedule()
    assert {r.request_id for r in batch.requests} == {"r2", "r3", "r4", "r5", "r6"} and not s.waiting
    assert {r.lora_id for r in s.running if r.lora_id} == {1, 3} and s.draining_lora == 0


def test_a_slot_kept_for_an_adapter_serves_its_other_requests() -> None:
    """max_loras 1: X (adapter 1) is passed over for a token still in flight, so the free slot is
    kept for adapter 1; Y (adapter 2) behind it finds no slot; Z (adapter 1) behind both takes the
    kept slot (it had been held back as if it were new, and with X waiting on a sibling-like
    condition nothing ever ran: a fuzz found that deadlock under the priority policy)."""
    s = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=64, max_loras=1))
    x, y, z = (Request(name, [1, 2, 3], 4, lora_id=lora) for name, lora in (("x", 1), ("y", 2), ("z", 1)))
    for r in (x, y, z):
        s.add_request(r)
    x.num_pending_tokens = 1  # as a request preempted with its token in flight
    batch = s.schedule()
    assert [r.request_id for r in batch.requests] == ["z"]
    assert [r.request_id for r in s.waiting] == ["x", "y"]


def _random_lora_workload(seed: int) -> str | None:
    """The scheduler alone under random arrivals (adapters, base, n > 1 siblings, priorities),
    small pools (preemption), chunk limits, tokens a step late (async) and drafts; what went
    wrong, or None. At most max_loras adapters may run, and every request must finish."""
    rng = random.Random(seed)
    max_loras = rng.choice([1, 1, 2, 3])
    cfg = SchedulerConfig(max_model_len=256, num_blocks=rng.choice([6, 10, 20, 64]), block_size=4,
                          max_num_seqs=rng.choice([2, 4, 16]), max_num_batched_tokens=rng.choice([8, 16, 64]),
                          max_num_partial_prefills=rng.choice([1, 2]), policy=rng.choice(["fcfs", "priority"]),
                          max_loras=max_loras)
    late, drafts = rng.random() < 0.5, rng.random() < 0.3
    s = Scheduler(cfg)
    pool = cfg.num_blocks * cfg.block_size
    requests: list[Request] = []
    arrivals = sorted(rng.randint(0, 60) for _ in range(rng.randint(5, 30)))

    def arrive(i: int) -> None:
        lora = rng.choice([0, 0, 1, 2, 3, 4][:3 + max_loras])
        prompt = [rng.randint(3, 50) for _ in range(rng.randint(1, min(40, pool // 2)))]
        max_tokens, first = rng.randint(1, min(12, pool - len(prompt))), None
        for k in range(rng.choice([1, 1, 1, 2, 3])):
            r = Request(f"r{i}.{k}", prompt, max_tokens, prefill_after=first, priority=rng.randint(0, 3),
                        lora_id=lora, prefix_root=-lora if lora else None)
            s.add_request(r)
            requests.append(r)
            first = first or r

    def deliver(batch: ScheduledBatch) -> None:
        for r in batch.requests:
            if r.num_pending_tokens and r.status is not RequestStatus.FINISHED:
                token = 2 if rng.random() < 0.05 else rng.randint(3, 50)
                s.append_token(r, token)
                if r.status is RequestStatus.RUNNING and batch.spec_token_ids.get(r):
                    for d in batch.spec_token_ids[r][:rng.randint(0, len(batch.spec_token_ids[r]))]:
                        if r.num_output_tokens >= r.max_tokens:
                            break
                        s.append_token(r, d, accepted_draft=True)
                if r.num_output_tokens >= r.max_tokens or token == 2:
                    s.finish(r)

    in_flight, i = None, 0
    for t in range(3000):
        while i < len(arrivals) and arrivals[i] <= t:
            arrive(i)
            i += 1
        if i == len(arrivals) and not s.has_unfinished:
            return None
        if drafts:
            for r in s.running:
                if r.prompt_computed and not r.num_pending_tokens:
                    r.spec_token_ids = [rng.randint(3, 50) for _ in range(rng.randint(0, 3))]
        batch = s.schedule()
        running = {r.lora_id for r in s.running if r.lora_id}
        if len(running) > max_loras:
            return f"step {t}: adapters {running} running, max_loras {max_loras}"
        s.advance(batch)
        if late:
            if in_flight is not None:
                deliver(in_flight)
            in_flight = batch
        else:
            deliver(batch)
    return f"stuck: {[(r.request_id, r.lora_id, r.status.name) for r in requests if not r.finished][:8]}"


def test_random_workloads_keep_max_loras_and_finish_every_request() -> None:
    """(A review helper's fuzz, kept: 4,000 seeds found the kept-slot deadlock above; these
    1,000 include its seeds.)"""
    failures = {seed: why for seed in range(1000) if (why := _random_lora_workload(seed))}
    assert not failures, dict(list(failures.items())[:3])


def test_only_the_draining_adapter_stops_taking_requests() -> None:
    """Two slots held by adapters 1 (first) and 2, adapter 3 waiting: adapter 1 drains, while
    adapter 2 keeps taking its new requests (a busy adapter beside the drain is not held up)."""
    s = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=256, max_loras=2))
    for i, lora in enumerate([1, 2, 3]):
        s.add_request(Request(f"first-{lora}", [1, 2, 3, 4], 8, lora_id=lora))
    batch = s.schedule()
    s.update(batch, [7] * len(batch))
    for t in range(3):
        s.add_request(Request(f"one-{t}", [1, 2, 3], 8, lora_id=1))
        s.add_request(Request(f"two-{t}", [1, 2, 3], 8, lora_id=2))
        batch = s.schedule()
        s.update(batch, [7 if batch.samples(i) else None for i in range(len(batch))])
    running = {r.request_id for r in s.running}
    assert {"two-0", "two-1", "two-2"} <= running and not running & {"one-0", "one-1", "one-2", "first-3"}
    assert s.draining_lora == 1


def test_a_request_waiting_for_a_slot_is_not_starved_by_running_adapters_arrivals() -> None:
    """One slot held by adapter 1, whose requests keep arriving: adapter 2's request, first in
    line, gets the slot once adapter 1's running requests finish (later arrivals of adapter 1
    wait behind it), while base-model requests are never held up."""
    s = Scheduler(SchedulerConfig(max_model_len=256, num_blocks=256, max_loras=1))
    first = Request("a-0", [1, 2, 3], 3, lora_id=1)
    s.add_request(first)
    s.update(s.schedule(), [7])
    waiting = Request("b", [1, 2, 3], 3, lora_id=2)
    s.add_request(waiting)
    admitted_at: dict[str, int] = {}
    for t in range(1, 12):
        s.add_request(Request(f"a-{t}", [1, 2, 3], 3, lora_id=1))
        s.add_request(Request(f"base-{t}", [1, 2, 3], 3))
        batch = s.schedule()
        s.update(batch, [7] * len(batch))
        for r in batch.requests:
            admitted_at.setdefault(r.request_id, t)
        for r in list(s.running):
            if r.num_output_tokens >= r.max_tokens:
                s.finish(r)
        assert len({r.lora_id for r in s.running if r.lora_id}) <= 1
    assert admitted_at["b"] <= 3, "adapter 2 waited past adapter 1's first request"
    assert all(admitted_at[f"base-{t}"] == t for t in range(1, 12)), "a base request was held up"
    assert "a-1" in admitted_at and admitted_at["a-1"] > admitted_at["b"], "adapter 1's later arrivals go after b"


def test_a_request_passed_over_for_a_prefill_limit_keeps_its_adapters_slot() -> None:
    """max_loras 1, one partial prefill at a time, long base prompts keeping one going: C (a new
    adapter, first in line) is passed over for the prefill limit, not for a slot; the slot that
    frees must wait for it, not go to the next adapters' short requests behind it."""
    s = Scheduler(SchedulerConfig(max_model_len=1024, num_blocks=2000, max_num_batched_tokens=64,
                                  max_num_partial_prefills=1, max_loras=1))
    token = iter(range(3, 1_000_000))

    def add(request_id: str, n: int, max_tokens: int, lora: int = 0) -> None:
        s.add_request(Request(request_id, [next(token) for _ in range(n)], max_tokens, lora_id=lora,
                              prefix_root=-lora if lora else None))

    add("d-0", 4, 5, lora=100)
    s.update(s.schedule(), [7])
    add("C", 100, 4, lora=1)
    overtaken = 0
    for t in range(1, 200):
        if t % 2 == 0:
            add(f"base-{t}", 128, 1)
        add(f"d-{t}", 4, 5, lora=100 + t)
        batch = s.schedule()
        if any(r.request_id == "C" for r in batch.requests):
            break
        overtaken += sum(r.request_id.startswith("d-") and r.num_computed_tokens == 0 for r in batch.requests)
        s.update(batch, [7 if batch.samples(i) else None for i in range(len(batch))])
        for r in list(s.running):
            if r.num_output_tokens >= r.max_tokens:
                s.finish(r)
        assert len({r.lora_id for r in s.running if r.lora_id}) <= 1
    else:
        pytest.fail(f"C never ran; {overtaken} later adapters' requests did")
    assert overtaken == 0 and t <= 10


def test_scheduler_without_loras_refuses_an_adapter_request() -> None:
    s = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=16))
    with pytest.raises(ValueError, match="max_loras 0"):
        s.add_request(Request("r", [1, 2], 2, lora_id=1))
    assert not s.waiting
    s.add_request(Request("base", [1, 2], 2))
    with pytest.raises(ValueError, match="max_loras"):
        SchedulerConfig(max_model_len=128, num_blocks=16, max_loras=-1)


def test_prefix_root_keeps_adapters_prefixes_apart() -> None:
    assert Request("b", [1], 1).prefix_root is None
    s = Scheduler(SchedulerConfig(max_model_len=128, num_blocks=32, max_loras=2))
    prompt = list(range(1, 41))  # two full blocks, and more
    first = Request("first", prompt, 2, lora_id=1, prefix_root=-1)
    s.add_request(first)
    s.update(s.schedule(), [5])
    bm = s.block_manager
    assert len(bm.match_prefix(Request("same", prompt, 2, lora_id=1, prefix_root=-1))) == 2
    assert bm.match_prefix(Request("other", prompt, 2, lora_id=2, prefix_root=-2)) == []
    # the same id with other weights (reused after its adapter was dropped) has a root of its own
    assert bm.match_prefix(Request("reused", prompt, 2, lora_id=1, prefix_root=-3)) == []
    assert bm.match_prefix(Request("base", prompt, 2)) == []


# =============================================================================================
# 4. End to end: transformers' tokens with each request's adapter


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_adapters_and_the_base_model_in_one_batch_match_transformers(
        kind: str, tiny_checkpoints: dict[str, str], adapters, requests_for, hf) -> None:
    """qwen2: q/k/v biases and tied embeddings; qwen3: q/k norms, heads wider than hidden/heads."""
    base = tiny_checkpoints[kind]
    names = [None, *ADAPTERS]
    llm = lora_llm(base, max_loras=len(ADAPTERS))
    jobs = [(p, name) for p in PROMPTS for name in names]  # adapters interleaved in the batch
    outs = llm.generate([p for p, _ in jobs], SamplingParams(max_tokens=MAX_TOKENS, **GREEDY),
                        lora_request=[requests_for(kind, name) for _, name in jobs], use_tqdm=False)
    refs = {name: hf(base, None if name is None else adapters[kind][name], PROMPTS) for name in names}
    for name in ADAPTERS:  # each adapter changes the model's answers: the comparison shows something
        assert refs[name] != refs[None], f"{name} does not change {kind}'s tokens"
    for (prompt, name), out in zip(jobs, outs, strict=True):
        assert out.outputs[0].token_ids == refs[name][PROMPTS.index(prompt)], f"{kind} {name} {prompt}"
        assert out.lora_request == requests_for(kind, name)
    assert llm.engine.list_loras() == set(IDS.values())
    assert_idle(llm)


@pytest.mark.parametrize("max_loras", [1, 2])
def test_more_adapters_than_slots_swap_slots_and_keep_the_tokens(
        max_loras: int, tiny_checkpoints: dict[str, str], adapters, requests_for, hf,
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_checkpoints["llama"]
    llm = lora_llm(base, max_loras=max_loras, max_cpu_loras=3)
    steps = record_steps(llm, monkeypatch)
    slots = llm.engine.runner.lora
    held: list[tuple[int | None, ...]] = []
    slots_for = slots.slots_for

    def spy(lora_ids):
        chosen = slots_for(lora_ids)
        assert set(chosen) == set(lora_ids) and len(set(chosen.values())) == len(chosen), chosen
        held.append(tuple(None if a is None else a.request.lora_int_id for a in slots.held))
        return chosen

    monkeypatch.setattr(slots, "slots_for", spy)
    jobs = [(p, name) for name in ["all", "qv", "mlp", None] for p in PROMPTS]
    outs = llm.generate([p for p, _ in jobs], SamplingParams(max_tokens=MAX_TOKENS, **GREEDY),
                        lora_request=[requests_for("llama", name) for _, name in jobs], use_tqdm=False)
    for (prompt, name), out in zip(jobs, outs, strict=True):
        want = hf(base, None if name is None else adapters["llama"][name], PROMPTS)[PROMPTS.index(prompt)]
        assert out.outputs[0].token_ids == want, f"max_loras {max_loras}, {name} {prompt}"
    assert max(len(s.adapters) for s in steps) == max_loras
    assert all(len(s.adapters) <= max_loras for s in steps), [s.adapters for s in steps]
    # some step passed over an adapter's requests, and the slots held all three in turn
    assert any(lora and lora not in s.adapters for s in steps for _, lora in s.waiting)
    assert {i for h in held for i in h if i} == {1, 2, 3}
    # the base model's requests ran in the first step, beside the first adapters'
    assert {lora for _, lora in steps[0].running} == {0, *[IDS["all"], IDS["qv"]][:max_loras]}
    assert_idle(llm)


def test_a_base_request_is_not_held_up_by_adapters_waiting_for_a_slot(
        tiny_checkpoints: dict[str, str], adapters, requests_for, hf, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_checkpoints["llama"]
    llm = lora_llm(base, max_loras=1, max_cpu_loras=3)
    steps = record_steps(llm, monkeypatch)
    p = PROMPTS[0]
    # queued: adapter 1 (long), adapters 2 and 3 (no slot while 1 runs), then the base model
    names = ["all", "qv", "mlp", None]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (12, 4, 4, 4)]
    outs = llm.generate([p] * 4, params, lora_request=[requests_for("llama", n) for n in names], use_tqdm=False)
    for name, out, sp in zip(names, outs, params):
        assert out.outputs[0].token_ids == hf(base, None if name is None else adapters["llama"][name],
                                              [p], 12)[0][:sp.max_tokens], name
    first = {}  # request → the first and last step it ran in
    for i, step in enumerate(steps):
        for rid, _ in step.running:
            first.setdefault(rid, [i, i])[1] = i
    a, b, c, d = (first[o.request_id + "-0"] for o in outs)
    assert d[0] == a[0] == 0, "the base request is admitted with the first adapter's"
    assert d[1] < b[0] and d[1] < c[0], "the base request finished before the adapters queued before it started"
    assert a[1] < b[0], "adapter 2 waits for adapter 1's slot (max_loras=1)"
    assert outs[3].metrics.first_scheduled_time == outs[0].metrics.first_scheduled_time
    assert outs[3].metrics.first_scheduled_time < outs[1].metrics.first_scheduled_time
    assert all(len(s.adapters) <= 1 for s in steps)
    assert_idle(llm)


@pytest.mark.parametrize("setting", [
    dict(num_kv_blocks=8),  # a pool this small preempts: recomputed with the adapter again
    dict(num_kv_blocks=64, max_num_batched_tokens=8),  # prompts in chunks beside other adapters' decodes
    dict(num_kv_blocks=7, scheduling_policy="priority"),
], ids=["preemption", "chunked-prefill", "priority"])
def test_preemption_chunked_prefill_and_priority_keep_each_adapters_tokens(
        setting: dict, tiny_checkpoints: dict[str, str], adapters, requests_for, hf,
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_checkpoints["llama"]
    rng = random.Random(0)
    prompts = [[1, *(rng.randrange(3, 500) for _ in range(rng.randint(5, 30)))] for _ in range(9)]
    names = [None, "all", "qv", "mlp", "all", None, "qv", "mlp", "all"]
    llm = lora_llm(base, max_loras=2, max_cpu_loras=3, **setting)
    steps = record_steps(llm, monkeypatch)
    priority = [i % 3 for i in range(9)] if setting.get("scheduling_policy") == "priority" else None
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, **GREEDY), priority=priority,
                        lora_request=[requests_for("llama", n) for n in names], use_tqdm=False)
    for i, (name, out) in enumerate(zip(names, outs)):
        want = hf(base, None if name is None else adapters["llama"][name], prompts, 10)[i]
        assert out.outputs[0].token_ids == want, (i, name)
    assert all(len(s.adapters) <= 2 for s in steps), [s.adapters for s in steps]
    if "max_num_batched_tokens" not in setting:
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the setting was to preempt"
    assert_idle(llm)


@pytest.mark.parametrize("max_loras, max_cpu_loras, names", [(1, None, ["all", "qv"]), (2, 2, ["all", "qv", "mlp"])],
                         ids=["default-cpu-loras", "three-in-flight-two-kept"])
def test_adapters_in_flight_beyond_max_cpu_loras_stay_loaded(
        max_loras: int, max_cpu_loras: int | None, names: list[str], tiny_checkpoints: dict[str, str],
        adapters, requests_for, hf) -> None:
    """max_cpu_loras bounds the adapters kept once idle; one that a queued request holds must stay
    loaded, however many are in flight (max_cpu_loras defaults to max_loras: two requests with
    two adapters on a default engine)."""
    base = tiny_checkpoints["llama"]
    llm = lora_llm(base, max_loras=max_loras, max_cpu_loras=max_cpu_loras)
    p = PROMPTS[1]
    outs = llm.generate([p] * len(names), SamplingParams(max_tokens=4, **GREEDY),
                        lora_request=[requests_for("llama", n) for n in names], use_tqdm=False)
    for name, out in zip(names, outs):
        assert out.outputs[0].token_ids == hf(base, adapters["llama"][name], [p], MAX_TOKENS)[0][:4], name
    assert_idle(llm)
    assert len(llm.engine.list_loras()) <= llm.engine.loras.max_cpu_loras


# =============================================================================================
# 5. Other attention backends, and the CUDA-graph replay path


# Triton off CUDA runs in the interpreter (TRITON_INTERPRET, set by test_runner_gpu_path's import).
@pytest.mark.parametrize("backend", ["reference"] + ([] if CUDA else ["triton"]))
def test_other_backends_and_graph_replays_give_the_same_tokens(
        backend: str, tiny_checkpoints: dict[str, str], adapters, requests_for, hf,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention backend chosen by STOKE_ATTENTION_BACKEND, eagerly and through the CUDA-graph
    replay machinery (an eager stand-in for the captured graph, see test_runner_gpu_path): the
    adapter slot of each row rides the graph's static buffers, padding rows with none."""
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    path = tiny_checkpoints["llama"]
    names = [None, "all", "qv", "mixed"] if backend == "reference" else ["all", None, "qv"]
    prompts = PROMPTS if backend == "reference" else [PROMPTS[0], PROMPTS[1]]
    n = MAX_TOKENS if backend == "reference" else 4
    jobs = [(p, name) for p in prompts for name in names]
    loras = [requests_for("llama", name) for _, name in jobs]
    args = dict(num_kv_blocks=48, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, dtype="float32",
                device="cpu", max_loras=3)
    # Lengths that differ: the batch shrinks through sizes between the graphs' buckets (padding).
    lens = [(2, 5, n, 3, n - 1)[i % 5] for i in range(len(jobs))]
    params = [SamplingParams(max_tokens=k, **GREEDY) for k in lens]
    want = [hf(path, None if name is None else adapters["llama"][name], PROMPTS)[PROMPTS.index(p)][:k]
            for (p, name), k in zip(jobs, lens)]

    default = lora_llm(path, **args)  # the CPU's own backend (C kernels)
    assert default.engine.runner.backend.__name__ == kernels.BACKENDS["cpu"]
    assert token_ids(default.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False)) == want

    monkeypatch.setenv(kernels.BACKEND_ENV, backend)
    eager = lora_llm(path, **args)
    assert eager.engine.runner.backend.__name__ == kernels.BACKENDS[backend]
    assert token_ids(eager.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False)) == want

    graphed = lora_llm(path, **args)
    log = with_eager_graphs(graphed, 8, tokens=[] if backend == "reference" else [16, 32, 64])
    assert token_ids(graphed.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False)) == want
    assert ("decode", 8) in log and any(graphed.engine.runner.padded_replays), log
    if backend == "triton":
        assert any(k == "mixed" for k, _ in log), log
    assert_idle(graphed)


# =============================================================================================
# 6. The prefix cache: an adapter's prefixes are its own


def test_prefix_cache_is_kept_apart_per_adapter(tiny_checkpoints: dict[str, str], adapters, requests_for,
                                                hf) -> None:
    base = tiny_checkpoints["llama"]
    llm = lora_llm(base)
    prompt = [1, *range(60, 110)]  # 51 tokens: 3 full blocks may be reused
    params = SamplingParams(max_tokens=MAX_TOKENS, **GREEDY)
    a, b = requests_for("llama", "all"), requests_for("llama", "qv")
    ref = {name: hf(base, None if name is None else adapters["llama"][name], [prompt])[0]
           for name in (None, "all", "qv")}

    def run(lora):
        out = llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0]
        assert_idle(llm)
        return out.outputs[0].token_ids, out.num_cached_tokens

    assert run(None) == (ref[None], 0)
    assert run(a) == (ref["all"], 0), "the base model's KV is not the adapter's"
    assert run(a) == (ref["all"], 48), "the adapter's own prefix is reused"
    assert run(b) == (ref["qv"], 0), "one adapter's KV is not another's"
    assert run(b) == (ref["qv"], 48)
    assert run(None) == (ref[None], 48)
    # All at once: each request hits its own adapter's prefix only.
    outs = llm.generate([prompt] * 3, params, lora_request=[b, None, a], use_tqdm=False)
    assert token_ids(outs) == [ref["qv"], ref[None], ref["all"]]
    assert [o.num_cached_tokens for o in outs] == [48, 48, 48]
    assert_idle(llm)


# =============================================================================================
# 7. The registry of adapters in host memory


def test_registry_keeps_max_cpu_loras_least_recently_used_and_never_one_in_use(
        tiny_checkpoints: dict[str, str], adapters, requests_for) -> None:
    llm = lora_llm(tiny_checkpoints["llama"], max_loras=1, max_cpu_loras=2)
    engine = llm.engine
    r1, r2, r3, r4 = (requests_for("llama", n) for n in ADAPTERS)
    assert engine.add_lora(r1) is True and engine.add_lora(r2) is True
    assert list(engine.loras.adapters) == [1, 2]
    assert engine.add_lora(r1)  # used again: now the most recent
    engine.add_lora(r3)
    assert list(engine.loras.adapters) == [1, 3], "the least recently used (2) goes"
    assert engine.list_loras() == {1, 3}
    # A request holds adapter 1: it stays, however many are added after it.
    engine.add_request("held", [1, 5, 9], SamplingParams(max_tokens=3, **GREEDY), lora_request=r1)
    assert engine.loras.users[1] == 1
    engine.add_lora(r2)
    engine.add_lora(r4)
    assert 1 in engine.list_loras() and 4 in engine.list_loras() and len(engine.list_loras()) == 2
    assert engine.remove_lora(1) is False, "in use: dropped once its request finishes"
    assert engine.remove_lora(99) is False, "not loaded"
    assert 1 in engine.list_loras()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].lora_request == r1 and len(outs[-1].outputs[0].token_ids) == 3
    assert_idle(llm)
    assert 1 not in engine.list_loras(), "removed while in use: gone with its last request"
    # One id names one adapter while it is loaded.
    with pytest.raises(ValueError, match="one id names one adapter"):
        engine.add_lora(LoRARequest("all", 4, adapters["llama"]["all"]))
    with pytest.raises(ValueError, match="one id names one adapter"):
        engine.add_lora(LoRARequest("renamed", 4, r4.lora_path))
    with pytest.raises(ValueError, match="one id names one adapter"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), lora_request=LoRARequest("x", 4, r1.lora_path),
                     use_tqdm=False)
    assert engine.remove_lora(4) is True and 4 not in engine.list_loras()
    assert engine.remove_lora(4) is False, "already gone"
    assert_idle(llm)


def test_registry_never_drops_an_adapter_a_request_holds(tiny_checkpoints: dict[str, str], requests_for) -> None:
    """The registry alone: with max_cpu_loras=1, a second adapter acquired while the first is
    held is one more than max_cpu_loras; both are held, so neither may go (the engine's runner
    looks each running request's adapter up in the registry at every step)."""
    registry = LoRARegistry(ModelConfig.from_dir(tiny_checkpoints["llama"]), max_lora_rank=8, max_cpu_loras=1)
    first, second = requests_for("llama", "all"), requests_for("llama", "qv")
    registry.acquire(first)
    held = registry.acquire(second)
    assert dict(registry.users) == {first.lora_int_id: 1, second.lora_int_id: 1}
    assert set(registry.adapters) == {first.lora_int_id, second.lora_int_id}, \
        f"an adapter in use was dropped: {list(registry.adapters)} loaded"
    assert registry.get(second.lora_int_id) is held
    registry.release(first.lora_int_id)  # idle again: now max_cpu_loras applies
    assert list(registry.adapters) == [second.lora_int_id]


def test_an_aborted_request_gives_its_adapter_back(tiny_checkpoints: dict[str, str], requests_for) -> None:
    llm = lora_llm(tiny_checkpoints["llama"])
    engine = llm.engine
    r = requests_for("llama", "all")
    engine.add_request("a", [1, 5, 9], SamplingParams(n=2, max_tokens=20, temperature=1.0, seed=3), lora_request=r)
    assert engine.loras.users[r.lora_int_id] == 2, "one hold per sample"
    engine.step()
    assert engine.remove_lora(r.lora_int_id) is False
    out = engine.abort_request("a")
    assert out.finished and out.lora_request == r
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(llm)
    assert r.lora_int_id not in engine.list_loras(), "removed while in use: gone once its requests were"


@pytest.fixture()
def swapped_adapter(tiny_checkpoints: dict[str, str], tmp_path) -> tuple[str, str]:
    """Two different adapters for llama, each saved at its own path."""
    base = tiny_checkpoints["llama"]
    return (save_adapter(str(tmp_path / "old"), base, rank=8, seed=21),
            save_adapter(str(tmp_path / "new"), base, rank=4, seed=22, modules=["k_proj", "o_proj", "up_proj"]))


@pytest.mark.parametrize("forget", ["remove_lora", "lru"])
def test_an_id_reused_for_another_adapter_loads_the_new_one(
        forget: str, tiny_checkpoints: dict[str, str], swapped_adapter, requests_for, hf) -> None:
    """After remove_lora (or eviction from host memory), id 7 may name another adapter: its
    device slot is loaded again (the slot held the old adapter's weights)."""
    base = tiny_checkpoints["llama"]
    old, new = swapped_adapter
    llm = lora_llm(base, max_loras=1, max_cpu_loras=1)
    prompts = PROMPTS[:2]  # shorter than a block: the prefix cache has nothing to give (see the next test)
    params = SamplingParams(max_tokens=MAX_TOKENS, **GREEDY)
    assert token_ids(llm.generate(prompts, params, lora_request=LoRARequest("v1", 7, old),
                                  use_tqdm=False)) == hf(base, old, prompts)
    if forget == "remove_lora":
        assert llm.engine.remove_lora(7) is True
    else:
        llm.engine.add_lora(requests_for("llama", "qv"))
        assert llm.engine.list_loras() == {IDS["qv"]}
    outs = llm.generate(prompts, params, lora_request=LoRARequest("v2", 7, new), use_tqdm=False)
    assert token_ids(outs) == hf(base, new, prompts), "the slot still held the old adapter"
    assert hf(base, new, prompts) != hf(base, old, prompts)
    assert_idle(llm)


@pytest.mark.parametrize("forget", ["remove_lora", "lru"])
def test_an_id_reused_for_another_adapter_does_not_reuse_the_old_adapters_prefixes(
        forget: str, tiny_checkpoints: dict[str, str], swapped_adapter, requests_for, hf) -> None:
    """The prefix cache chains an adapter's blocks from a root named by its content: blocks
    computed with the old adapter under id 7 must not serve the new adapter that id names now."""
    base = tiny_checkpoints["llama"]
    old, new = swapped_adapter
    llm = lora_llm(base, max_loras=1, max_cpu_loras=1)
    prompt = [1, *range(10, 50)]  # 41 tokens: two full blocks
    params = SamplingParams(max_tokens=MAX_TOKENS, **GREEDY)
    first = llm.generate([prompt], params, lora_request=LoRARequest("v1", 7, old), use_tqdm=False)[0]
    assert first.outputs[0].token_ids == hf(base, old, [prompt])[0]
    if forget == "remove_lora":
        assert llm.engine.remove_lora(7) is True
    else:
        llm.engine.add_lora(requests_for("llama", "qv"))
    out = llm.generate([prompt], params, lora_request=LoRARequest("v2", 7, new), use_tqdm=False)[0]
    assert (out.outputs[0].token_ids, out.num_cached_tokens) == (hf(base, new, [prompt])[0], 0), \
        "the new adapter ran on KV cached with the old one"
    assert_idle(llm)


# =============================================================================================
# 8. Bad input changes nothing


def test_bad_lora_input_is_refused_and_leaves_the_engine_as_it_was(
        tiny_checkpoints: dict[str, str], adapters, requests_for, hf, tmp_path) -> None:
    base = tiny_checkpoints["llama"]
    params = SamplingParams(max_tokens=MAX_TOKENS, **GREEDY)
    p = PROMPTS[0]
    good = requests_for("llama", "all")
    want, want_base = hf(base, adapters["llama"]["all"], PROMPTS)[0], hf(base, None, PROMPTS)[0]

    plain = LLM(base, num_kv_blocks=32)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate([p], params, lora_request=good, use_tqdm=False)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.engine.add_request("x", p, params, lora_request=good)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.engine.add_lora(good)
    assert_engine_idle(plain)
    assert token_ids(plain.generate([p], params, use_tqdm=False)) == [want_base]
    assert token_ids(plain.generate([p], params, lora_request=[None], use_tqdm=False)) == [want_base]
    assert_engine_idle(plain)

    llm = lora_llm(base)
    missing = LoRARequest("missing", 5, str(tmp_path / "nowhere"))
    broken = LoRARequest("broken", 6, save_adapter(str(tmp_path / "dora"), base, rank=4,
                                                   extra_config={"use_dora": True}))
    for bad, names in [(missing, "no adapter_config.json"), (broken, "use_dora")]:
        with pytest.raises(ValueError, match=names):
            llm.generate([p], params, lora_request=bad, use_tqdm=False)
        # a batch with a good adapter before the bad one: nothing of it is queued
        with pytest.raises(ValueError, match=names):
            llm.generate([p, p, p], params, lora_request=[good, None, bad], use_tqdm=False)
        with pytest.raises(ValueError, match=names):
            llm.engine.add_request("x", p, params, lora_request=bad)
        assert_idle(llm)
        assert bad.lora_int_id not in llm.engine.list_loras()
    with pytest.raises(ValueError, match="2 LoRA requests for 3 prompts"):
        llm.generate([p, p, p], params, lora_request=[good, None], use_tqdm=False)
    with pytest.raises(ValueError, match="2 LoRA requests for 1 prompts"):
        llm.generate([p], params, lora_request=[good, good], use_tqdm=False)
    # one id for two adapters in one batch; an adapter of a rank over max_lora_rank
    twin = LoRARequest("twin", good.lora_int_id, adapters["llama"]["qv"])
    with pytest.raises(ValueError, match="one id names one adapter"):
        llm.generate([p, p], params, lora_request=[good, twin], use_tqdm=False)
    wide = LoRARequest("wide", 9, save_adapter(str(tmp_path / "r16"), base, rank=16, modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank 16 exceeds max_lora_rank 8"):
        llm.generate([p], params, lora_request=wide, use_tqdm=False)
    with pytest.raises(TypeError):
        llm.generate([p], params, lora_request="all", use_tqdm=False)
    with pytest.raises(TypeError):
        llm.generate([p], params, lora_request=[{"lora_name": "all"}], use_tqdm=False)
    assert_idle(llm)
    outs = llm.generate([p, p], params, lora_request=[good, None], use_tqdm=False)
    assert token_ids(outs) == [want, want_base]
    assert_idle(llm)


# =============================================================================================
# 9. Beside the engine's other features


def test_n_samples_with_an_adapter(tiny_checkpoints: dict[str, str], adapters, requests_for, hf) -> None:
    base = tiny_checkpoints["llama"]
    llm = lora_llm(base)
    r = requests_for("llama", "all")
    prompts = PROMPTS[:2]
    greedy = llm.generate(prompts, SamplingParams(n=2, max_tokens=MAX_TOKENS, **GREEDY), lora_request=r,
                          use_tqdm=False)
    for out, want in zip(greedy, hf(base, adapters["llama"]["all"], prompts)):
        assert [s.token_ids for s in out.outputs] == [want, want]
    seeded = SamplingParams(n=2, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, ignore_eos=True)

    def samples(lora):
        return [[s.token_ids for s in o.outputs] for o in llm.generate(prompts, seeded, lora_request=lora,
                                                                       use_tqdm=False)]

    first = samples(r)
    assert samples(r) == first, "seeded samples reproduce"
    assert samples(None) != first, "the base model's samples are other"
    assert_idle(llm)


def test_speculative_decoding_with_adapters_gives_the_same_tokens(
        tiny_checkpoints: dict[str, str], adapters, requests_for, hf, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_checkpoints["llama"]
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    prompts = [[1, 7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8], *PROMPTS]
    names = ["all", None, "qv", "mlp"]
    jobs = [(p, name) for p in prompts for name in names]
    loras = [requests_for("llama", name) for _, name in jobs]
    params = SamplingParams(max_tokens=12, **GREEDY)
    want = token_ids(lora_llm(base, max_loras=3).generate([p for p, _ in jobs], params, lora_request=loras,
                                                          use_tqdm=False))
    assert want[:4] == [hf(base, None if n is None else adapters["llama"][n], [prompts[0]], 12)[0] for n in names]
    llm = lora_llm(base, max_loras=3, speculative_config=ngram)
    steps = record_steps(llm, monkeypatch)
    assert token_ids(llm.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False)) == want
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0, (stats.num_draft_tokens,
                                                                          stats.num_accepted_tokens)
    assert any(lora for s in steps for lora in s.drafted), "no adapter request verified drafts"
    assert_idle(llm)


def test_async_scheduling_with_adapters_equals_sync(tiny_checkpoints: dict[str, str], requests_for,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_checkpoints["llama"]
    names = [None, "all", "qv", "mlp"]
    jobs = [(p, name) for p in PROMPTS for name in names]
    loras = [requests_for("llama", name) for _, name in jobs]
    params = [SamplingParams(max_tokens=n, logprobs=1, **GREEDY) for n in (3, 9, 6, 12) * len(PROMPTS)]
    sync = lora_llm(base, max_loras=2, async_scheduling=False)
    want = sync.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False)
    llm = lora_llm(base, max_loras=2, async_scheduling=True)
    assert llm.engine.async_scheduling is True
    steps = record_steps(llm, monkeypatch)
    have = llm.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False)
    assert token_ids(have) == token_ids(want)
    for a, b in zip(have, want):
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert da.keys() == db.keys() and all(abs(da[t] - db[t]) < 1e-5 for t in da)
    assert all(len(s.adapters) <= 2 for s in steps)
    assert_idle(llm)


def hf_logprobs(base_dir: str, adapter_dir: str | None, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each position of ids (fp32), with the adapter applied."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        apply_adapter(model, adapter_dir)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_prompt_and_sample_logprobs_with_adapters_match_transformers(
        tiny_checkpoints: dict[str, str], adapters, requests_for) -> None:
    base = tiny_checkpoints["qwen3"]
    llm = lora_llm(base)
    names = ["mixed", None, "qv"]
    prompt = PROMPTS[2]
    params = SamplingParams(max_tokens=4, prompt_logprobs=1, logprobs=2, **GREEDY)
    outs = llm.generate([prompt] * 3, params, lora_request=[requests_for("qwen3", n) for n in names],
                        use_tqdm=False)
    worst = 0.0
    for name, out in zip(names, outs):
        sample = out.outputs[0]
        ref = hf_logprobs(base, None if name is None else adapters["qwen3"][name], prompt + sample.token_ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert prompt[i] in entry and int(ref[i - 1].argmax()) in entry, (name, i, entry)
            for t, lp in entry.items():
                worst = max(worst, abs(lp - float(ref[i - 1, t])))
        for j, entry in enumerate(sample.logprobs):
            position = len(prompt) + j - 1
            assert sample.token_ids[j] == int(ref[position].argmax())
            assert set(entry) == set(ref[position].topk(2).indices.tolist()), (name, j, entry)
            for t, lp in entry.items():
                worst = max(worst, abs(lp - float(ref[position, t])))
    assert worst < 1e-4, worst
    # the adapters' prompt logprobs are not the base model's
    for adapted in (outs[0], outs[2]):
        assert any(abs(a[t] - b[t]) > 1e-2 for a, b in zip(adapted.prompt_logprobs[1:], outs[1].prompt_logprobs[1:])
                   for t in a.keys() & b.keys())
    assert_idle(llm)


# =============================================================================================
# 10. chat


def test_chat_with_an_adapter(default_model_dir: str, tmp_path, hf) -> None:
    adapter = save_adapter(str(tmp_path / "chat"), default_model_dir, rank=4, seed=3, scale=0.2,
                           modules=["q_proj", "v_proj", "down_proj"])
    llm = LLM(default_model_dir, enable_lora=True, max_loras=1, max_lora_rank=4, kv_cache_memory_bytes=16 << 20)
    r = LoRARequest("chat", 1, adapter)
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_tokens=4, **GREEDY)
    adapted = llm.chat(conversation, params, lora_request=r, use_tqdm=False)[0]
    plain = llm.chat(conversation, params, use_tqdm=False)[0]
    assert adapted.prompt_token_ids == plain.prompt_token_ids and adapted.lora_request == r
    assert adapted.outputs[0].token_ids == hf(default_model_dir, adapter, [adapted.prompt_token_ids], 4)[0]
    assert adapted.outputs[0].token_ids != plain.outputs[0].token_ids
    assert_idle(llm)
