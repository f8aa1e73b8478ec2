"""LoRA and QLoRA adapters on the policy a method trains (`trainer.peft`, `trainer.lora`).

lora (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the base weights stay frozen and
each targeted linear layer gains a trainable low-rank update B A, scaled by alpha / r, with B initialised to
zero, so before the first step the adapted policy computes exactly what the base does. qlora (Dettmers et al.,
2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the same adapters on a base loaded in 4-bit NF4 with
double quantization and bf16 compute (bitsandbytes, the `qlora` extra), prepared with
`peft.prepare_model_for_kbit_training`.

The frozen base of lora is stored in bf16 where the run trains in bf16 on a GPU, in fp32 otherwise
(`base_dtype`); the adapters are fp32 either way.

Where a method needs the frozen initial policy (DPO's reference log-probs, OP+KL's rho, PPO's KL reference), an
adapted policy provides it by running with its adapters disabled (`initial_policy`): the same weights, no copy.
A finished training keeps the adapter (`adapter/`) and the adapter merged into the base (`model/`, a plain
Hugging Face folder: `merge_adapter`), so every later stage loads `model/` as it does after full training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

METHODS = ("none", "lora", "qlora")
# PEFT's own name for "every linear layer but the output head".
ALL_LINEAR = "all-linear"
# The linear layers of a LLaMA-family decoder block (LLaMA, SmolLM2, Gemma 3): attention and MLP projections.
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QLORA_EXTRA = "pip install 'rrhf[qlora]'"


@dataclass(frozen=True)
class AdapterSettings:
    """What adapters a training puts on its policy; the defaults are conf/trainer/base.yaml's, with sources."""

    method: str
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = LLAMA_LINEAR

    def __post_init__(self) -> None:
        if self.method not in METHODS or self.method == "none":
            raise ValueError(f"trainer.peft={self.method!r}: expected one of {', '.join(METHODS)}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"trainer.lora.r={self.r!r}: expected an integer >= 1 (the adapters' rank)")
        if not _finite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"trainer.lora.alpha={self.alpha!r}: expected a number > 0")
        if not _finite(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"trainer.lora.dropout={self.dropout!r}: expected a number >= 0 and < 1")
        targets = self.target_modules
        if isinstance(targets, list):
            object.__setattr__(self, "target_modules", targets := tuple(targets))
        if targets != ALL_LINEAR and not (
            isinstance(targets, tuple) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"trainer.lora.target_modules={targets!r}: expected a non-empty list of module names or {ALL_LINEAR!r}"
            )

    @classmethod
    def from_config(cls, trainer: Mapping[str, Any]) -> AdapterSettings | None:
        """The settings of a composed `trainer` group (plain containers), or None for full training."""
        method = trainer.get("peft", "none")
        if method == "none":
            return None
        lora = dict(trainer.get("lora") or {})
        known = {f.name for f in fields(cls)} - {"method"}
        for key in lora:
            if key not in known:
                raise ValueError(f"trainer.lora.{key}: not a LoRA setting; expected {', '.join(sorted(known))}")
        return cls(method, **lora)

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    def key(self) -> dict[str, Any]:
        """The settings as a stage key holds them."""
        targets = self.target_modules
        return {
            "method": self.method,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
        }

    def lora_config(self):
        from peft import LoraConfig

        targets = self.target_modules
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def bitsandbytes_missing() -> str | None:
    """Why QLoRA cannot run in this environment (its package is not installed), or None."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"trainer.peft=qlora needs the bitsandbytes package: {QLORA_EXTRA}"
    return None


def quantization_config():
    """QLoRA's storage of the frozen base (Dettmers et al. 2023, Section 3): 4-bit NormalFloat, double
    quantization of the quantization constants, bf16 for the matrix products."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def base_dtype(device: torch.device | str, *, bf16: bool) -> torch.dtype:
    """The dtype lora loads its frozen base in: bf16 when the run trains in bf16 on a GPU, fp32 otherwise.

    Why bf16 there: memory. The base takes no updates, so keeping it in fp32 (as full training keeps its master
    weights, so that small updates are not rounded away) buys nothing: under bf16 autocast every matmul reads its
    weight in bf16 anyway, and the fp32 copy costs 4 bytes a parameter plus the bf16 casts autocast keeps for
    backward (LLaMA-7B: about 25 + 12 GiB, against 13 GiB stored in bf16). What changes is that the embeddings,
    norms and residual stream then run in bf16 as well. This is the usual LoRA recipe (peft's and TRL's
    examples load the base in bf16; QLoRA, Dettmers et al. 2023, keeps its frozen base in 4 bits), and the
    adapters still train in fp32: peft's get_peft_model upcasts bf16 adapter weights to fp32
    (autocast_adapter_dtype=True, its default). On a CPU, or without bf16, the base stays fp32 as before: bf16
    there runs as autocast around fp32 weights, and the CPU tests compare the adapted policy with an fp32 base
    exactly. The merged `model/` is made from a base reloaded in fp32 (`merge_adapter`) either way.
    """
    return torch.bfloat16 if bf16 and torch.device(device).type == "cuda" else torch.float32


def load_adapted_policy(
    path: str | Path,
    settings: AdapterSettings,
    *,
    device: torch.device,
    bf16: bool = False,
    tokenizer: Any = None,
    authors_pad: bool = False,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
):
    """The model at `path` (a local Hugging Face folder) with trainable adapters on its frozen weights.

    lora loads the base in `base_dtype(device, bf16=bf16)` (`bf16`: the run trains in bf16 mixed precision):
    bf16 on a GPU that trains in bf16, else fp32; the adapters are fp32. qlora loads it 4-bit on `device`.
    `authors_pad` adds the authors' [PAD] token (`rrhf.assets.add_pad_token`) to the base first, with
    `tokenizer`. The adapters' random initialisation (LoRA's A) is drawn from `seed`, leaving the caller's random
    state as it was. Returns a `peft.PeftModel` whose trainable parameters are the adapters' alone.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from rrhf.assets import add_pad_token

    if settings.quantized:
        missing = bitsandbytes_missing()
        if missing:
            raise ImportError(missing)
        # device_map places the 4-bit weights where they are quantized: this process's device (its rank's GPU).
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(),
            dtype=torch.bfloat16,
            device_map={"": device},
            trust_remote_code=trust_remote_code,
        )
        _check_cpu_blocks(model, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=base_dtype(device, bf16=bf16), trust_remote_code=trust_remote_code
        )
    if authors_pad:
        add_pad_token(model, tokenizer)
    if settings.quantized:
        # Freezes the base, keeps the non-quantized weights (norms, embeddings) in fp32; its gradient checkpointing
        # only where the run asks for it, and non-reentrant (see `checkpointing_kwargs`).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs(),
        )
    # The Trainer seeds only once it is built, after this: without a seed of their own, two runs of one config
    # would start from different adapters.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return get_peft_model(model, settings.lora_config())
    except ValueError as error:
        if "target" in str(error).lower():
            raise ValueError(
                f"trainer.lora.target_modules={settings.key()['target_modules']!r}: {error} (LLaMA-family "
                f"models name them {', '.join(LLAMA_LINEAR)}; {ALL_LINEAR!r} takes every linear layer)"
            ) from error
        raise


def _check_cpu_blocks(model: torch.nn.Module, device: torch.device) -> None:
    # bitsandbytes' CPU kernel for a 4-bit layer outside training repacks its weight in blocks of 64 inputs
    # (bitsandbytes.functional._convert_weight_packed_for_cpu) and fails with a reshape error on any other width.
    if torch.device(device).type != "cpu":
        return
    for name, module in model.named_modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and module.in_features % 64:
            raise ValueError(
                f"trainer.peft=qlora on the CPU: bitsandbytes' CPU kernels need 4-bit layers whose input size is a "
                f"multiple of 64, and {name} has {module.in_features}; use trainer.peft=lora for this model"
            )


def checkpointing_kwargs() -> dict[str, Any]:
    """Gradient checkpointing without re-entrant autograd: with frozen base weights (LoRA) the re-entrant form
    gets no gradient through a block whose inputs do not require one (PyTorch's torch.utils.checkpoint docs
    recommend use_reentrant=False)."""
    return {"use_reentrant": False}


def _peft_model(model: torch.nn.Module):
    """The PeftModel inside DDP / DeepSpeed wrappers, or None."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model if isinstance(model, PeftModel) else None


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether `model` (possibly wrapped for DDP or DeepSpeed) is an adapted policy."""
    return _peft_model(model) is not None


@contextlib.contextmanager
def initial_policy(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `model` as the initial policy: an adapted policy with its adapters disabled (the base weights it
    started from); any other model as it is (a frozen copy made for the purpose)."""
    peft_model = _peft_model(model)
    if peft_model is None:
        yield model
        return
    with peft_model.disable_adapter():
        yield model


def save_adapter(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    """The adapter's weights and config (and the tokenizer) of an adapted policy, from whichever process runs it."""
    peft_model = _peft_model(model)
    if peft_model is None:
        raise ValueError("save_adapter: the model has no adapters")
    peft_model.save_pretrained(str(out), is_main_process=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if not (Path(out) / "adapter_config.json").exists():
        raise RuntimeError(f"{out}: save_pretrained wrote no adapter_config.json")


def merge_adapter(adapter: Path, out: Path, *, trust_remote_code: bool = False) -> None:
    """Write to `out` the model of the adapter folder `adapter` merged into its base, as a plain fp32 Hugging
    Face folder with the tokenizer. The base is loaded again in fp32 (for QLoRA too, rather than merged into
    its 4-bit copy, which would round the merged weights to 4 bits; and for a LoRA base trained in bf16,
    `base_dtype`, so that the merged fp32 weights are the fp32 base's plus the update, not bf16-rounded)."""
    from rrhf.assets import load_merged_adapter, save_causal_lm

    model, tokenizer = load_merged_adapter(adapter, trust_remote_code=trust_remote_code)
    save_causal_lm(model, tokenizer, out)
