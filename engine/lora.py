"""LoRA adapters, as vLLM serves them: many fine-tunes of one base model in one batch.

An adapter is a PEFT checkpoint (adapter_config.json, and adapter_model.safetensors or .bin):
for some of the model's projections, a low-rank pair A [r, in], B [out, r]. For the tokens of a
request that runs with it, such a projection computes W x + s B A x, with s = lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA, and alpha_pattern's alpha where it names the module).

Where the weights live:
- `LoRARegistry` (host memory): adapters read from disk, by `lora_int_id`, B scaled by s. An
  adapter is held while a request with it is unfinished, or while pinned (a server's served
  adapters), and up to `max_cpu_loras` are kept after, least recently used dropped first.
- `LoRASlots` (the model's device): `max_loras` slots, each holding one adapter's weights with
  its rank padded to `max_lora_rank` with zeros. A step's adapters are copied into slots not
  used by that step, least recently used first; the scheduler admits at most `max_loras`
  adapters among the running requests, so a step's always fit.

The product (`LoRAProjection`): a projection with k outputs (qkv_proj: q, k, v) keeps every
slot's A side by side, [in, S·k·R], and each output's B stacked, [S·R, out_j]. Each token of a
step names its slot (-1: the base model). A projection then multiplies x by every slot's A at
once, zeroes the columns of slots other than each token's, and adds the product with each B.
Dense products of fixed shapes, no loop over adapters and no host sync, so a CUDA graph
captures it once and replays it for any mix of adapters. The price: every step reads every
slot's A and B, and each token computes k·S·R extra columns (vLLM's punica kernels gather each
token's adapter instead); a captured graph pays it even for a step with no adapter. An eager
step computes only the slots up to its last adapter's (slots fill from the first), and none
without adapters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.sampling_params import is_int

# The projections an adapter may hold (Hugging Face's names), and their parent in a layer; a
# model whose checkpoint fuses q/k/v and gate/up (Phi-3) has those fused modules instead.
LORA_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
FUSED_LORA_MODULES = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}


def lora_modules(config: ModelConfig) -> dict[str, str]:
    """This model's LoRA modules and their parents."""
    return FUSED_LORA_MODULES if config.fused_checkpoint else LORA_MODULES

_TENSOR_NAME = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """vLLM's LoRARequest: an adapter's name, its id (>= 1, unique per adapter) and its
    directory (a PEFT checkpoint)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not is_int(self.lora_int_id) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be a directory path, got {self.lora_path!r}")


@dataclass(slots=True)
class LoRAAdapter:
    request: LoRARequest
    rank: int  # the largest of its modules'
    # (layer, module) → (A [r, in], s·B [out, r]), in the model's dtype, on the host
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    # Where the prefix cache chains its requests' prompts from (Request.prefix_root), named by
    # what was read (its config and tensors): an id given to other weights, or files rewritten
    # in place, never meet this one's KV; the same adapter read again keeps its cached prefixes.
    prefix_root: int = 0


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each of this model's LoRA modules' (in, out) features (`lora_modules`)."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
              "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i)}
    return {module: shapes[module] for module in lora_modules(config)}


def _content_root(config_bytes: bytes, tensors: dict[str, torch.Tensor]) -> int:
    """A negative number named by an adapter's content (a 60-bit digest: never a prefix serial,
    which are >= 0, and two adapters' never meet)."""
    digest = hashlib.sha256(config_bytes)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return -1 - int(digest.hexdigest()[:15], 16)


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(safetensors_path):
            from safetensors.torch import load_file

            return load_file(safetensors_path)
        if os.path.isfile(bin_path):
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)  # tensors only: nothing executes
            if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise TypeError("not a dict of tensors")
            return tensors
    except Exception as exc:  # noqa: BLE001 - each library has errors of its own; all mean "not readable"
        raise ValueError(f"LoRA adapter {path!r}: its weights are not readable ({type(exc).__name__}: {exc})"[:1000]) \
            from None
    raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors or adapter_model.bin")


def _alpha(config: dict, module_name: str) -> float:
    """PEFT's alpha for a module: the first alpha_pattern key that names it (a suffix of its
    dotted name, as a regex), else lora_alpha."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(^|.*\.){pattern}$", module_name):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def load_adapter(request: LoRARequest, model_config: ModelConfig, max_rank: int,
                 dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Read a PEFT LoRA checkpoint for this model (its weights kept in `dtype`); ValueError
    naming what does not fit (a module the model does not have or shapes that differ, a rank
    over max_rank, weights that are not finite, or a PEFT feature stoke does not compute:
    DoRA, biases, modules_to_save, embeddings), and for any file it can't make sense of."""
    try:
        return _load_adapter(request, model_config, max_rank, dtype)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed file (a bad regex, a wrong type) is bad input too
        raise ValueError(f"LoRA adapter {request.lora_path!r} is malformed ({type(exc).__name__}: {exc})"[:1000]) \
            from None


def _load_adapter(request: LoRARequest, model_config: ModelConfig, max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    path = os.path.expanduser(request.lora_path)
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json")
    try:
        with open(config_path, "rb") as f:
            config_bytes = f.read()
        config = json.loads(config_bytes)
    except (OSError, ValueError) as exc:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not a JSON object")
    refusals = {
        "peft_type": config.get("peft_type", "LORA") not in ("LORA", None),
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") not in ("none", None),
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    for key, refused in refusals.items():
        if refused:
            raise ValueError(f"LoRA adapter {path!r}: {key}={config[key]!r} is not supported "
                             "(stoke serves plain LoRA on the attention and MLP projections)")
    shapes, modules = module_shapes(model_config), lora_modules(model_config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    tensors = _read_tensors(path)
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None or match.group(3) not in modules or modules[match.group(3)] != match.group(2):
            raise ValueError(f"LoRA adapter {path!r}: tensor {name!r} is not a LoRA weight of a projection stoke "
                             f"adapts in this model ({', '.join(modules)}; embeddings, the LM head and biases "
                             "are not)")
        layer = int(match.group(1))
        if layer >= model_config.num_layers:
            raise ValueError(f"LoRA adapter {path!r}: tensor {name!r} is for layer {layer}, and the model has "
                             f"{model_config.num_layers}")
        if match.group(2) == "mlp" and model_config.moe is not None and layer in model_config.moe.sparse_layers:
            raise ValueError(f"LoRA adapter {path!r}: tensor {name!r} adapts layer {layer}'s MLP, which is a "
                             "mixture of experts here: stoke adapts its attention projections only")
        pairs.setdefault((layer, match.group(3)), {})[match.group(4)] = tensor
    if not pairs:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), pair in sorted(pairs.items()):
        where = f"LoRA adapter {path!r}, layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where}: has lora_{next(iter(pair))} without lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the model's "
                             f"[r, {fan_in}] and [{fan_out}, r]")
        r = a.shape[0]
        if r < 1:
            raise ValueError(f"{where}: rank {r} (a module's rank is at least 1)")
        if r > max_rank:
            raise ValueError(f"{where}: rank {r} exceeds max_lora_rank {max_rank}")
        alpha = _alpha(config, f"model.layers.{layer}.{modules[module]}.{module}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        a, b = a.float().to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous()
        # Every slot's B multiplies every token's (masked) columns: a NaN or inf, even one from
        # the cast to the model's dtype, would not stay in its own rows (0 × inf is NaN).
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{where}: weights hold NaN or infinity (in {str(dtype).removeprefix('torch.')})")
        weights[layer, module] = (a, b)
    return LoRAAdapter(request, max(a.shape[0] for a, _ in weights.values()), weights,
                       _content_root(config_bytes, tensors))


class LoRARegistry:
    """The adapters in host memory, by lora_int_id (see the module docstring)."""

    def __init__(self, model_config: ModelConfig, max_lora_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype = torch.float32) -> None:
        """dtype: the model's, which the adapters' weights are kept in."""
        self.model_config = model_config
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()  # least recently used first
        self.users: Counter[int] = Counter()  # unfinished requests holding each adapter, and pins
        self.pinned: set[int] = set()  # never dropped while pinned (a server's served adapters)
        self.dropping: set[int] = set()  # removed while in use: dropped when their last request finishes

    def add(self, request: LoRARequest, hold: bool = False, read: LoRAAdapter | None = None) -> LoRAAdapter:
        """The adapter of `request`, read from disk unless it is loaded (ValueError if it can't
        be served, or if its id is loaded under another name or path); `hold`: as `acquire`;
        `read`: the adapter already read (by `load_adapter`, off the step loop)."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"a LoRA request must be a LoRARequest, got {type(request).__name__}")
        adapter = self.adapters.get(request.lora_int_id)
        if adapter is not None:
            if adapter.request != request:
                raise ValueError(f"lora_int_id {request.lora_int_id} is loaded as {adapter.request.lora_name!r} "
                                 f"from {adapter.request.lora_path!r}: one id names one adapter")
            self.adapters.move_to_end(request.lora_int_id)
            self.dropping.discard(request.lora_int_id)  # added again: no longer on its way out
        else:
            if read is not None and read.request != request:
                raise ValueError(f"the adapter read is {read.request}, not {request}")
            adapter = read or load_adapter(request, self.model_config, self.max_lora_rank, self.dtype)
            self.adapters[request.lora_int_id] = adapter
        if hold:
            self.users[request.lora_int_id] += 1
        self._evict()
        return adapter

    def acquire(self, request: LoRARequest) -> LoRAAdapter:
        """`add`, held until `release`: a request with this adapter is unfinished."""
        return self.add(request, hold=True)

    def release(self, lora_id: int) -> None:
        self.users[lora_id] -= 1
        if self.users[lora_id] <= 0:
            del self.users[lora_id]
            if lora_id in self.dropping:
                self.dropping.discard(lora_id)
                self.adapters.pop(lora_id, None)
            self._evict()

    def pin(self, lora_id: int) -> bool:
        """Keep a loaded adapter in memory whatever max_cpu_loras says, until `remove` (vLLM's
        pin_lora); False if it is not loaded."""
        if lora_id not in self.adapters:
            return False
        if lora_id not in self.pinned:
            self.pinned.add(lora_id)
            self.users[lora_id] += 1
        self.dropping.discard(lora_id)
        return True

    def remove(self, lora_id: int) -> bool:
        """Drop a loaded adapter, pinned or not (vLLM's remove_lora). While requests use it, it
        is dropped when the last of them finishes, and this returns False (as when it is not
        loaded)."""
        if lora_id not in self.adapters:
            return False
        if lora_id in self.pinned:
            self.pinned.discard(lora_id)
            self.release(lora_id)
        if self.users[lora_id]:
            self.dropping.add(lora_id)
            return False
        del self.users[lora_id]
        self.adapters.pop(lora_id, None)
        return True

    def get(self, lora_id: int) -> LoRAAdapter:
        return self.adapters[lora_id]

    def _evict(self) -> None:
        """Past max_cpu_loras, drop adapters no request holds, least recently used first; never
        the one just used (a request is about to hold it)."""
        idle = [i for i in list(self.adapters)[:-1] if not self.users[i]]
        for lora_id in idle[:max(0, len(self.adapters) - self.max_cpu_loras)]:
            del self.adapters[lora_id]


class LoRAState:
    """The step's adapter slot of every token (-1: none), shared by every LoRA projection of a
    model; a static buffer, so a CUDA graph reads each replay's."""

    def __init__(self, max_loras: int, max_tokens: int, device: torch.device) -> None:
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.long, device=device)
        self.slot_ids = torch.arange(max_loras, device=device)
        # False: no token of this step has an adapter, and eager steps skip the products.
        self.active = True
        # The leading slots an eager step computes (those its adapters are in: slots fill from
        # the first); a captured graph computes them all (max_loras, what it was captured with).
        self.num_slots = max_loras
        self.mask: torch.Tensor | None = None  # [T, S]: token t runs with slot s

    def begin(self, num_tokens: int) -> None:
        """At the start of a forward over num_tokens tokens (inside a graph, when captured)."""
        self.mask = self.token_slots[:num_tokens, None] == self.slot_ids


class LoRAProjection:
    """One projection's adapter slots and their product (see the module docstring). `outputs`:
    (module, first, end column) of each output the projection fuses, in order."""

    def __init__(self, state: LoRAState, in_features: int, outputs: list[tuple[str, int, int]], max_loras: int,
                 max_rank: int, device: torch.device, dtype: torch.dtype) -> None:
        self.state = state
        self.outputs = outputs
        self.max_loras, self.max_rank = max_loras, max_rank
        k, s, r = len(outputs), max_loras, max_rank
        # slot by slot, each its outputs' A side by side: the leading slots' columns are one block
        self.a = torch.zeros(in_features, s * k * r, device=device, dtype=dtype)
        self.b = [torch.zeros(s * r, end - start, device=device, dtype=dtype) for _, start, end in outputs]

    def load(self, slot: int, layer: int, adapter: LoRAAdapter | None) -> None:
        """Put `adapter`'s weights for this projection in `slot` (zeros where it has none)."""
        k, r = len(self.outputs), self.max_rank
        for j, (module, _, _) in enumerate(self.outputs):
            col, row = (slot * k + j) * r, slot * r
            self.a[:, col:col + r].zero_()
            self.b[j][row:row + r].zero_()
            pair = None if adapter is None else adapter.weights.get((layer, module))
            if pair is not None:
                a, b = pair
                rank = a.shape[0]
                self.a[:, col:col + rank].copy_(a.T)
                self.b[j][row:row + rank].copy_(b.T)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base projection of x, [T, out]) plus each token's adapter's product."""
        t, k, r, n = x.shape[0], len(self.outputs), self.max_rank, self.state.num_slots
        shrunk = (x @ self.a[:, :n * k * r]).view(t, n, k, r)
        # where, not a product with the mask: another slot's inf (an fp16 overflow) times 0 is NaN
        shrunk = torch.where(self.state.mask[:, :n, None, None], shrunk, 0.0)
        for j, (_, start, end) in enumerate(self.outputs):
            y[:, start:end].addmm_(shrunk[:, :, j].reshape(t, n * r), self.b[j][:n * r])
        return y


class LoRASlots:
    """The model's adapter slots on its device, and which adapter each holds."""

    def __init__(self, model: torch.nn.Module, registry: LoRARegistry, max_loras: int, max_tokens: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.registry = registry
        self.state = LoRAState(max_loras, max_tokens, device)
        self.projections: list[tuple[int, LoRAProjection]] = []
        for layer, linear, outputs in model.lora_projections():
            projection = LoRAProjection(self.state, linear.in_features, outputs, max_loras,
                                        registry.max_lora_rank, device, dtype)
            linear.lora = projection
            self.projections.append((layer, projection))
        model.lora_state = self.state
        # The adapter in each slot (None: empty). Compared by identity: an adapter dropped from
        # the registry and read again (perhaps changed on disk) is loaded again.
        self.held: list[LoRAAdapter | None] = [None] * max_loras
        self.last_used = [0] * max_loras
        self._clock = 0

    def slots_for(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """Each adapter's slot for a step, loading those not in one into slots the step does not
        use (empty ones first, then the least recently used)."""
        wanted = {lora_id: self.registry.get(lora_id) for lora_id in lora_ids}
        self._clock += 1
        slot_of = {id(adapter): s for s, adapter in enumerate(self.held) if adapter is not None}
        missing = [i for i, adapter in sorted(wanted.items()) if id(adapter) not in slot_of]
        if missing:
            used = {slot_of[id(a)] for a in wanted.values() if id(a) in slot_of}
            spare = sorted((s for s in range(len(self.held)) if s not in used),
                           key=lambda s: (self.held[s] is not None, self.last_used[s]))
            if len(missing) > len(spare):
                raise RuntimeError(f"a step with {len(wanted)} LoRA adapters, and {len(self.held)} slots")
            for lora_id, slot in zip(missing, spare):
                adapter = wanted[lora_id]
                for layer, projection in self.projections:
                    projection.load(slot, layer, adapter)
                self.held[slot] = adapter
                slot_of[id(adapter)] = slot
        slots = {}
        for lora_id, adapter in wanted.items():
            slot = slot_of[id(adapter)]
            self.last_used[slot] = self._clock
            slots[lora_id] = slot
        return slots
