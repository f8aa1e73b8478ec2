"""RRHF training end to end on a tiny LLaMA: learning, logs, exact resume, layouts, profiles, DeepSpeed."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from profiles import trainer_profile
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from rrhf.collator import RRHFCollator
from rrhf.data import read_training_file
from rrhf.logprobs import group_logprob_sums
from rrhf.loss import rrhf_loss
from rrhf.trainer import RRHFArguments, RRHFTrainer
from rrhf.training import last_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = "good bad movie film great awful plot acting was is the a very not fun dull".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LLaMA + word-level tokenizer folder, and an 8-query training file with 3 candidates each."""
    root = tmp_path_factory.mktemp("rrhf")
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    model_dir = root / "model"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(0)
    train_file = root / "train.jsonl"
    with open(train_file, "w") as handle:
        for _ in range(8):
            query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            responses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for _ in range(3)]
            scores = [r.count("good") - r.count("bad") + 0.1 * j for j, r in enumerate(responses)]
            handle.write(json.dumps({"query": query, "responses": responses, "scores": scores}) + "\n")
    return model_dir, train_file


def cpu_args(output_dir: Path, **overrides) -> RRHFArguments:
    """The cpu profile as the pipeline builds it, with overrides for a tiny fast run."""
    kwargs = {**trainer_profile("cpu")["args"], "report_to": "none", "disable_tqdm": True, **overrides}
    return RRHFArguments(output_dir=str(output_dir / "checkpoints"), seed=0, **kwargs)


def dataset_loss(model_dir, train_file, rank_weight: float) -> float:
    """RRHF loss of the whole training file under the model in `model_dir` (fp32, no grad)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = RRHFCollator(AutoTokenizer.from_pretrained(model_dir))(read_training_file(train_file))
    with torch.no_grad():
        sums, lengths = group_logprob_sums(model, batch["groups"])
        out = rrhf_loss(sums, lengths, batch["reward_ranks"], valid=batch["valid"], rank_weight=rank_weight)
    return out.loss.item()


def test_training_lowers_the_loss_and_logs_both_terms(assets, tmp_path):
    model_dir, train_file = assets
    args = cpu_args(tmp_path, num_train_epochs=8, learning_rate=1e-2, rank_weight=2.0, save_steps=1000)
    final = train(model_dir, train_file, tmp_path, args=args)
    assert final == tmp_path / "model"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert load_file(final / "model.safetensors")["model.norm.weight"].dtype == torch.float32
    before = dataset_loss(model_dir, train_file, rank_weight=2.0)
    after = dataset_loss(final, train_file, rank_weight=2.0)
    assert after < 0.7 * before, (before, after)

    history = json.loads((tmp_path / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 16  # 8 queries / 4 per batch x 8 epochs, logged every step
    for h in steps:
        # One step per log and one batch per step: the logged loss is exactly rank_weight * rank + sft.
        assert h["loss"] == pytest.approx(2.0 * h["rank_loss"] + h["sft_loss"], rel=1e-4, abs=1e-4)
    assert steps[-1]["loss"] < steps[0]["loss"]


class StopAfterSave(TrainerCallback):
    """Simulates a job killed right after a checkpoint was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"killed after step {self.step}")


def test_interrupted_run_resumes_to_the_same_weights(assets, tmp_path):
    model_dir, train_file = assets
    options = dict(num_train_epochs=2, per_device_train_batch_size=2, learning_rate=1e-3, save_steps=3)
    whole = train(model_dir, train_file, tmp_path / "whole", args=cpu_args(tmp_path / "whole", **options))

    parts = tmp_path / "parts"
    with pytest.raises(RuntimeError, match="killed after step 3"):
        train(model_dir, train_file, parts, args=cpu_args(parts, **options), callbacks=[StopAfterSave(3)])
    assert last_checkpoint(parts / "checkpoints").endswith("checkpoint-3")  # mid-epoch: 4 steps per epoch
    resumed = train(model_dir, train_file, parts, args=cpu_args(parts, **options))

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    start = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(start[n], a[n]) for n in a)  # it did train
    losses = [h["loss"] for h in json.loads((parts / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 8


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_layouts_give_the_same_loss_and_gradients(assets, tmp_path, semantics):
    model_dir, train_file = assets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = RRHFCollator(tokenizer, semantics=semantics)(read_training_file(train_file)[:3])
    results = {}
    for layout in ("shared", "concat"):
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = cpu_args(tmp_path, bf16=False, layout=layout, semantics=semantics)
        trainer = RRHFTrainer(model=model, args=args)
        loss, parts = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[layout] = (loss.detach(), parts["rank"].detach(), grads)
    (loss_s, rank_s, grads_s), (loss_c, rank_c, grads_c) = results["shared"], results["concat"]
    torch.testing.assert_close(loss_s, loss_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(rank_s, rank_c, atol=1e-5, rtol=0)
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_c[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["cpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_profiles_are_valid_arguments(name, tmp_path):
    profile = trainer_profile(name)
    assert profile["name"] == name and set(profile) == {"name", "args", "peft", "lora"}
    assert profile["peft"] == "none"  # every weight trains unless trainer.peft says otherwise (tests/test_peft.py)
    args = dict(profile["args"])
    if name != "cpu":  # GPU profiles: bf16 / tf32 cannot be checked on a CPU-only machine
        assert args.pop("bf16") is True and args.pop("tf32") is True
    method = {"semantics": "official", "rank_weight": 1.0, "length_penalty": 1.0}
    built = RRHFArguments(output_dir=str(tmp_path), seed=3, **args, **method)
    assert built.learning_rate == 2e-5 and built.weight_decay == 0.0 and built.warmup_steps == 0.03
    assert built.lr_scheduler_type == "cosine" and not built.save_only_model
    queries_per_step = built.per_device_train_batch_size * built.gradient_accumulation_steps
    assert queries_per_step == (4 if name == "cpu" else 8)  # x 8 GPUs = the paper's 64
    if name.startswith("deepspeed"):
        config = json.loads(Path(built.deepspeed).read_text())
        assert config["zero_optimization"]["stage"] == int(name[-1])


def test_sft_objective_is_trlx_next_token_loss_over_prompt_and_response(assets, tmp_path):
    # trlX sft_hh (issue 14 item 7): prompt + chosen joined as they are, no special tokens, the last
    # model_max_length tokens, every token a label, the batch's mean token NLL; batches in file order.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf.collator import LMCollator

    model_dir, _ = assets
    rng = random.Random(1)
    rows = [
        {
            "query": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))),
            "responses": [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))],
            "scores": [1.0],
        }
        for _ in range(8)
    ]
    train_file = tmp_path / "sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = cpu_args(
        tmp_path,
        objective="lm",
        model_max_length=6,
        bf16=False,
        max_steps=1,
        learning_rate=1e-6,
        per_device_train_batch_size=4,
        train_sampling_strategy="sequential",
        logging_steps=1,
    )
    train(model_dir, train_file, tmp_path, args=args)
    logged = json.loads((tmp_path / "log_history.json").read_text())[0]["loss"]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    nll, count = 0.0, 0
    for row in rows[:4]:
        ids = tokenizer(row["query"] + row["responses"][0], add_special_tokens=False).input_ids[-6:]
        assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        nll -= logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += len(ids) - 1
    assert logged == pytest.approx(nll / count, abs=1e-4)
    batch = LMCollator(tokenizer, max_length=6)(rows[:2])
    assert (batch["labels"] == torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)).all()


def test_authors_pad_token_in_training(assets, tmp_path):
    # train.py:296-301: a tokenizer without a pad token gains [PAD]; the trained model keeps the extra row.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, train_file = assets
    no_pad = tmp_path / "no_pad"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(no_pad)
    saved = train(
        no_pad, train_file, tmp_path / "out", args=cpu_args(tmp_path / "out", max_steps=1, add_pad_token=True)
    )
    assert AutoTokenizer.from_pretrained(saved).pad_token == "[PAD]"
    assert AutoModelForCausalLM.from_pretrained(saved).get_input_embeddings().weight.shape[0] == len(tokenizer) + 1


def test_rrhf_arguments_reject_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="semantics"):
        RRHFArguments(output_dir=str(tmp_path), semantics="wrong", use_cpu=True)
    with pytest.raises(ValueError, match="layout"):
        RRHFArguments(output_dir=str(tmp_path), layout="wrong", use_cpu=True)
    with pytest.raises(ValueError, match="objective"):
        RRHFArguments(output_dir=str(tmp_path), objective="wrong", use_cpu=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ~10 s, ~35 s on a fresh machine (DeepSpeed builds its CPU comm op once): cheap enough for every run.
def test_deepspeed_zero2_single_cpu_process_matches_plain_training(assets, tmp_path):
    model_dir, train_file = assets
    options = dict(
        bf16=False,
        num_train_epochs=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        save_steps=1000,
    )
    plain = train(model_dir, train_file, tmp_path / "plain", args=cpu_args(tmp_path / "plain", **options))

    script = textwrap.dedent(f"""
        import json, sys
        from rrhf.trainer import RRHFArguments
        from rrhf.training import train
        args = {{**json.loads(sys.argv[2]), "tf32": False, "report_to": "none", "disable_tqdm": True,
                **json.loads(sys.argv[1])}}
        out = {str(tmp_path / "ds")!r}
        train({str(model_dir)!r}, {str(train_file)!r}, out,
              args=RRHFArguments(output_dir=out + "/checkpoints", seed=0, **args))
    """)
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WANDB_MODE": "disabled",
    }
    profile = trainer_profile("deepspeed_zero2")["args"]
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(options), json.dumps(profile)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(plain / "model.safetensors"), load_file(tmp_path / "ds" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
