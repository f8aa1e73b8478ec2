"""rrhf.memory: the planned peak memory of a run's stages, and the refusal of a run that would not fit its device."""

import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf import ConfigError
from rrhf.memory import GIB, Adapter, DoesNotFit, Training, check_fits, estimate, model_shape, training_step

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=8000)
TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, vocab_size=2000)
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_folder(folder: Path, **shape) -> Path:
    """A model folder with a LLaMA config.json and no weights (all the estimate reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_key_value_heads": shape["num_attention_heads"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **shape,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "7b": llama_folder(root / "llama-7b", **LLAMA_7B),
        "small": llama_folder(root / "small", **SMALL),
        "tiny": llama_folder(root / "tiny", **TINY),
    }


def config(models: dict[str, Path], *overrides: str, model: str = "small"):
    # The judge is a local folder too, so that no embedded model is converted for the estimate.
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"model.path={models[model]}", f"eval.judge={models['small']}", *overrides])


def train_estimate(models, *overrides: str, model: str = "small"):
    (stage,) = [s for s in estimate(config(models, *overrides, model=model)) if s.stage == "train"]
    return stage


def test_the_stages_of_the_default_run_are_estimated(models) -> None:
    stages = {s.stage: s for s in estimate(config(models))}
    assert set(stages) == {"evaluate", "sample", "train"}  # VADER scores without a model
    for s in stages.values():
        assert s.skipped is None and s.total > s.subtotal > 0
        assert s.total == s.subtotal + GIB + int(0.10 * s.subtotal)  # the stated margin
        assert sum(s.components.values()) == s.subtotal == sum(b for _, _, b in s.terms)
    train = stages["train"]
    assert train.components["optimizer"] == 2 * train.components["grads"]  # two fp32 moments per fp32 gradient


def test_estimate_grows_with_batch_length_and_candidates(models) -> None:
    base = train_estimate(models).components["activations"]
    assert train_estimate(models, "trainer.args.per_device_train_batch_size=8").components["activations"] > base
    assert train_estimate(models, "task.max_new_tokens=96").components["activations"] > base
    assert train_estimate(models, "sampling.num_candidates=2").components["activations"] < base
    official = ["method.train_args.semantics=official"]
    short = train_estimate(models, *official, "trainer.args.model_max_length=192").components["activations"]
    long = train_estimate(models, *official, "trainer.args.model_max_length=384").components["activations"]
    assert long > short
    # Weights and optimiser state do not depend on the batch.
    bigger = train_estimate(models, "trainer.args.per_device_train_batch_size=8")
    assert bigger.components["optimizer"] == train_estimate(models).components["optimizer"]


def test_adapters_and_checkpointing_lower_the_estimate(models) -> None:
    # On a CPU, where a LoRA base stays fp32 (and autocast keeps bf16 casts of it): see the GPU test below.
    full = train_estimate(models, "device=cpu", model="7b")
    lora = train_estimate(models, "device=cpu", "++trainer.peft=lora", model="7b")
    qlora = train_estimate(models, "device=cpu", "++trainer.peft=qlora", model="7b")
    assert qlora.total < lora.total < full.total
    assert lora.components["optimizer"] < full.components["optimizer"] / 100  # adapters only
    assert qlora.components["weights"] < lora.components["weights"] / 4  # a 4-bit base
    checkpointed = train_estimate(models, "device=cpu", "++trainer.args.gradient_checkpointing=true", model="7b")
    assert checkpointed.components["activations"] < full.components["activations"] / 3
    for stage in (full, lora, qlora, checkpointed):
        assert stage.skipped is None


def _frozen_base(stage) -> int:
    (nbytes,) = [b for _, what, b in stage.terms if what.startswith("frozen base")]
    return nbytes


def test_a_lora_base_is_planned_in_bf16_on_a_gpu_training_in_bf16(models) -> None:
    """rrhf.adapters.base_dtype: bf16 base and fp32 adapters on a GPU with bf16 training; fp32 base elsewhere."""
    params = model_shape(str(models["7b"])).params
    gpu, lora = ("device=cuda", "trainer=ddp"), "++trainer.peft=lora"
    full = train_estimate(models, *gpu, model="7b")
    bf16 = train_estimate(models, *gpu, lora, model="7b")
    fp16 = train_estimate(models, *gpu, lora, "trainer.args.bf16=false", "++trainer.args.fp16=true", model="7b")
    cpu = train_estimate(models, "device=cpu", "trainer=ddp", lora, model="7b")
    assert _frozen_base(bf16) == 2 * params
    assert _frozen_base(fp16) == _frozen_base(cpu) == 4 * params
    # Autocast casts only fp32 weights: a bf16 base leaves no bf16 copies of itself for backward.
    casts = [what for _, what, _ in bf16.terms if "casts" in what]
    assert not casts and any("casts" in what for _, what, _ in fp16.terms)
    assert bf16.components["weights"] < fp16.components["weights"] / 2
    assert bf16.components["grads"] == fp16.components["grads"]  # the adapters are fp32 either way
    assert bf16.total < fp16.total < full.total
    # LLaMA-7B in the paper's HH setting (model=alpaca: 6 candidates, 1030 tokens a step) on one 24 GiB GPU: the
    # bf16 base (12.6 GiB) leaves room for a checkpointed step, not for the activations of a whole one (about
    # 10 GiB more, before the margin).
    hh = ("model=alpaca", *gpu, lora)
    whole = train_estimate(models, *hh, model="7b")
    checkpointed = train_estimate(models, *hh, "++trainer.args.gradient_checkpointing=true", model="7b")
    assert whole.components["weights"] == checkpointed.components["weights"]
    assert 2 * params < checkpointed.subtotal < checkpointed.total < 24 * GIB < whole.total


def test_ppo_plans_a_lora_base_in_its_placement_dtype(models) -> None:
    params = model_shape(str(models["7b"])).params
    ppo = ("method=ppo", "device=cuda", "++trainer.peft=lora")
    assert _frozen_base(train_estimate(models, *ppo, model="7b")) == 2 * params  # dtype=auto: bf16 on a GPU
    assert _frozen_base(train_estimate(models, *ppo, "dtype=float32", model="7b")) == 4 * params
    assert _frozen_base(train_estimate(models, "method=ppo", "device=cpu", "++trainer.peft=lora", model="7b")) == (
        4 * params
    )


def test_sharding_divides_the_state_across_ranks(models) -> None:
    cfg = config(models, "trainer=fsdp", model="7b")
    one = [s for s in estimate(cfg, world_size=1) if s.stage == "train"][0]
    eight = [s for s in estimate(cfg, world_size=8) if s.stage == "train"][0]
    assert eight.components["optimizer"] == pytest.approx(one.components["optimizer"] / 8, rel=1e-6)
    assert eight.total < one.total / 3


def test_7b_on_a_24_gib_device_is_refused_with_the_fixes(models, tmp_path: Path) -> None:
    """The paper's training profile (FSDP: 1 query a device, bf16) for a LLaMA-7B-shaped model, on one 24 GiB GPU."""
    artifacts = tmp_path / "artifacts"
    started = time.perf_counter()
    cfg = config(models, "trainer=fsdp", "device_memory_gib=24", f"paths.artifacts={artifacts}", model="7b")
    with pytest.raises(DoesNotFit) as refused:
        check_fits(cfg, world_size=1)
    seconds = time.perf_counter() - started
    message = str(refused.value)
    assert "stage train" in message and "24.0 GiB of device_memory_gib=24" in message
    assert "Settings that bring it under" in message
    for fix in ("trainer.peft=lora", "trainer.peft=qlora", "trainer.args.gradient_checkpointing=true", "ranks"):
        assert fix in message, message
    estimate_gib = float(message.split("estimated ")[1].split(" GiB")[0])
    assert 100 < estimate_gib < 140  # 16 bytes a parameter of state alone is 100 GiB
    assert seconds < 15, seconds
    assert not artifacts.exists()  # planned from config.json alone: nothing built, nothing loaded


def test_a_cpu_run_without_a_stated_device_is_only_reported(models) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, whose memory is the limit")
    stages = check_fits(config(models, "trainer=fsdp", model="7b"), world_size=1)
    assert any(s.stage == "train" and s.total > 100 * GIB for s in stages)


def test_a_model_not_available_offline_is_named_and_skipped(models, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    stages = estimate(config(models, "model.path=someone/not-cached-7b"))
    skipped = [s for s in stages if s.skipped]
    assert skipped and all("model.path='someone/not-cached-7b'" in s.skipped for s in skipped)
    # Nothing to compare with the device: the run is not refused for it.
    assert any(
        s.skipped for s in check_fits(config(models, "model.path=someone/not-cached-7b", "device_memory_gib=24"))
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("device_memory_gib=-1", "device_memory_gib"),
        ("++trainer.peft=dora", "trainer.peft"),
        ("trainer.args.per_device_train_batch_size=0", "trainer.args.per_device_train_batch_size"),
        ("++trainer.lora.target_modules=[no_such_layer]", "trainer.lora.target_modules"),
    ],
)
def test_bad_input_names_its_key(models, override: str, key: str) -> None:
    overrides = [override] + (["++trainer.peft=lora"] if "lora." in override else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        estimate(config(models, *overrides))


def test_the_command_prints_the_table(models) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rrhf.memory", f"model.path={models['7b']}", f"eval.judge={models['small']}"]
        + ["trainer=fsdp", "device_memory_gib=24"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1, done.stderr[-2000:]  # the train stage does not fit
    header = next(line for line in done.stdout.splitlines() if line.startswith("stage"))
    for column in ("model", "weights", "grads", "optimiser", "activations", "total", "device", "fits?"):
        assert column in header
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.split()[:1] in (["train"], ["sample"])}
    assert rows["train"].rstrip().endswith("NO") and rows["sample"].rstrip().endswith("yes")
    assert "trainer.peft=qlora ->" in done.stdout


# ------------------------------------------------------------------------------------- against a measured peak


class TensorPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak of the bytes of tensors that ops allocate while the mode is on (storages counted once). Exact and
    repeatable on a CPU, unlike the process's resident size, which the allocator and the OS blur."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in self.live and storage.nbytes():
                    self.live[id(storage)] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, id(storage))
        self.peak = max(self.peak, self.now)
        return out


def measured_step(folder: Path, *, prompt: int, response: int, k: int, lora: float | None, checkpointing: bool) -> int:
    """Peak tensor bytes of an RRHF optimiser step (after a first one made the AdamW state) on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rrhf.logprobs import group_logprob_sums
    from rrhf.loss import rrhf_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).train()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_dropout=lora, target_modules=LLAMA_LINEAR))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    groups = [
        (torch.randint(4, vocab, (prompt,), generator=gen), [torch.randint(4, vocab, (response,)) for _ in range(k)])
    ]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums, lengths = group_logprob_sums(model, groups, layout="shared")
        rrhf_loss(sums, lengths, torch.arange(k)[None]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    held = [*model.parameters(), *model.buffers()]
    held += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    before = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in held}.values())
    with TensorPeak() as peak:
        step()
    return before + peak.peak


@pytest.mark.parametrize(
    "lora,checkpointing",
    [(None, False), (None, True), (0.05, False), (0.0, False)],
    ids=["full", "ckpt", "lora", "lora0"],
)
def test_the_estimate_bounds_a_measured_cpu_step_closely(models, lora, checkpointing) -> None:
    """An upper bound within 30% of the tensors a real step allocates (tiny LLaMA, bf16 autocast on the CPU)."""
    if lora is not None:
        pytest.importorskip("peft")
    measured = measured_step(models["tiny"], prompt=48, response=64, k=6, lora=lora, checkpointing=checkpointing)
    adapter = Adapter("lora", 16, tuple(LLAMA_LINEAR), lora) if lora is not None else Adapter()
    how = Training(accelerator=False, adapter=adapter, checkpointing=checkpointing)
    planned = training_step(
        model_shape(str(models["tiny"])), tokens=48 + 6 * 64, scored=6 * 64, how=how, mask_rows=1
    ).subtotal
    assert measured <= planned <= 1.3 * measured, (measured / 2**20, planned / 2**20)


def test_run_py_refuses_a_7b_job_on_a_24_gib_device_before_any_stage(models, tmp_path: Path) -> None:
    """The user's command itself: refused at start-up with the estimate and the fixes on the terminal, no stage
    built, no traceback (the refusal is the message)."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "run.py",
            f"model.path={models['7b']}",
            f"eval.judge={models['small']}",
            "device_memory_gib=24",
            f"paths.artifacts={tmp_path}/artifacts",
            f"paths.results={tmp_path}/results",
            f"paths.tables={tmp_path}/tables",
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "RRHF_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - started
    assert done.returncode != 0
    assert "stage train" in done.stderr and "trainer.peft=lora" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "artifacts").exists()
    print(f"refused in {seconds:.1f} s")
    assert seconds < 60, seconds  # about 10 s on a 2-core machine, most of it importing torch and transformers
