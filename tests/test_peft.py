"""LoRA and QLoRA adapters for every trained method (`trainer.peft`, rrhf.adapters), on tiny random LLaMAs:
the initial policy as the adapters disabled, adapters as the only trained weights, the saved adapter and merged
model, exact resume, and every method through run.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from profiles import trainer_profile
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from rrhf.adapters import AdapterSettings, has_adapters, initial_policy, load_adapted_policy
from rrhf.logprobs import group_logprob_sums

ROOT = Path(__file__).resolve().parents[1]
LORA = AdapterSettings("lora")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qlora_unavailable() -> str | None:
    """Why QLoRA cannot run on this machine's CPU, or None (bitsandbytes' 4-bit layers have CPU kernels since
    0.45; they need layers whose input size is a multiple of 64, hence the 64-wide model below)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install 'rrhf[qlora]')"
    except Exception as error:  # a build without kernels for this machine
        return f"bitsandbytes does not load here: {error}"
    return None


QLORA_UNAVAILABLE = _qlora_unavailable()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The asset cache the smoke runs of this session use (tests/conftest.py): embedded:tiny is built once."""
    folder = tmp_path_factory.getbasetemp() / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RRHF_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def tiny(cache: Path) -> Path:
    from rrhf.assets import resolve_model

    return Path(resolve_model("embedded:tiny"))


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer on a two-layer LLaMA 64 wide: the narrowest bitsandbytes' CPU kernels take."""
    from rrhf.assets import build_tiny_model

    out = tmp_path_factory.mktemp("tiny64") / "model"
    build_tiny_model(out, width=64)
    return out


WORDS = "good bad movie film great awful plot acting was is the a very not fun dull".split()


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight queries with three scored candidates each."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("peft_data") / "train.jsonl"
    with open(path, "w") as handle:
        for _ in range(8):
            query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            responses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for _ in range(3)]
            scores = [r.count("good") - r.count("bad") + 0.1 * j for j, r in enumerate(responses)]
            handle.write(json.dumps({"query": query, "responses": responses, "scores": scores}) + "\n")
    return path


def _groups(tokenizer) -> list:
    texts = [("the plot was", ["great fun", "dull and very bad", "a film"]), ("acting is", ["not good", "awful"])]
    return [(tokenizer(q).input_ids, [tokenizer(r, add_special_tokens=False).input_ids for r in rs]) for q, rs in texts]


def _sums(model, groups, layout: str = "shared") -> torch.Tensor:
    with torch.no_grad():
        return group_logprob_sums(model, groups, layout=layout)[0]


def _perturb_adapters(model) -> None:
    """Non-zero B matrices: the adapted policy now differs from its base."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)


def _cpu_args(output_dir: Path, **overrides):
    from rrhf.trainer import RRHFArguments

    kwargs = {**trainer_profile("cpu")["args"], "report_to": "none", "disable_tqdm": True, **overrides}
    return RRHFArguments(output_dir=str(output_dir / "checkpoints"), seed=0, **kwargs)


# ---------------------------------------------------------------------------------------------------
# The initial policy is the adapted one with its adapters disabled


@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_adapters_disabled_give_the_base_log_probs_exactly(tiny: Path, layout: str) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    groups = _groups(AutoTokenizer.from_pretrained(tiny))
    policy = load_adapted_policy(tiny, LORA, device=torch.device("cpu")).eval()
    _perturb_adapters(policy)
    with initial_policy(policy) as reference:
        assert reference is policy  # the same weights, not a copy
        disabled = _sums(reference, groups, layout)
    assert torch.equal(disabled, _sums(base, groups, layout))
    assert not torch.equal(_sums(policy, groups, layout), disabled)  # back on after the block
    assert has_adapters(policy) and not has_adapters(base)
    with initial_policy(base) as same:  # a plain model is its own initial policy
        assert torch.equal(_sums(same, groups, layout), disabled)


@pytest.mark.slow
def test_adapters_disabled_give_the_embedded_policy_exactly() -> None:
    """The same on the embedded SmolLM2-135M-Instruct (converting it once costs tens of seconds)."""
    from rrhf.assets import resolve_model

    path = resolve_model("embedded:smollm2")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    groups = _groups(AutoTokenizer.from_pretrained(path))
    policy = load_adapted_policy(path, LORA, device=torch.device("cpu")).eval()
    assert torch.equal(_sums(policy, groups), _sums(base, groups))  # step 0: B = 0
    _perturb_adapters(policy)
    with initial_policy(policy):
        assert torch.equal(_sums(policy, groups), _sums(base, groups))


def test_at_step_zero_the_adapted_policy_is_its_reference(tiny: Path) -> None:
    """LoRA's B starts at zero (Hu et al. 2021, Section 4.1): before a step, policy and reference agree exactly,
    as do the OP+KL log-ratios, whose rho is the policy itself with its adapters disabled."""
    from rrhf.collator import RRHFCollator
    from rrhf.online import OnlineSettings

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    groups = _groups(tokenizer)
    policy = load_adapted_policy(tiny, LORA, device=torch.device("cpu")).eval()
    with initial_policy(policy):
        reference = _sums(policy, groups)
    assert torch.equal(_sums(policy, groups), reference)

    rows = [{"prompt": "the plot was"}, {"prompt": "acting is"}]
    records = [{"query": r["prompt"], "responses": ["a", "b"], "scores": [0.0, 1.0]} for r in rows]
    settings = OnlineSettings(rows=rows, sampling=None, scorer=None, refresh_steps=1, kl_coef=0.1)
    candidates = settings.candidates(records, RRHFCollator(tokenizer), policy, Path("unused"), schedule=None)
    assert candidates.reference is policy  # no deep copy of the policy
    ratios = candidates._log_ratios(policy, ["the plot was"], [["great fun", "dull"]])
    assert ratios == [[0.0, 0.0]]
    _perturb_adapters(policy)
    assert all(r != 0.0 for r in candidates._log_ratios(policy, ["the plot was"], [["great fun", "dull"]])[0])


def test_at_step_zero_the_adapted_policy_generates_what_the_base_does(tiny: Path) -> None:
    """OP-k's refreshes generate with the adapted policy: the diverse beam search (which passes position ids for
    left-padded prompts only to a forward that names them) and sampling see it as the base model."""
    from omegaconf import OmegaConf

    from rrhf.generation import generate_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    policy = load_adapted_policy(tiny, LORA, device=torch.device("cpu"))
    prompts = ["the plot of this movie was", "acting is"]  # of different lengths: left padding
    common = dict(num_candidates=2, max_new_tokens=5, max_prompt_tokens=16, temperature=1.0, top_p=0.9)
    for generator in ("diverse_beam", "top_p"):
        cfg = OmegaConf.create(dict(common, generator=generator, num_beams=2, num_beam_groups=2, diversity_penalty=1.0))
        assert generate_batch(policy, tokenizer, prompts, cfg, seed=3) == generate_batch(
            base, tokenizer, prompts, cfg, seed=3
        ), generator


def test_only_the_adapters_train(tiny: Path) -> None:
    policy = load_adapted_policy(tiny, LORA, device=torch.device("cpu"))
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # An adapter pair (A, B) on each of the 7 projections of both blocks.
    assert len(trainable) == 2 * 7 * 2
    with pytest.raises(ValueError, match="trainer.lora.target_modules"):
        load_adapted_policy(tiny, AdapterSettings("lora", target_modules=["c_attn"]), device=torch.device("cpu"))


@pytest.mark.parametrize(
    "device,bf16,frozen",
    [("cuda", True, torch.bfloat16), ("cuda", False, torch.float32), ("cpu", True, torch.float32)],
)
def test_a_lora_base_is_bf16_only_on_a_gpu_training_in_bf16(tiny: Path, device: str, bf16: bool, frozen) -> None:
    """peft / TRL's recipe: the frozen base in bf16 where training is bf16 on a GPU, the adapters fp32 always.
    (Loading places nothing on the device, so the CUDA choice is checked here on the CPU.)"""
    policy = load_adapted_policy(tiny, LORA, device=torch.device(device), bf16=bf16)
    trainable = {p.dtype for p in policy.parameters() if p.requires_grad}
    assert trainable == {torch.float32}  # get_peft_model's autocast_adapter_dtype=True upcasts bf16 adapters
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {frozen}


# ---------------------------------------------------------------------------------------------------
# Training, saving, loading, resuming (in process)


def _changed(base: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> set[str]:
    assert base.keys() == trained.keys()
    return {name for name in base if not torch.equal(base[name], trained[name])}


def test_lora_training_saves_the_adapter_and_the_merged_model(tiny: Path, train_file: Path, tmp_path: Path) -> None:
    from rrhf.assets import is_adapter_folder, load_causal_lm, model_identity
    from rrhf.training import train

    final = train(
        tiny,
        train_file,
        tmp_path,
        args=_cpu_args(tmp_path, max_steps=2, learning_rate=5e-2, warmup_steps=0),
        adapters=LORA,
    )
    assert final == tmp_path / "model" and is_adapter_folder(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == sorted(TARGETS)
    # The merged model is a plain causal LM of the base's shape, in fp32; only the adapted projections moved.
    base, merged = load_file(tiny / "model.safetensors"), load_file(final / "model.safetensors")
    changed = _changed(base, merged)
    assert changed and all(any(t in name for t in TARGETS) for name in changed)
    assert all(t.dtype == torch.float32 for t in merged.values())
    # Loading the adapter folder gives the merged model.
    from_adapter = load_causal_lm(str(tmp_path / "adapter"))[0].state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(from_adapter[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert model_identity(str(tmp_path / "adapter")).startswith("adapter:")


def test_sft_objective_trains_adapters(tiny: Path, train_file: Path, tmp_path: Path) -> None:
    from rrhf.training import train

    args = _cpu_args(tmp_path, max_steps=1, learning_rate=5e-2, warmup_steps=0, objective="lm")
    final = train(tiny, train_file, tmp_path, args=args, adapters=AdapterSettings("lora", target_modules="all-linear"))
    changed = _changed(load_file(tiny / "model.safetensors"), load_file(final / "model.safetensors"))
    assert changed and all(any(t in name for t in TARGETS) for name in changed)


class _KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            raise RuntimeError(f"killed after step {self.step}")


@pytest.mark.parametrize("method", ["rrhf", "dpo"])
def test_interrupted_adapter_training_resumes_to_the_same_adapter(
    tiny: Path, train_file: Path, tmp_path: Path, method: str
) -> None:
    """Trainer checkpoints of a PeftModel hold its adapter; a resumed run ends where an unbroken one does. DPO
    without its cached reference log-probs recomputes them: the adapters off, that is the initial policy still."""
    from rrhf.trainer import PairwiseArguments
    from rrhf.training import train

    options = dict(max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2, warmup_steps=0, save_steps=1)

    def args(folder: Path):
        if method == "rrhf":
            return _cpu_args(folder, **options)
        kwargs = {**trainer_profile("cpu")["args"], "report_to": "none", "disable_tqdm": True, **options}
        return PairwiseArguments(output_dir=str(folder / "checkpoints"), seed=0, loss="dpo", beta=0.1, **kwargs)

    whole = train(tiny, train_file, tmp_path / "whole", args=args(tmp_path / "whole"), adapters=LORA)
    parts = tmp_path / "parts"
    with pytest.raises(RuntimeError, match="killed after step 2"):
        train(tiny, train_file, parts, args=args(parts), callbacks=[_KillAfterSave(2)], adapters=LORA)
    if method == "dpo":
        (parts / "reference_logprobs.jsonl").unlink()
    resumed = train(tiny, train_file, parts, args=args(parts), adapters=LORA)

    for folder in ("adapter", "model"):
        name = "adapter_model.safetensors" if folder == "adapter" else "model.safetensors"
        a, b = load_file(whole.parent / folder / name), load_file(resumed.parent / folder / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=f"{folder}/{key}")
    if method == "dpo":
        assert (parts / "reference_logprobs.jsonl").read_text() == (
            whole.parent / "reference_logprobs.jsonl"
        ).read_text()


def test_authors_pad_token_with_adapters(tiny: Path, train_file: Path, tmp_path: Path) -> None:
    """preset=authors adds [PAD] to the base before the adapters go on; the merge gives the base that row too."""
    from rrhf.assets import load_causal_lm
    from rrhf.training import train

    no_pad = tmp_path / "no_pad"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(no_pad)
    out = tmp_path / "out"
    saved = train(no_pad, train_file, out, args=_cpu_args(out, max_steps=1, add_pad_token=True), adapters=LORA)
    rows = len(tokenizer) + 1
    assert AutoModelForCausalLM.from_pretrained(saved).get_input_embeddings().weight.shape[0] == rows
    model, loaded = load_causal_lm(str(out / "adapter"))
    assert loaded.pad_token == "[PAD]" and model.get_input_embeddings().weight.shape[0] == rows


def test_gradient_checkpointing_trains_the_same_adapter(tiny: Path, train_file: Path, tmp_path: Path) -> None:
    """+trainer.args.gradient_checkpointing=true recomputes activations (non-reentrant) and changes no value."""
    from rrhf.training import train

    options = dict(max_steps=2, learning_rate=5e-2, warmup_steps=0, save_steps=1000)
    plain = train(tiny, train_file, tmp_path / "plain", args=_cpu_args(tmp_path / "plain", **options), adapters=LORA)
    args = _cpu_args(tmp_path / "gc", gradient_checkpointing=True, **options)
    checkpointed = train(tiny, train_file, tmp_path / "gc", args=args, adapters=LORA)
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    a, b = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


class _LengthScorer:
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [len(r.split()) / 4 - 0.1 * r.count("the") for r in responses]


PROMPTS = ["the plot of this movie is", "honestly the acting was", "every scene in the film", "a very dull"]


def test_ppo_with_adapters_resumes_and_keeps_its_reference(cache: Path, tmp_path: Path) -> None:
    """PPO's checkpoint holds the adapters (under the PeftModel's names) and the value head; a resumed run ends
    where an unbroken one does, and only the adapted projections of the policy moved."""
    from rrhf.assets import resolve_model
    from rrhf.ppo import PPOConfig, train_ppo

    def config(iterations: int) -> PPOConfig:
        return PPOConfig(
            iterations=iterations,
            num_rollouts=8,
            chunk_size=4,
            batch_size=4,
            ppo_epochs=2,
            max_new_tokens=4,
            learning_rate=1e-2,
            init_kl_coef=0.5,
            target=0.1,
        )

    whole = train_ppo("embedded:tiny", PROMPTS, None, _LengthScorer(), tmp_path / "whole", config(2), adapters=LORA)
    parts = tmp_path / "parts"
    train_ppo("embedded:tiny", PROMPTS, None, _LengthScorer(), parts, config(1), adapters=LORA)
    saved = torch.load(parts / "checkpoint" / "state.pt", weights_only=True)["policy"]
    assert saved and all("lora_" in name for name in saved)
    resumed = train_ppo("embedded:tiny", PROMPTS, None, _LengthScorer(), parts, config(2), adapters=LORA)

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    changed = _changed(load_file(Path(resolve_model("embedded:tiny")) / "model.safetensors"), a)
    assert changed and all(any(t in name for t in TARGETS) for name in changed)
    assert (parts / "adapter" / "adapter_config.json").exists()
    history = json.loads((parts / "log_history.json").read_text())
    assert [row["mean_kl"] for row in history] == [
        row["mean_kl"] for row in json.loads((whole.parent / "log_history.json").read_text())
    ]
    assert history[0]["mean_kl"] == 0.0  # round 1 samples from the initial policy: pi = rho exactly


# ---------------------------------------------------------------------------------------------------
# Configuration


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import rrhf  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.peft=dora"], "trainer.peft='dora': expected one of none, lora, qlora"),
        (["trainer.peft=lora", "trainer.lora.r=0"], "trainer.lora.r=0: expected an integer >= 1"),
        (["trainer.peft=lora", "trainer.lora.alpha=-1"], "trainer.lora.alpha=-1: expected a finite number > 0.0"),
        (["trainer.peft=lora", "trainer.lora.dropout=1.0"], "trainer.lora.dropout=1.0: expected a finite number"),
        (["trainer.peft=lora", "trainer.lora.target_modules=[]"], "trainer.lora.target_modules=[]: expected a"),
        (["trainer.peft=lora", "+trainer.lora.rank=8"], "trainer.lora.rank: not a LoRA setting"),
        (["trainer.peft=qlora", "trainer=fsdp"], "trainer.peft=qlora with trainer.args.fsdp=True"),
    ],
)
def test_bad_adapter_settings_are_refused(overrides: list[str], message: str) -> None:
    from rrhf.config_checks import ConfigError, check_config
    from rrhf.ppo import PPOConfig

    with pytest.raises(ConfigError) as error:
        check_config(_compose(*overrides), ppo=PPOConfig, launch=False)
    assert message in str(error.value)


def test_qlora_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from rrhf.config_checks import ConfigError, check_config
    from rrhf.ppo import PPOConfig

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'rrhf\[qlora\]'"):
        check_config(_compose("trainer.peft=qlora"), ppo=PPOConfig, launch=False)


def test_adapter_settings_key_the_train_stage_only_when_used() -> None:
    """Full training's stage keys stay as they were; adapters and their settings are part of the key."""
    from omegaconf import OmegaConf

    cfg = _compose()
    assert AdapterSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True)) is None
    lora = AdapterSettings.from_config(OmegaConf.to_container(_compose("trainer.peft=lora").trainer, resolve=True))
    assert lora.key() == {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": list(TARGETS)}
    assert "peft" not in OmegaConf.to_container(cfg.trainer.args)


# ---------------------------------------------------------------------------------------------------
# Every method through run.py


METHODS = ["rrhf", "dpo", "simpo", "cpo", "sft", "ppo"]
# PPO at the smoke run's size: one round of 8 rollouts, one update pass (trlX's 156 rounds of 64 otherwise).
SMALL_PPO = [
    "++method.ppo.iterations=1",
    "++method.ppo.num_rollouts=8",
    "++method.ppo.chunk_size=8",
    "++method.ppo.ppo_epochs=1",
]


@pytest.fixture(scope="module")
def methods_run(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`run.py -m experiment=smoke trainer.peft=lora method=...` over every trained method: one process, the
    sample and score stages shared by the methods that train on them."""
    tmp = tmp_path_factory.mktemp("peft_methods")
    _multirun(tmp, "experiment=smoke", "trainer.peft=lora", f"method={','.join(METHODS)}", *SMALL_PPO, cache=cache)
    return tmp


def _multirun(tmp: Path, *overrides: str, cache: Path) -> None:
    """`python run.py -m OVERRIDES` as `fixtures.runs.run_py` starts a single run (which puts its paths first,
    where Hydra takes no -m)."""
    env = {**os.environ, "RRHF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("RRHF_CRASH_AT", None)
    command = [sys.executable, "run.py", "-m", *overrides]
    command += [f"paths.artifacts={tmp}/artifacts", f"paths.results={tmp}/results", f"paths.tables={tmp}/tables"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def _trained(artifacts: Path, stage: str) -> list[Path]:
    return [p for p in (artifacts / stage).iterdir() if (p / "DONE").exists()]


def test_every_method_trains_adapters_through_run_py(methods_run: Path, tiny: Path) -> None:
    for method in METHODS:
        (metrics,) = (methods_run / "results" / "smoke").glob(f"*method={method},*/metrics.json")
        assert json.loads(metrics.read_text())["final"]["artifact"]
    folders = _trained(methods_run / "artifacts", "train") + _trained(methods_run / "artifacts", "ppo")
    assert len(folders) == len(METHODS)
    base = load_file(tiny / "model.safetensors")
    for folder in folders:
        assert json.loads((folder / "inputs.json").read_text())["peft"]["method"] == "lora", folder
        assert (folder / "adapter" / "adapter_model.safetensors").exists(), folder
        changed = _changed(base, load_file(folder / "model" / "model.safetensors"))
        assert changed and all(any(t in name for t in TARGETS) for name in changed), folder
    (dpo,) = [f for f in folders if json.loads((f / "inputs.json").read_text()).get("method", {}).get("loss") == "dpo"]
    assert (dpo / "reference_logprobs.jsonl").exists()


def test_online_sampling_with_kl_through_run_py(cache: Path, tiny64: Path, tmp_path: Path) -> None:
    """OP with its KL term at the smoke run's size, re-sampling after every step (OP-32's first refresh would come
    after the run's two steps), with LoRA and, where bitsandbytes runs, QLoRA; on the 64-wide model, the narrowest
    that bitsandbytes' CPU kernels take."""
    methods = ["lora"] + ["qlora"] * (QLORA_UNAVAILABLE is None)
    overrides = ["sampling=OP-32+KL", "sampling.refresh_steps=1", f"trainer.peft={','.join(methods)}"]
    _multirun(tmp_path, "experiment=smoke", f"model.path={tiny64}", *overrides, cache=cache)
    assert len(list((tmp_path / "results").rglob("metrics.json"))) == len(methods)
    base = load_file(tiny64 / "model.safetensors")
    for folder in _trained(tmp_path / "artifacts", "train"):
        (refresh,) = (folder / "online").glob("step-1.*.jsonl")
        rows = [json.loads(line) for line in refresh.read_text().splitlines()]
        # rho is the policy with its adapters off: after one step, the re-sampled candidates' log-ratios are not 0.
        assert any(k != 0.0 for row in rows for k in row["log_ratios"][: row["sampled"]])
        assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
            tiny64
        )
        merged = load_file(folder / "model" / "model.safetensors")
        assert all(t.dtype == torch.float32 for t in merged.values())  # QLoRA: merged into the fp32 base
        changed = _changed(base, merged)
        assert changed and all(any(t in name for t in TARGETS) for name in changed)


@pytest.mark.skipif(QLORA_UNAVAILABLE is not None, reason=f"QLoRA not testable here: {QLORA_UNAVAILABLE}")
def test_qlora_trains_adapters_on_a_4bit_base(tiny64: Path, train_file: Path, tmp_path: Path) -> None:
    """QLoRA's base is NF4 with double quantization and bf16 compute; only the adapters train, and the adapter is
    merged into the base reloaded in fp32. On the CPU where bitsandbytes has CPU kernels (0.45 and later)."""
    import bitsandbytes as bnb

    from rrhf.training import train

    qlora = AdapterSettings("qlora")
    policy = load_adapted_policy(tiny64, qlora, device=torch.device("cpu"))
    quantized = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(m.weight.quant_type == "nf4" for m in quantized)
    assert quantized[0].compute_dtype == torch.bfloat16 and quantized[0].weight.quant_state.nested  # double quant
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)

    args = _cpu_args(tmp_path, max_steps=2, learning_rate=5e-2, warmup_steps=0)
    final = train(tiny64, train_file, tmp_path, args=args, adapters=qlora)
    merged = load_file(final / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in merged.values())
    changed = _changed(load_file(tiny64 / "model.safetensors"), merged)
    assert changed and all(any(t in name for t in TARGETS) for name in changed)
    # Unchanged weights are the base's exactly: the merge went into the fp32 base, not a 4-bit round trip.
    assert torch.equal(merged["model.norm.weight"], load_file(tiny64 / "model.safetensors")["model.norm.weight"])


@pytest.mark.slow
def test_killed_lora_run_resumes_to_the_unbroken_run(methods_run: Path, cache: Path, tmp_path: Path) -> None:
    """RRHF_CRASH_AT=train kills the LoRA run after its first checkpoint; the rerun resumes from it and ends
    with the adapter and merged model of the unbroken run (methods_run's rrhf job, the same train stage key)."""
    command = [
        sys.executable,
        "run.py",
        "experiment=smoke",
        "trainer.peft=lora",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.results={tmp_path}/results",
        f"paths.tables={tmp_path}/tables",
    ]
    env = {**os.environ, "RRHF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    killed = subprocess.run(
        command, cwd=ROOT, env={**env, "RRHF_CRASH_AT": "train"}, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    (partial,) = (tmp_path / "artifacts" / "train").glob("*.partial")
    assert list((partial / "checkpoints").glob("checkpoint-1/adapter_model.safetensors"))
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (ours,) = _trained(tmp_path / "artifacts", "train")
    theirs = methods_run / "artifacts" / "train" / ours.name  # same inputs, same key
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(theirs / name), load_file(ours / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
