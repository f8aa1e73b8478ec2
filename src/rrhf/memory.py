"""Peak device memory of each stage of a run, planned from the config before any model is loaded.

    python -m rrhf.memory model=llama trainer.peft=lora               # a table: stage, model, weights, ...
    python -m rrhf.memory --world-size 8 model=llama trainer=fsdp      # per rank of an 8-process launch

`estimate(cfg)` gives, for every stage of `rrhf.pipeline.run` that puts a model on the device (sample, score,
train, evaluate), the bytes one device (one rank) holds at the stage's peak: weights, gradients, optimiser state
and activations, each an itemised sum of simple terms, plus a safety margin. `check_fits(cfg)` refuses, with one
`DoesNotFit` naming the stage, the estimate, the device's memory and the settings that would bring it under (each
re-estimated), a config whose estimate exceeds the device: the GPU's memory when the run uses CUDA, or the
config's `device_memory_gib`. A CPU run without that key is only reported.

Parameter counts are exact: the model's config.json is read (a local folder, `embedded:*`, or a Hub id in the
local Hugging Face cache) and the model built on the meta device, which allocates no weights. Everything else is
an estimate from the shapes, with these simplifications, each stated where it is made:
- the terms of a phase are summed (gradients, for instance, grow while activations are freed during backward);
  with gradient accumulation both do coexist, so the sum is a mild upper bound rather than a guess;
- sequence lengths are the configured maxima (every response as long as allowed), so real batches use less;
- activations are counted for LLaMA-like decoder blocks with sdpa attention (the default implementation, which
  keeps no (tokens x tokens) scores); other architectures are approximated by the same formula;
- the margin covers what torch's allocator statistics do not see or cannot avoid: the CUDA context, cuBLAS and
  NCCL workspaces (a fixed 1 GiB) and the caching allocator's fragmentation (10% of the estimate).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from rrhf import PROJECT_ROOT, ConfigError

log = logging.getLogger(__name__)

GIB = 2**30
# The CUDA context (about 0.3-0.6 GiB with torch's kernels loaded), cuBLAS workspaces and NCCL buffers: memory the
# device loses that no tensor accounts for.
MARGIN_FIXED = 1 * GIB
# The caching allocator rounds blocks up and cannot always reuse freed ones (fragmentation); 10% is a common
# allowance for steady training loops.
MARGIN_FRACTION = 0.10
COMPONENTS = ("weights", "grads", "optimizer", "activations")
ADAPTERS = ("none", "lora", "qlora")
# peft's LoraConfig default rank, used when trainer.lora names no `r`.
DEFAULT_LORA_RANK = 8
# QLoRA (Dettmers et al., 2023, section 3): NF4 stores 4 bits a parameter, and double quantisation brings the
# quantisation constants (one absmax per 64 weights) from 0.5 to 0.127 bits a parameter.
NF4_BYTES = (4 + 0.127) / 8
# rrhf.logprobs takes the log-sum-exp over the vocabulary in chunks of this many positions (its _LSE_CHUNK).
LSE_CHUNK = 512


class DoesNotFit(ConfigError):
    """A stage's estimated peak memory exceeds the device's; the message names the fixes, each re-estimated."""


class ModelConfigMissing(LookupError):
    """A model's config.json cannot be read offline: the stages that hold that model are not estimated."""


# ------------------------------------------------------------------------------------------------ model shapes


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config.json and its meta-device build."""

    name: str  # the model path as the config gives it
    params: int  # every parameter, a tied matrix once
    matmul_params: int  # parameters of Linear / Conv1D layers (what autocast casts and bitsandbytes quantises)
    lm_head_params: int  # the output projection's weight (also counted in matmul_params when tied)
    block_params: int  # one decoder block (the largest)
    layers: int
    hidden: int
    intermediate: int
    q_dim: int  # attention heads x head size
    kv_dim: int  # key/value heads x head size (grouped-query attention keeps fewer)
    vocab: int
    model_type: str
    tied: bool = False  # the output projection shares the input embedding's matrix
    # (qualified name, in features, out features) of every Linear / Conv1D layer, the output projection included
    linears: tuple[tuple[str, int, int], ...] = ()
    lm_head_name: str = "lm_head"

    @property
    def root_params(self) -> int:
        """What is outside the decoder blocks: embeddings, final norm, an untied output projection."""
        return self.params - self.layers * self.block_params


def _config_folder(path: str, key: str) -> Path:
    """The local folder holding the config.json of a model path, without downloading anything."""
    from rrhf import hub
    from rrhf.assets import EMBEDDED, resolve_model

    if path in EMBEDDED:
        # An embedded model is converted once from its wheel into the asset cache (offline); the run does the same.
        try:
            folder = Path(resolve_model(path))
        except RuntimeError as error:  # its wheel is not installed
            raise ModelConfigMissing(f"{key}={path!r}: {error}") from None
    elif str(path).startswith("embedded:"):
        raise ConfigError(f"{key}={path!r}: unknown embedded model; known: {sorted(EMBEDDED)}")
    elif hub.is_hub_id(path):
        try:
            folder = hub.snapshot(str(path))
        except hub.HubItemsMissing:
            raise ModelConfigMissing(
                f"{key}={path!r}: its config.json is not in the local Hugging Face cache ({hub.cache_dir()}); "
                f"`python -m rrhf.hub fetch <overrides>` fetches it"
            ) from None
    else:
        folder = Path(str(path)).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelConfigMissing(f"{key}={path!r}: no config.json in {folder}")
    return folder


def _first(config: Any, names: Iterable[str], default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@functools.lru_cache(maxsize=32)
def _shape_of(folder: str, stamp: int, kind: str, trust_remote_code: bool, name: str) -> ModelShape:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    build = {
        "causal_lm": AutoModelForCausalLM,
        "sequence_classifier": AutoModelForSequenceClassification,
        "backbone": AutoModel,
    }[kind]
    with init_empty_weights():  # meta tensors: shapes without memory, seconds even for a 7B model
        model = build.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_first(text, ("hidden_size", "n_embd", "d_model", "dim")))
    heads = int(_first(text, ("num_attention_heads", "n_head", "n_heads")))
    head_dim = int(_first(text, ("head_dim",), hidden // heads))
    kv_heads = int(_first(text, ("num_key_value_heads",), heads))
    output = model.get_output_embeddings() if kind == "causal_lm" else None
    linears, matmul, lm_head_name = [], 0, ""
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append((module_name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # GPT-2's projections: weight (in, out)
            linears.append((module_name, module.weight.shape[0], module.weight.shape[1]))
        else:
            continue
        matmul += sum(p.numel() for p in module.parameters(recurse=False))
        if module is output:
            lm_head_name = module_name
    blocks = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0),
        key=lambda m: sum(p.numel() for p in m.parameters()),
        default=None,
    )
    block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0) if blocks else 0
    return ModelShape(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        matmul_params=matmul,
        lm_head_params=output.weight.numel() if output is not None else 0,
        block_params=block_params,
        layers=len(blocks) if blocks is not None else 0,
        hidden=hidden,
        intermediate=int(_first(text, ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim"), 4 * hidden)),
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        vocab=int(_first(text, ("vocab_size",), 0)),
        model_type=str(getattr(text, "model_type", config.model_type)),
        tied=output is not None and output.weight is model.get_input_embeddings().weight,
        linears=tuple(linears),
        lm_head_name=lm_head_name,
    )


def model_shape(
    path: str, *, key: str = "model.path", kind: str = "causal_lm", trust_remote_code: bool = False
) -> ModelShape:
    """The shape of the model at a config's model path (ModelConfigMissing when its config.json is not here).

    `kind`: causal_lm (policies, judges), sequence_classifier (reward.path), backbone (GPT-J's transformer alone,
    for gptj-rm-static, whose value head `rrhf.reward` adds).
    """
    folder = _config_folder(str(path), key)
    stamp = (folder / "config.json").stat().st_mtime_ns
    return _shape_of(str(folder.resolve()), stamp, kind, bool(trust_remote_code), str(path))


# ----------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Adapter:
    """trainer.peft: none (full fine-tuning), lora or qlora; the LoRA rank, dropout and targeted layers."""

    method: str = "none"
    r: int = DEFAULT_LORA_RANK
    # Names (a layer is targeted when its qualified name ends with one), "all-linear", or None: peft's default for
    # the architecture.
    target_modules: tuple[str, ...] | str | None = None
    dropout: float = 0.0


@dataclass(frozen=True)
class StageEstimate:
    """One stage's planned peak on one device (rank).

    `components` holds the bytes by component (weights, grads, optimizer, activations); `terms` itemises them as
    (component, what, bytes); `total` adds the margin. A stage whose model config is not available offline has
    no estimate: `total` is None and `skipped` says why.
    """

    stage: str
    model: str
    components: dict[str, int] = field(default_factory=dict)
    terms: tuple[tuple[str, str, int], ...] = ()
    notes: tuple[str, ...] = ()
    skipped: str | None = None

    @property
    def subtotal(self) -> int | None:
        """The tensors' bytes without the margin: what torch.cuda.max_memory_allocated would be compared with."""
        return None if self.skipped else sum(self.components.values())

    @property
    def margin(self) -> int | None:
        return None if self.skipped else MARGIN_FIXED + int(MARGIN_FRACTION * self.subtotal)

    @property
    def total(self) -> int | None:
        return None if self.skipped else self.subtotal + self.margin


class _Terms:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, int]] = []

    def add(self, component: str, what: str, nbytes: float) -> None:
        if component not in COMPONENTS:
            raise ValueError(component)
        if nbytes > 0:
            self.items.append((component, what, int(math.ceil(nbytes))))

    def extend(self, other: _Terms) -> None:
        self.items += other.items

    def total(self) -> int:
        return sum(b for _, _, b in self.items)

    def stage(self, stage: str, model: str, notes: Iterable[str] = ()) -> StageEstimate:
        components = {c: sum(b for k, _, b in self.items if k == c) for c in COMPONENTS}
        return StageEstimate(stage, model, components, tuple(self.items), tuple(notes))


def _block_activations(shape: ModelShape, residual: int, compute: int) -> int:
    """Bytes one decoder block keeps for backward, per token (transformers' LLaMA forward, sdpa attention).

    residual: bytes of the residual stream (fp32 when the weights are fp32 under autocast); compute: bytes of the
    matmul outputs (2 under bf16 autocast). For scale: Korthikanti et al. (2022, "Reducing Activation Recomputation
    in Large Transformer Models", section 4.1) count 34 x hidden bytes a token a layer for GPT with fp16 and
    without attention scores; LLaMA's gated MLP and fp32 norms make this larger.
    """
    # Two RMSNorms: each keeps its input upcast to fp32 and its normalised output in the residual's dtype.
    norms = 2 * (4 + residual) * shape.hidden
    # Attention: the projections' input; q, k, v; q and k after the rotary embedding; the attention output
    # (sdpa keeps it, and it is the output projection's input).
    attention = compute * (shape.hidden + 3 * shape.q_dim + 3 * shape.kv_dim)
    # Gated MLP: its input; gate and up projections; SiLU(gate); their product (the down projection's input).
    mlp = compute * (shape.hidden + 4 * shape.intermediate)
    return norms + attention + mlp


def _forward_transient(shape: ModelShape, tokens: int, nbytes: int) -> int:
    """The widest live tensors of one block in a forward without autograd: the residual, the normalised input,
    the attention output, and the MLP's gate, up and product (what inference holds at once, layer by layer)."""
    return tokens * nbytes * (3 * shape.hidden + 3 * shape.intermediate)


def _kv_cache(shape: ModelShape, sequences: int, length: int, nbytes: int) -> int:
    # Keys and values of every layer for every position of every sequence (transformers' DynamicCache).
    return 2 * shape.layers * shape.kv_dim * sequences * length * nbytes


def _targets(shape: ModelShape, adapter: Adapter) -> list[tuple[str, int, int]]:
    """The Linear / Conv1D layers LoRA adapts (peft's matching: a name equal to, or ending in '.' + a target)."""
    targets = adapter.target_modules
    if targets is None:
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
        except ImportError:
            raise ConfigError(
                "trainer.lora.target_modules=null: peft's default targets need the peft package; install it or "
                "name the layers, e.g. trainer.lora.target_modules=[q_proj,v_proj]"
            ) from None
        if shape.model_type not in DEFAULTS:
            raise ConfigError(
                f"trainer.lora.target_modules=null: peft has no default target layers for model type "
                f"{shape.model_type!r}; name them, e.g. trainer.lora.target_modules=[q_proj,v_proj]"
            )
        targets = tuple(DEFAULTS[shape.model_type])
    if targets == "all-linear":  # peft: every linear layer but the output projection
        return [t for t in shape.linears if t[0] != shape.lm_head_name]
    if isinstance(targets, str):
        import re

        return [t for t in shape.linears if re.fullmatch(targets, t[0])]
    chosen = [t for t in shape.linears if any(t[0] == n or t[0].endswith("." + n) for n in targets)]
    if not chosen:
        raise ConfigError(
            f"trainer.lora.target_modules={list(targets)}: no layer of {shape.name} matches; its linear layers "
            f"include {sorted({n.rsplit('.', 1)[-1] for n, _, _ in shape.linears})}"
        )
    return chosen


@dataclass(frozen=True)
class Training:
    """How a training step holds the model: precision, adapter, sharding."""

    accelerator: bool = True  # on a GPU or a CPU
    mixed_precision: bool = True  # bf16 (or fp16) autocast: matmul outputs in 2 bytes
    adapter: Adapter = Adapter()
    checkpointing: bool = False
    profile: str = "single"  # single | ddp | fsdp | zero2 | zero3
    world_size: int = 1
    bf16: bool = True  # the mixed precision is bf16 (False: fp16)

    @property
    def bf16_lora_base(self) -> bool:
        """Whether a LoRA base is stored in bf16: on a GPU training in bf16 (rrhf.adapters.base_dtype); fp32
        elsewhere. (DeepSpeed casts the whole module to bf16 whatever it is loaded in: see the zero profiles.)"""
        return self.adapter.method == "lora" and self.accelerator and self.mixed_precision and self.bf16


def _weights_and_state(shape: ModelShape, how: Training, trainable_blocks: int | None = None) -> _Terms:
    """Weights, gradients and AdamW state on one rank. `trainable_blocks`: PPO's top unfrozen blocks (None: all)."""
    t, n = _Terms(), max(1, how.world_size)
    adapter = how.adapter.method
    if adapter != "none":
        targets = _targets(shape, how.adapter)
        lora = sum(how.adapter.r * (i + o) for _, i, o in targets)
        sharded = how.profile in ("fsdp", "zero3")
        if how.profile in ("zero2", "zero3"):
            # DeepSpeed runs the whole module in bf16, the frozen base included.
            base, what = 2 * shape.params, "frozen base (bf16 under DeepSpeed)"
        elif how.bf16_lora_base:
            # rrhf.adapters.base_dtype: on a GPU training in bf16 the frozen base is stored in bf16 (it takes no
            # updates; peft / TRL's recipe), so autocast has nothing to cast and keeps no copies of it.
            base, what = 2 * shape.params, "frozen base (bf16: a GPU training in bf16)"
        elif adapter == "lora":
            # rrhf.adapters.base_dtype: elsewhere (a CPU, fp16 or fp32 training) a LoRA base is loaded in fp32.
            base, what = 4 * shape.params, "frozen base (fp32)"
        else:
            # bitsandbytes quantises every linear layer but the output projection to NF4; peft's
            # prepare_model_for_kbit_training (rrhf.adapters) keeps the rest (embeddings, norms, head) in fp32.
            quantised = shape.matmul_params - shape.lm_head_params
            base = quantised * NF4_BYTES + (shape.params - quantised) * 4
            what = "frozen base (NF4 + double-quant constants; embeddings, norms, head fp32)"
        t.add("weights", what + (f" / {n} ranks" if sharded and n > 1 else ""), base / (n if sharded else 1))
        if how.bf16_lora_base and how.profile == "fsdp":
            # FSDP gathers one unit (a decoder block, or the root's embeddings) at a time, plus the next prefetched.
            unit = max(shape.block_params, shape.root_params)
            t.add("weights", "gathered parameters: 2 units (bf16)", 2 * 2 * unit)
        if how.mixed_precision and how.profile not in ("zero2", "zero3") and not how.bf16_lora_base:
            # A frozen fp32 weight is cast to bf16 at each matmul under autocast, and the matmul keeps that cast
            # for backward (the gradient to its input needs it); 4-bit layers de-quantise again in backward.
            cast = shape.lm_head_params if adapter == "qlora" else shape.matmul_params
            if how.checkpointing and adapter == "lora":
                cast = shape.block_params + shape.lm_head_params  # only the block being recomputed keeps them
            t.add("weights", "bf16 casts of the frozen matmul weights, kept for backward", 2 * cast)
        # Adapters A (r x in) and B (out x r) per targeted layer, fp32 (peft keeps adapters in fp32 by default).
        state_ranks = n if how.profile in ("fsdp", "zero2", "zero3") else 1
        label = f"LoRA adapters r={how.adapter.r} on {len(targets)} layers, fp32 ({lora:,} params)"
        t.add("weights", label, 4 * lora / (n if sharded else 1))
        t.add("grads", "adapter gradients (fp32)", 4 * lora / state_ranks)
        t.add("optimizer", "AdamW moments of the adapters (2 x fp32)", 8 * lora / state_ranks)
        if adapter == "qlora":
            # One linear layer's weight de-quantised to bf16 while it computes.
            widest = max(i * o for name, i, o in shape.linears if name != shape.lm_head_name)
            t.add("activations", "one de-quantised linear weight (bf16)", 2 * widest)
        return t

    p = shape.params
    trainable, matmul = p, shape.matmul_params
    if trainable_blocks is not None:
        # PPO freezes the blocks below the top ones and the input embeddings; an untied output projection trains.
        untied = 0 if shape.tied else shape.lm_head_params
        trainable = matmul = trainable_blocks * shape.block_params + untied
    if how.profile in ("zero2", "zero3"):
        # DeepSpeed with bf16 (Rajbhandari et al., 2020, "ZeRO", section 5 and figure 1): 2 bytes of bf16 weights,
        # 2 of bf16 gradients and K = 12 of optimiser state (fp32 master copy + two AdamW moments) a parameter;
        # ZeRO-2 shards the gradients and the state across the ranks, ZeRO-3 the weights as well.
        if how.profile == "zero3":
            t.add("weights", f"bf16 weights / {n} ranks", 2 * p / n)
            # Gathered parameters: the running block and the prefetched next one (stage3_max_live_parameters is
            # far larger), the embeddings when they are the largest unit.
            unit = max(shape.block_params, shape.root_params)
            t.add("weights", "gathered parameters: 2 units (bf16)", 2 * 2 * unit)
        else:
            t.add("weights", "bf16 weights", 2 * p)
            # ZeRO-2's all-gather bucket of the updated weights (allgather_bucket_size 5e8 elements, zero2.json).
            t.add("grads", "all-gather bucket (5e8 x bf16)", min(2 * 5e8, 2 * p))
        t.add("grads", f"bf16 gradients / {n} ranks", 2 * trainable / n)
        t.add("optimizer", f"fp32 master weights + AdamW moments (12 bytes) / {n} ranks", 12 * trainable / n)
        return t
    weight_bytes = 4  # the train stage loads fp32 weights (rrhf.training): bf16 weights lose small updates
    if how.profile == "fsdp":
        # FSDP full_shard: each rank keeps 1/n of the fp32 weights, gradients and AdamW state, and gathers one unit
        # (a decoder block, or the root's embeddings) at a time, plus the next one prefetched, with its gradient.
        unit = max(shape.block_params, shape.root_params)
        t.add("weights", f"fp32 weights / {n} ranks", weight_bytes * p / n)
        t.add("weights", "gathered parameters: 2 units (fp32)", 2 * 4 * unit)
        t.add("grads", f"fp32 gradients / {n} ranks", 4 * trainable / n)
        t.add("grads", "one unit's unsharded gradient (fp32)", 4 * unit)
        t.add("optimizer", f"AdamW moments (2 x fp32) / {n} ranks", 8 * trainable / n)
        return t
    t.add("weights", "fp32 weights", weight_bytes * p)
    if how.mixed_precision:
        # torch.autocast caches the bf16 cast of every trainable weight a matmul uses until the forward ends, and
        # backward keeps it until each layer's gradient is done.
        t.add("weights", "bf16 copies autocast keeps of the matmul weights", 2 * matmul)
    t.add("grads", "fp32 gradients", 4 * trainable)
    if how.profile == "ddp" and n > 1:
        # DDP's gradient buckets are a second copy of the gradients (gradient_as_bucket_view is off).
        t.add("grads", "DDP gradient buckets (fp32)", 4 * trainable)
    # AdamW's two fp32 moments (the Trainer's default adamw_torch_fused needs no temporaries of that size).
    t.add("optimizer", "AdamW moments (2 x fp32)", 8 * trainable)
    return t


def training_step(
    shape: ModelShape,
    *,
    tokens: int,
    scored: int,
    how: Training = Training(),
    objective: str = "rrhf",
    trainable_blocks: int | None = None,
    mask_rows: int = 0,
    stage: str = "train step",
) -> StageEstimate:
    """One optimiser step's peak: weights, gradients, AdamW state, and the activations of `tokens` tokens of which
    `scored` have logits over the vocabulary (RRHF's response tokens; every token for the lm objective).

    objective: rrhf (rrhf.logprobs: logits of the scored positions, chunked fp32 log-sum-exp), lm (the stock
    Trainer's cross entropy, which upcasts every logit to fp32), ppo (rrhf.ppo: fp32 log-softmax of the response
    positions). `trainable_blocks`: PPO's unfrozen top blocks; the frozen ones below keep no activations.
    `mask_rows`: rows of the shared layout, whose (rows, T, T) block mask the tokens split into (0: none).
    """
    t = _weights_and_state(shape, how, trainable_blocks)
    compute = 2 if how.mixed_precision else 4
    # The residual stream takes the embeddings' dtype: fp32 (full training, a LoRA base on a CPU, QLoRA's fp32
    # embeddings), bf16 under DeepSpeed, which casts the module, and for a bf16 LoRA base (a GPU training in bf16).
    residual = 2 if how.profile in ("zero2", "zero3") or how.bf16_lora_base else 4
    per_block = _block_activations(shape, residual, compute)
    if how.adapter.method != "none":
        # Each targeted layer's adapter path keeps its own cast of the layer's input for A's gradient; with
        # lora_dropout > 0 also the dropout mask (a byte an element from CUDA's fused dropout, an fp32 mask on a
        # CPU). The dropped-out input itself is freed once cast.
        inputs = sum(i for _, i, _ in _targets(shape, how.adapter)) / max(1, shape.layers)
        mask = (1 if how.accelerator else 4) if how.adapter.dropout > 0 else 0
        per_block += int(inputs * (compute + mask))
    blocks = shape.layers if trainable_blocks is None or how.adapter.method != "none" else trainable_blocks
    if how.checkpointing:
        # Gradient checkpointing keeps each block's input only and recomputes one block at a time in backward.
        t.add(
            "activations",
            f"block inputs of {blocks} blocks x {tokens} tokens",
            blocks * tokens * residual * shape.hidden,
        )
        t.add("activations", "one block recomputed in backward", tokens * per_block)
    else:
        t.add("activations", f"{blocks} blocks x {tokens} tokens", blocks * tokens * per_block)
    t.add("activations", "embeddings' output and final norm", tokens * shape.hidden * (residual + 4 + residual))
    if mask_rows:
        # rrhf.logprobs' shared layout passes a (rows, T, T) boolean block mask; attention turns it into an additive
        # one in the compute dtype in every block, which backward keeps.
        square = mask_rows * (tokens // mask_rows) ** 2
        t.add("activations", f"block attention masks ({mask_rows} rows)", square * (1 + compute * shape.layers))
    logits = scored * shape.vocab
    if objective == "rrhf":
        # The scored positions' logits, and the gradients reaching them through the picked tokens and through the
        # normaliser; the log-sum-exp upcasts LSE_CHUNK positions at a time (and its backward as many).
        t.add("activations", f"logits of {scored} scored positions and their gradients", 3 * compute * logits)
        t.add("activations", "fp32 log-sum-exp chunks", 2 * 4 * min(scored, LSE_CHUNK) * shape.vocab)
    elif objective == "lm":
        # transformers' ForCausalLMLoss upcasts the logits to fp32; cross entropy keeps its fp32 log-softmax, and
        # backward makes an fp32 gradient of the same size.
        t.add("activations", f"logits of {scored} positions, fp32 copy, log-softmax, gradient", (compute + 12) * logits)
    elif objective == "ppo":
        # The response positions' logits, their gathered copy, fp32 log-softmax and its gradient.
        t.add(
            "activations",
            f"logits of {scored} response positions, fp32 log-softmax, gradients",
            (2 * compute + 12) * logits,
        )
    else:
        raise ValueError(f"objective must be rrhf, lm or ppo, got {objective!r}")
    return t.stage(stage, shape.name)


def _inference(
    shape: ModelShape,
    *,
    weight_bytes: int,
    sequences: int,
    prompt_tokens: int,
    new_tokens: int,
    what: str = "generation",
) -> _Terms:
    """A model generating `new_tokens` after `prompt_tokens` for `sequences` sequences at once (beams counted),
    or, with new_tokens=0, one forward of `sequences` rows of `prompt_tokens` whose logits are all needed."""
    t = _Terms()
    t.add("weights", f"weights ({weight_bytes} bytes a parameter)", shape.params * weight_bytes)
    if new_tokens:
        length = prompt_tokens + new_tokens
        t.add(
            "activations",
            f"KV cache: {sequences} sequences x {length} tokens",
            _kv_cache(shape, sequences, length, weight_bytes),
        )
        # The prompt's forward (prefill) runs all sequences' prompts at once, one block at a time.
        t.add(
            "activations",
            "prefill, one block's tensors",
            _forward_transient(shape, sequences * prompt_tokens, weight_bytes),
        )
        # Generation keeps the last position's logits only, upcast to fp32 and log-softmaxed (beam search).
        t.add("activations", "next-token logits (fp32, log-softmax)", sequences * shape.vocab * (weight_bytes + 8))
    else:
        tokens = sequences * prompt_tokens
        t.add(
            "activations",
            f"forward of {tokens} tokens, one block's tensors",
            _forward_transient(shape, tokens, weight_bytes),
        )
        if shape.vocab:
            # Perplexity: every position's logits, an fp32 log-softmax of them and its gather.
            t.add(
                "activations",
                f"{what}: logits of {tokens} positions (+ fp32 log-softmax)",
                tokens * shape.vocab * (weight_bytes + 8),
            )
    return t


# --------------------------------------------------------------------------------------- reading a run config


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    node = cfg
    for part in key.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        except MissingMandatoryValue:
            raise ConfigError(f"{key}: missing value (???)") from None
    return default if node is None else node


def _int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: expected an integer >= {minimum}")
    return value


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def adapter_of(cfg: Any) -> Adapter:
    """The run's adapter: `trainer.peft` (none | lora | qlora) with `trainer.lora` {r, dropout, target_modules,
    ...} (rrhf.adapters), or a `trainer.peft` mapping {method, r, target_modules}. Missing: full fine-tuning."""
    peft = _plain(_get(cfg, "trainer.peft"))
    if peft is None or isinstance(peft, str):
        method, settings, where = peft or "none", _plain(_get(cfg, "trainer.lora")) or {}, "trainer.lora"
        key = "trainer.peft"
    elif isinstance(peft, dict):
        method, settings, where, key = peft.get("method") or "none", peft, "trainer.peft", "trainer.peft.method"
    else:
        raise ConfigError(f"trainer.peft={peft!r}: expected one of {', '.join(ADAPTERS)}")
    if method not in ADAPTERS:
        raise ConfigError(f"{key}={method!r}: expected one of {', '.join(ADAPTERS)}")
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}={settings!r}: expected a mapping with r, dropout, target_modules")
    r = settings.get("r")
    r = DEFAULT_LORA_RANK if r is None else _int(r, f"{where}.r")
    dropout = settings.get("dropout", settings.get("lora_dropout")) or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"{where}.dropout={dropout!r}: expected a number >= 0 and < 1")
    targets = settings.get("target_modules")
    if isinstance(targets, (list, tuple)):
        if not targets or not all(isinstance(n, str) and n for n in targets):
            raise ConfigError(f"{where}.target_modules={targets!r}: expected layer names, e.g. [q_proj,v_proj]")
        targets = tuple(targets)
    elif targets is not None and not (isinstance(targets, str) and targets):
        raise ConfigError(f"{where}.target_modules={targets!r}: expected a list of layer names or all-linear")
    return Adapter(method, r, targets, float(dropout))


def _adapter_override(cfg: Any, method: str) -> tuple[str, dict[str, Any]]:
    """The command-line override choosing an adapter, in the config's own schema."""
    key = "trainer.peft.method" if isinstance(_plain(_get(cfg, "trainer.peft")), dict) else "trainer.peft"
    return f"{key}={method}", {key: method}


def _train_args(cfg: Any) -> dict[str, Any]:
    # The method's training settings win over the profile's, as in rrhf.pipeline.train_stage.
    return (_plain(_get(cfg, "trainer.args")) or {}) | (_plain(_get(cfg, "method.train_args")) or {})


def _zero_stage(deepspeed: Any) -> int:
    if isinstance(deepspeed, dict):
        settings = deepspeed
    else:
        path = Path(str(deepspeed))
        path = path if path.exists() else PROJECT_ROOT / path
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"trainer.args.deepspeed={deepspeed!r}: cannot read it ({error})") from None
    return int((settings.get("zero_optimization") or {}).get("stage", 0))


def _profile(args: dict[str, Any]) -> str:
    if args.get("deepspeed"):
        stage = _zero_stage(args["deepspeed"])
        return "zero3" if stage == 3 else "zero2" if stage in (1, 2) else "ddp"
    if args.get("fsdp"):
        return "fsdp"
    return "ddp"


@dataclass(frozen=True)
class _Plan:
    """What of the config and this machine the stage estimates share."""

    cfg: Any
    accelerator: bool  # plans for a GPU's precisions
    world_size: int

    def dtype_bytes(self, chosen: Any) -> int:
        """Bytes a parameter of an inference model, as rrhf.placement picks its dtype."""
        from rrhf import placement

        where = placement.placement("cuda" if self.accelerator else "cpu", _dtype(self.cfg, chosen))
        return where.dtype.itemsize


def _dtype(cfg: Any, chosen: Any) -> str:
    value = chosen if chosen not in (None, "auto") else cfg.get("dtype", "auto")
    return str(value or "auto")


def _accelerator(cfg: Any) -> bool:
    """Whether the run's models sit on a GPU: device=auto picks one when there is one here, or, with a
    device_memory_gib given, on the machine the run is planned for."""
    from rrhf import placement

    device = str(cfg.get("device", "auto") or "auto")
    if device == "auto":
        return placement.local_device().type == "cuda" or cfg.get("device_memory_gib") is not None
    return device.startswith("cuda")


def _candidates(cfg: Any) -> int:
    """Candidates of a query that train together: sampled ones plus the data set's responses (sampling.train_on)."""
    s = cfg.sampling
    extra = list(_get(cfg, "sampling.dataset_responses") or [])
    generator = s.get("generator")
    if generator == "file":
        path = Path(str(s.get("train_file"))).expanduser()
        try:
            with open(path) as handle:
                return max(len(json.loads(line)["responses"]) for line in handle if line.strip())
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"sampling.train_file={str(path)!r}: cannot count its candidates ({error})") from None
    if generator == "sources":
        total = 0
        for name, source in (_plain(s.get("sources")) or {}).items():
            kind = source.get("kind")
            if kind == "policy":
                total += _int(
                    source.get("num_candidates", s.get("num_candidates")), f"sampling.sources.{name}.num_candidates"
                )
            elif kind == "endpoint":
                total += _int(source.get("n", 1), f"sampling.sources.{name}.n")
            else:  # a data set field, or one response of a file a prompt
                total += 1
        return max(1, total + len(extra))
    sampled = 0 if generator == "none" else _int(s.get("num_candidates"), "sampling.num_candidates")
    train_on = s.get("train_on", "all")
    count = sampled if train_on == "sampled" else len(extra) if train_on == "provided" else sampled + len(extra)
    if count < 1:
        raise ConfigError(
            f"sampling.num_candidates={s.get('num_candidates')!r}, sampling.dataset_responses={extra}: "
            "no candidate to train on"
        )
    return count


def _rrhf_tokens(cfg: Any, args: dict[str, Any], k: int) -> tuple[int, int]:
    """(tokens in the forward, scored tokens) of one query with k candidates, at the configured maxima."""
    semantics = args.get("semantics", "paper")
    length = _int(args.get("model_max_length", 192), "trainer.args.model_max_length", 2)
    if semantics == "official":
        # The authors' rule: query + response within model_max_length, so k candidates fill at most k rows of it
        # (the shared layout's prompt-once packing can only be shorter).
        return k * length, k * length
    prompt = _int(args.get("max_prompt_tokens", 256), "trainer.args.max_prompt_tokens")
    response = _int(args.get("max_response_tokens", 128), "trainer.args.max_response_tokens") + 1  # + EOS
    tokens = prompt + k * response if args.get("layout", "shared") == "shared" else k * (prompt + response)
    return tokens, k * response


def _training(plan: _Plan, args: dict[str, Any], adapter: Adapter | None = None) -> Training:
    cfg = plan.cfg
    profile = _profile(args)
    if not plan.accelerator and profile in ("zero2", "zero3"):
        profile = "ddp"  # DeepSpeed needs GPUs; a CPU launch of the profile is not planned for
    return Training(
        accelerator=plan.accelerator,
        mixed_precision=bool(args.get("bf16") or args.get("fp16")),
        bf16=bool(args.get("bf16")),
        adapter=adapter_of(cfg) if adapter is None else adapter,
        checkpointing=bool(args.get("gradient_checkpointing") or False),
        profile=profile,
        world_size=plan.world_size,
    )


def _reward_terms(plan: _Plan) -> tuple[_Terms, str, list[str]]:
    """The reward model's resident weights and its largest forward (nothing for VADER or an LLM judge)."""
    reward = plan.cfg.reward
    name = reward.get("name")
    t, notes = _Terms(), []
    if name in ("vader", None):
        return t, "", notes
    if name == "llm_judge":
        notes.append("reward=llm_judge: its model runs behind an endpoint (a separate process), not counted")
        return t, "", notes
    nbytes = plan.dtype_bytes(reward.get("dtype"))
    batch = _int(reward.get("batch_size", 8), "reward.batch_size")
    length = _int(reward.get("max_length", 512), "reward.max_length")
    if name == "gptj_rm_static":
        shape = model_shape(str(reward.backbone), key="reward.backbone", kind="backbone")
        label = f"{reward.checkpoint_repo} ({reward.backbone} backbone)"
    else:
        shape = model_shape(str(reward.path), key="reward.path", kind="sequence_classifier", trust_remote_code=False)
        label = str(reward.path)
    t.add("weights", f"reward model ({nbytes} bytes a parameter)", shape.params * nbytes)
    t.add(
        "activations",
        f"reward forward: {batch} x {length} tokens, one block's tensors",
        _forward_transient(shape, batch * length, nbytes),
    )
    return t, label, notes


def _policy(plan: _Plan) -> ModelShape:
    return model_shape(
        str(_get(plan.cfg, "model.path")),
        key="model.path",
        trust_remote_code=bool(plan.cfg.model.get("trust_remote_code")),
    )


def _sample_stage(plan: _Plan) -> StageEstimate:
    s = plan.cfg.sampling
    shape = _policy(plan)
    batch = _int(s.get("batch_size", 8), "sampling.batch_size")
    generator = s.get("generator")
    per_prompt = (
        _int(s.get("num_beams"), "sampling.num_beams")
        if generator in ("diverse_beam", "beam")
        else _int(s.get("num_candidates"), "sampling.num_candidates")
    )
    t = _inference(
        shape,
        weight_bytes=plan.dtype_bytes(s.get("dtype")),
        sequences=batch * per_prompt,
        prompt_tokens=_int(s.get("max_prompt_tokens", 256), "sampling.max_prompt_tokens"),
        new_tokens=_int(s.get("max_new_tokens"), "sampling.max_new_tokens"),
    )
    how = f"{batch} prompts x {per_prompt} {'beams' if generator in ('diverse_beam', 'beam') else 'samples'}"
    return t.stage("sample", shape.name, [f"sample: {generator}, {how} a batch"])


def _score_stage(plan: _Plan) -> StageEstimate | None:
    t, label, notes = _reward_terms(plan)
    if not t.items:
        return None
    return t.stage("score", label, notes)


def _evaluate_stage(plan: _Plan) -> StageEstimate:
    """The reward model is built first and stays; the policy generates, is freed, then the judge scores perplexity."""
    cfg, e = plan.cfg, plan.cfg.eval
    reward, reward_label, notes = _reward_terms(plan)
    nbytes = plan.dtype_bytes(None)
    shape = _policy(plan)
    new_tokens = _int(e.get("max_new_tokens"), "eval.max_new_tokens")
    prompt_tokens = _int(e.get("max_prompt_tokens", 256), "eval.max_prompt_tokens")
    if cfg.method.get("name") == "best_of_n":
        m = cfg.method
        sequences = _int(m.get("batch_size", 8), "method.batch_size") * _int(m.get("n", 4), "method.n")
    else:
        sequences = _int(e.get("batch_size", 16), "eval.batch_size")
    policy = _inference(
        shape, weight_bytes=nbytes, sequences=sequences, prompt_tokens=prompt_tokens, new_tokens=new_tokens
    )
    judge_shape = model_shape(str(e.judge), key="eval.judge")
    ppl_batch = _int(e.get("ppl_batch_size", 8), "eval.ppl_batch_size")
    judge = _inference(
        judge_shape,
        weight_bytes=nbytes,
        sequences=ppl_batch,
        prompt_tokens=new_tokens + 1,
        new_tokens=0,
        what="perplexity",
    )
    phases = {
        "generation": (f"{shape.name} (policy)", policy),
        "perplexity": (f"{judge_shape.name} (judge)", judge),
    }
    name, (model, phase) = max(phases.items(), key=lambda item: item[1][1].total())
    t = _Terms()
    t.extend(reward)
    t.extend(phase)
    notes = [*notes, f"evaluate: the peak is the {name} phase ({model}; the policy is freed before the judge loads)"]
    model += f" + reward {reward_label}" if reward_label else ""
    return t.stage("evaluate", model, notes)


def _train_stage(plan: _Plan, method: str | None = None, stage: str = "train") -> StageEstimate:
    cfg = plan.cfg
    method = method or cfg.method.name
    shape = _policy(plan)
    notes: list[str] = []
    if method == "ppo":
        return _ppo_stage(plan, shape)
    args = _train_args(cfg)
    how = _training(plan, args)
    batch = _int(args.get("per_device_train_batch_size", 1), "trainer.args.per_device_train_batch_size")
    if method == "sft" or args.get("objective") == "lm":
        length = _int(args.get("model_max_length", 1024), "method.train_args.model_max_length", 2)
        step = training_step(shape, tokens=batch * length, scored=batch * length, how=how, objective="lm", stage=stage)
        notes.append(f"{stage}: {batch} texts x {length} tokens a device batch (next-token loss)")
    else:
        k = _candidates(cfg)
        if method in ("dpo", "simpo", "cpo"):
            # A pair example holds the responses its pairs use: 2 for best_worst and dataset, up to k for all.
            k = k if cfg.method.get("pairs") == "all" else min(k, 2)
        tokens, scored = _rrhf_tokens(cfg, args, k)
        shared = args.get("layout", "shared") == "shared"
        step = training_step(
            shape, tokens=batch * tokens, scored=batch * scored, how=how, mask_rows=batch if shared else 0, stage=stage
        )
        notes.append(
            f"{stage}: {batch} quer{'y' if batch == 1 else 'ies'} x {k} candidates, "
            f"{batch * tokens} tokens a device batch"
        )
        if method == "dpo":
            notes.append("dpo: the reference log-probs are computed once and cached (rrhf.trainer): no second model")
    terms = _Terms()
    terms.items = list(step.terms)
    online = method == "rrhf" and bool(cfg.sampling.get("refresh_steps"))
    if online:
        # OP-k: the scorer is built before training and stays; OP+KL keeps a frozen copy of the initial weights
        # (with an adapter, the same weights with the adapter disabled); between steps the policy generates.
        reward, _, reward_notes = _reward_terms(plan)
        notes += reward_notes
        terms.extend(_only(reward, "weights"))
        if float(cfg.sampling.get("kl_coef") or 0) and how.adapter.method == "none":
            terms.add("weights", "OP+KL reference: frozen fp32 copy of the initial policy", 4 * shape.params)
        s = cfg.sampling
        beams = s.get("num_beams") if s.get("generator") in ("diverse_beam", "beam") else s.get("num_candidates")
        # The refresh generates with the training model itself, outside autocast: its KV cache takes the weights'
        # dtype (fp32; bf16 for QLoRA's compute on a GPU and for a bf16 LoRA base).
        fp32_cache = how.adapter.method == "none" or not how.accelerator
        fp32_cache = fp32_cache or (how.adapter.method == "lora" and not how.bf16_lora_base)
        generation = _inference(
            shape,
            weight_bytes=4 if fp32_cache else 2,
            sequences=_int(s.get("batch_size", 8), "sampling.batch_size") * _int(beams, "sampling.num_beams"),
            prompt_tokens=_int(s.get("max_prompt_tokens", 256), "sampling.max_prompt_tokens"),
            new_tokens=_int(s.get("max_new_tokens"), "sampling.max_new_tokens"),
        )
        train_acts = sum(b for c, _, b in step.terms if c == "activations")
        gen_acts = _only(generation, "activations")
        if gen_acts.total() > train_acts:
            terms.items = [i for i in terms.items if i[0] != "activations"] + [
                (c, f"refresh (generation between steps): {w}", b) for c, w, b in gen_acts.items
            ]
            notes.append(f"{stage}: the peak is an OP-k refresh (generation), not the optimiser step")
    return terms.stage(stage, shape.name, notes)


def _only(t: _Terms, component: str) -> _Terms:
    out = _Terms()
    out.items = [i for i in t.items if i[0] == component]
    return out


def _ppo_precision(plan: _Plan) -> dict[str, bool]:
    """rrhf.ppo's mixed precision: autocast to the run's placement dtype on a GPU (bf16 by default), none on a
    CPU; it also stores a LoRA base in bf16 when that dtype is bf16."""
    import torch

    from rrhf import placement

    if not plan.accelerator:
        return {}
    dtype = placement.placement("cuda", _dtype(plan.cfg, None)).dtype
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def _ppo_stage(plan: _Plan, shape: ModelShape) -> StageEstimate:
    """rrhf.ppo: fp32 policy, a frozen fp32 reference copy, the value head, torch's AdamW on the unfrozen blocks;
    rollouts generated in chunks, the scorer resident throughout."""
    cfg = plan.cfg
    p = _plain(cfg.method.ppo)
    how = _training(plan, _ppo_precision(plan), adapter_of(cfg))
    how = replace(how, profile="single", world_size=1)  # PPO runs in one process (rrhf.pipeline.ppo_stage)
    unfrozen = p.get("num_layers_unfrozen", 2)
    blocks = None if unfrozen is None or unfrozen < 0 else min(int(unfrozen), shape.layers)
    batch = _int(p.get("batch_size", 4), "method.ppo.batch_size")
    prompt, new = (
        _int(p.get("max_prompt_tokens", 896), "method.ppo.max_prompt_tokens"),
        _int(p.get("max_new_tokens"), "method.ppo.max_new_tokens"),
    )
    step = training_step(
        shape,
        tokens=batch * (prompt + new),
        scored=batch * new,
        how=how,
        objective="ppo",
        trainable_blocks=blocks,
        stage="train",
    )
    t = _Terms()
    t.items = list(step.terms)
    untied = 0 if shape.tied else shape.lm_head_params
    trainable = shape.params if blocks is None else blocks * shape.block_params + untied
    if how.adapter.method == "none":
        t.add("weights", "reference: frozen fp32 copy of the initial policy", 4 * shape.params)
        # torch.optim.AdamW's default (foreach) step allocates the square roots of the second moments at once.
        t.add("optimizer", "AdamW foreach step: sqrt of the second moments (fp32)", 4 * trainable)
    head = 2 * shape.hidden * shape.hidden + 2 * shape.hidden + 2 * shape.hidden + 1
    t.add("weights", "value head (fp32)", 4 * head)
    t.add("grads", "value head gradients", 4 * head)
    t.add("optimizer", "value head AdamW moments", 8 * head)
    reward, _, notes = _reward_terms(plan)
    t.extend(_only(reward, "weights"))
    chunk = _int(p.get("chunk_size", 16), "method.ppo.chunk_size")
    # Rollouts are sampled under the same autocast: a bf16 KV cache on a GPU.
    kv_bytes = 2 if how.mixed_precision else 4
    generation = _only(
        _inference(shape, weight_bytes=kv_bytes, sequences=chunk, prompt_tokens=prompt, new_tokens=new), "activations"
    )
    if generation.total() > sum(b for c, _, b in t.items if c == "activations"):
        t.items = [i for i in t.items if i[0] != "activations"] + [
            (c, f"rollouts: {w}", b) for c, w, b in generation.items
        ]
        notes = [*notes, "train: the peak is PPO's rollout generation, not its update"]
    return t.stage("train", shape.name, notes)


def _stages(cfg: Any) -> list[tuple[str, Callable[[_Plan], StageEstimate | None]]]:
    """The model-using stages rrhf.pipeline.run runs for this config, in order (each estimated once)."""
    method = cfg.method.get("name")
    stages: list[tuple[str, Callable[[_Plan], StageEstimate | None]]] = []
    if cfg.model.get("sft"):  # Alpaca-sft: the initial policy is model.path fine-tuned by method=sft first
        stages.append(("train (model.sft)", _sft_initial))
    stages.append(("evaluate", _evaluate_stage))
    if method in ("rrhf", "dpo", "simpo", "cpo"):
        s = cfg.sampling
        samples = s.get("generator") not in ("none", "file", "sources") and not (
            s.get("train_on") == "provided" and not s.get("pad_over_group")
        )
        if samples:
            stages.append(("sample", _sample_stage))
        if s.get("generator") != "file":
            stages.append(("score", _score_stage))
        stages.append(("train", _train_stage))
    elif method in ("sft", "ppo"):
        stages.append(("train", _train_stage))
    return stages


def _sft_initial(plan: _Plan) -> StageEstimate:
    sft = copy.deepcopy(plan.cfg)
    OmegaConf.set_struct(sft, False)
    OmegaConf.update(sft, "method", plan.cfg.model.sft, merge=False)
    return _train_stage(replace(plan, cfg=sft), method="sft", stage="train (model.sft)")


def _run_stage(name: str, fn: Callable[[_Plan], StageEstimate | None], plan: _Plan) -> StageEstimate | None:
    try:
        return fn(plan)
    except ModelConfigMissing as missing:
        return StageEstimate(name, "?", skipped=f"not estimated: {missing}")


def estimate(cfg: Any, *, world_size: int | None = None) -> list[StageEstimate]:
    """Every model-using stage of the run's config, with its estimated peak on one device (rank).

    `world_size`: the ranks of the launch (default: this process's launch, WORLD_SIZE); FSDP and ZeRO shard by it.
    A stage whose model config is not available offline is returned with `skipped` set (never raised).
    """
    from rrhf.launch import world_size as launch_world_size

    world = _int(world_size if world_size is not None else launch_world_size(), "world_size")
    _device_memory_setting(cfg)  # a bad value is refused before anything else
    plan = _Plan(cfg, _accelerator(cfg), world)
    out = []
    for name, fn in _stages(cfg):
        result = _run_stage(name, fn, plan)
        if result is not None:
            out.append(result)
    return out


# -------------------------------------------------------------------------------------------- check_fits


def _device_memory_setting(cfg: Any) -> int | None:
    value = cfg.get("device_memory_gib") if hasattr(cfg, "get") else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"device_memory_gib={value!r}: expected null (detect the GPU's) or a positive number of GiB")
    return int(value * GIB)


def device_memory(cfg: Any) -> int | None:
    """The memory of the device the run uses, in bytes: `device_memory_gib` when set, else the GPU's own; None on
    a CPU (no limit is enforced there)."""
    given = _device_memory_setting(cfg)
    if given is not None:
        return given
    from rrhf import placement

    where = placement.from_config(cfg)
    if where.device.type != "cuda":
        return None
    import torch

    index = where.device.index if where.device.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).total_memory)


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.1f}"


def _with(cfg: Any, changes: dict[str, Any]) -> Any:
    changed = copy.deepcopy(cfg)
    OmegaConf.set_struct(changed, False)
    for key, value in changes.items():
        OmegaConf.update(changed, key, value, merge=False, force_add=True)
    return changed


def _batch_key(cfg: Any, name: str, method_key: str) -> str:
    # A method's own train_args win over the profile's (sft sets its batch): change it where it is set.
    section = f"{method_key}.train_args"
    return f"{section}.{name}" if name in (_plain(_get(cfg, section)) or {}) else f"trainer.args.{name}"


def _halvings(value: Any) -> list[int]:
    """Smaller batch sizes to try: halves of `value`, down to 1 (at most four)."""
    if not isinstance(value, int) or value <= 1:
        return []
    out, b = [], value // 2
    while b > 1 and len(out) < 3:
        out.append(b)
        b //= 2
    return [*out, 1]


def _fixes(
    cfg: Any, stage: StageEstimate, fn: Callable[[_Plan], StageEstimate | None], plan: _Plan, device: int
) -> list[tuple[str, int]]:
    """(a setting, the stage's estimate with it) for each setting that lowers the stage's peak."""

    def total(changes: dict[str, Any], ranks: int) -> int | None:
        result = _run_stage(stage.stage, fn, replace(plan, cfg=_with(cfg, changes), world_size=ranks))
        return None if result is None else result.total

    tries: list[tuple[str, dict[str, Any]]] = []
    found: list[tuple[str, int | None]] = []
    if stage.stage.startswith("train"):
        method_key = "model.sft" if stage.stage == "train (model.sft)" else "method"
        method = _get(cfg, f"{method_key}.name")
        args = (_plain(_get(cfg, "trainer.args")) or {}) | (_plain(_get(cfg, f"{method_key}.train_args")) or {})
        adapter = adapter_of(cfg).method
        lora, qlora = _adapter_override(cfg, "lora"), _adapter_override(cfg, "qlora")
        if adapter == "none":
            tries.append(lora)
        if adapter != "qlora":
            tries.append(qlora)
        if method != "ppo":
            if not args.get("gradient_checkpointing"):
                # A new key needs Hydra's "+" (conf/trainer/base.yaml leaves it out while it is off).
                plus = "" if "gradient_checkpointing" in (_get(cfg, "trainer.args") or {}) else "+"
                on = {"trainer.args.gradient_checkpointing": True}
                tries.append((f"{plus}trainer.args.gradient_checkpointing=true", on))
                for label, changes in ([lora] if adapter == "none" else []) + ([qlora] if adapter != "qlora" else []):
                    tries.append((f"{label} {plus}trainer.args.gradient_checkpointing=true", changes | on))
            batch, accumulation = args.get("per_device_train_batch_size", 1), args.get("gradient_accumulation_steps", 1)
            if isinstance(batch, int) and batch > 1 and isinstance(accumulation, int):
                b_key = _batch_key(cfg, "per_device_train_batch_size", method_key)
                a_key = _batch_key(cfg, "gradient_accumulation_steps", method_key)
                label = f"{b_key}=1 {a_key}={batch * accumulation} (as many queries a step)"
                tries.append((label, {b_key: 1, a_key: batch * accumulation}))
            if plan.accelerator:
                profiles = {
                    "fsdp": {"trainer.args.fsdp": True, "trainer.args.deepspeed": None},
                    "deepspeed_zero3": {
                        "trainer.args.deepspeed": "conf/trainer/deepspeed/zero3.json",
                        "trainer.args.fsdp": False,
                    },
                }
                for profile, changes in profiles.items():
                    # The fewest ranks (GPUs) of a sharded launch that bring it under; the most tried otherwise.
                    for ranks in (2, 4, 8, 16, 32, 64):
                        if ranks <= plan.world_size:
                            continue
                        now = total(changes, ranks)
                        if now is None or now <= device or ranks == 64:
                            label = f"trainer={profile} on {ranks} ranks (torchrun --nproc-per-node={ranks})"
                            found.append((label, now))
                            break
    else:
        keys = {
            "sample": ["sampling.batch_size"],
            "score": ["reward.batch_size"],
            "evaluate": ["eval.batch_size", "eval.ppl_batch_size"],
        }.get(stage.stage, [])
        for key in keys:
            smaller = [b for b in _halvings(_get(cfg, key, 1))]
            # The largest batch that fits, or the smallest tried.
            for b in smaller:
                now = total({key: b}, plan.world_size)
                if now is None or now <= device or b == smaller[-1]:
                    found.append((f"{key}={b}", now))
                    break
        if _dtype(cfg, None) == "float32":
            tries.append(("dtype=bfloat16", {"dtype": "bfloat16"}))
    found += [(label, total(changes, plan.world_size)) for label, changes in tries]
    return [(label, t) for label, t in found if t is not None and t < stage.total]


def check_fits(cfg: Any, device_bytes: int | None = None, *, world_size: int | None = None) -> list[StageEstimate]:
    """Refuse (DoesNotFit) a run whose estimated peak, in any stage, exceeds the device's memory; return the
    estimates otherwise. The device's memory: `device_bytes`, else `device_memory_gib`, else the GPU's when the
    run uses CUDA; on a CPU without either, nothing is refused (the estimates are only logged).
    """
    from rrhf.launch import world_size as launch_world_size

    device = device_bytes if device_bytes is not None else device_memory(cfg)
    world = world_size if world_size is not None else launch_world_size()
    try:
        stages = estimate(cfg, world_size=world)
    except ConfigError:
        raise
    except Exception as error:  # the plan is advice: a model the estimate cannot read must not stop the run
        log.warning("memory: no plan made (%s: %s); the run goes on unchecked", type(error).__name__, error)
        return []
    for s in stages:
        if s.skipped:
            log.warning("memory: %s %s", s.stage, s.skipped)
        else:
            log.info("memory: %s (%s): about %s GiB per device", s.stage, s.model, _gib(s.total))
    if device is None:
        return stages
    over = [s for s in stages if s.total is not None and s.total > device]
    if not over:
        return stages
    if device_bytes is not None:
        where = "the device"
    elif cfg.get("device_memory_gib") is not None:
        where = f"device_memory_gib={cfg.get('device_memory_gib')}"
    else:
        import torch

        where = f"this GPU ({torch.cuda.get_device_name()})"
    plan = _Plan(cfg, _accelerator(cfg), world)
    functions = dict(_stages(cfg))
    lines = []
    for s in over:
        parts = ", ".join(f"{c} {_gib(s.components.get(c, 0))}" for c in COMPONENTS)
        lines.append(
            f"stage {s.stage} ({s.model}): estimated {_gib(s.total)} GiB per device ({parts} GiB; margin "
            f"{_gib(s.margin)} GiB), more than the {_gib(device)} GiB of {where}"
            + (f" on each of {world} ranks" if world > 1 else "")
            + "."
        )
        fixes = _fixes(cfg, s, functions[s.stage], plan, device)
        fitting = [(label, total) for label, total in fixes if total <= device]
        if fitting:
            lines.append("  Settings that bring it under (each re-estimated):")
            lines += [f"    {label} -> {_gib(total)} GiB" for label, total in fitting]
        others = [(label, total) for label, total in fixes if total > device]
        if others:
            lines.append("  Lower, but still over:")
            lines += [f"    {label} -> {_gib(total)} GiB" for label, total in others]
        if not fitting:
            lines.append(
                "  No setting tried brings it under: a device with more memory, or device_map=auto (inference)"
            )
    lines.append(
        f"(Estimates from the config, margin {MARGIN_FIXED // GIB} GiB + {MARGIN_FRACTION:.0%}: "
        "`python -m rrhf.memory <overrides>` prints them; device_memory_gib=<GiB> states another device's memory.)"
    )
    raise DoesNotFit("\n".join(lines))


# ----------------------------------------------------------------------------------------------------- the CLI


def table(stages: Sequence[StageEstimate], device: int | None) -> str:
    """The estimates as a text table: stage, model, the components, total, the device's memory, whether it fits."""
    header = ("stage", "model", "weights", "grads", "optimiser", "activations", "total", "device", "fits?")
    rows = []
    for s in stages:
        if s.skipped:
            rows.append((s.stage, s.model, "-", "-", "-", "-", "-", _gib(device), "unknown"))
            continue
        fits = "report only (CPU)" if device is None else "yes" if s.total <= device else "NO"
        rows.append(
            (s.stage, s.model, *(_gib(s.components.get(c, 0)) for c in COMPONENTS), _gib(s.total), _gib(device), fits)
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.append(f"GiB per device; total = the components + {MARGIN_FIXED // GIB} GiB + {MARGIN_FRACTION:.0%} margin")
    for s in stages:
        for note in (s.skipped, *s.notes):
            if note:
                lines.append(f"  {s.stage}: {note}" if not note.startswith(s.stage) else f"  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m rrhf.memory [--world-size N] [--verbose] <hydra overrides>`: the table of every job the overrides
    make (a sweep gives one table a job). Exit status 1 when a stage does not fit the device."""
    import argparse

    from rrhf.hub import compose_jobs

    parser = argparse.ArgumentParser(prog="python -m rrhf.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=None, help="ranks of the launch (default: WORLD_SIZE or 1)")
    parser.add_argument("--verbose", action="store_true", help="itemise every term of every stage")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = parser.parse_args(argv)
    status = 0
    try:
        jobs = compose_jobs(list(args.overrides))
    except Exception as error:  # Hydra's own message names the bad override
        print(f"rrhf.memory: cannot compose the config: {error}", file=sys.stderr)
        return 2
    for cfg in jobs:
        overrides = " ".join(cfg.hydra.overrides.task) if "hydra" in cfg else ""
        print(f"$ python -m rrhf.memory {overrides}".rstrip())
        try:
            device = device_memory(cfg)
            stages = estimate(cfg, world_size=args.world_size)
        except ConfigError as error:
            print(f"rrhf.memory: {error}", file=sys.stderr)
            return 2
        print(table(stages, device))
        if args.verbose:
            for s in stages:
                for component, what, nbytes in s.terms:
                    print(f"  {s.stage:<10} {component:<12} {nbytes / GIB:8.2f} GiB  {what}")
        if device is not None:
            try:
                check_fits(cfg, world_size=args.world_size)
            except DoesNotFit as error:
                print(f"\n{error}")
                status = 1
        print()
    return status


if __name__ == "__main__":
    sys.exit(main())
