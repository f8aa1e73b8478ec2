"""The whole run configuration checked before any stage does work: `check_config`.

One function over the composed config rather than Hydra structured configs: the groups' options carry
different keys (a sampling setting's generator decides which of its keys matter), `trainer.args` and
`method.ppo` feed dataclasses whose own fields are the schema, and ranges and cross-key rules (beams a
multiple of groups, a distributed launch for FSDP) are beyond what a structured config checks. Every
refusal is one `ConfigError` that names the key, the value and what is allowed.

What is checked: types and ranges of every key the stages read; that `trainer.args`, `method.train_args`
(RRHFArguments, or PairwiseArguments for DPO, SimPO and CPO) and `method.ppo` name only fields of the
classes they become; the files and folders a config names (local model, judge and data folders, a training
file, a DeepSpeed file); and what this machine and launch
cannot run (a CUDA device without one; FSDP or DeepSpeed training in a plain process without a distributed
launch, which fails inside the Trainer; DeepSpeed without its package; QLoRA adapters without bitsandbytes).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rrhf import PROJECT_ROOT, ConfigError
from rrhf.adapters import ALL_LINEAR, AdapterSettings, bitsandbytes_missing
from rrhf.adapters import METHODS as ADAPTER_METHODS
from rrhf.data import IMDB_RULES, TRAIN_ON
from rrhf.generation import PROMPT_BOS
from rrhf.logprobs import LAYOUTS
from rrhf.loss import SEMANTICS
from rrhf.pairwise import LOSSES as PAIRWISE
from rrhf.pairwise import PAIRS
from rrhf.placement import DTYPES

METHODS = ("rrhf", "sft", *PAIRWISE, "ppo", "best_of_n", "none")
# Methods whose training runs trainer.args (PPO has its own loop).
TRAINED_BY_THE_TRAINER = ("rrhf", "sft", *PAIRWISE)
GENERATORS = ("diverse_beam", "beam", "top_p", "top_k", "none", "file", "sources")
REWARDS = ("vader", "gptj_rm_static", "sequence_classifier", "llm_judge")
# What a distributed launch (torchrun, a SLURM task made a torch rank) sets and FSDP / DeepSpeed need.
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Set by the pipeline itself: in trainer.args they would clash with (or silently lose to) its own.
SET_BY_THE_PIPELINE = {"output_dir": "the stage's folder", "seed": "the top-level `seed`"}
ABSENT = object()


@dataclass(frozen=True)
class Rule:
    allowed: str  # what is allowed, in words
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int | None = None, *, null: str | None = None, also: tuple = ()) -> Rule:
    words = "an integer" + (f" >= {low}" if low is not None else "")
    words = " or ".join([*(repr(a) for a in also), words]) + (f", or null ({null})" if null else "")
    return Rule(
        words,
        lambda v: (
            (null is not None and v is None) or v in also and _is_int(v) or (_is_int(v) and (low is None or v >= low))
        ),
    )


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    null: str | None = None,
) -> Rule:
    parts = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
    parts += [f"{'<' if high_open else '<='} {high}"] if high is not None else []
    words = "a finite number" + (" " + " and ".join(parts) if parts else "") + (f", or null ({null})" if null else "")

    def ok(v: Any) -> bool:
        if null is not None and v is None:
            return True
        if not _is_number(v):
            return False
        return (low is None or (v > low if low_open else v >= low)) and (
            high is None or (v < high if high_open else v <= high)
        )

    return Rule(words, ok)


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def choice(*options: Any, null: bool = False) -> Rule:
    words = "one of " + ", ".join(map(str, options)) + (", or null" if null else "")
    return Rule(
        words,
        lambda v: (null and v is None) or (isinstance(v, (str, int)) and not isinstance(v, bool) and v in options),
    )


def text(*, empty: bool = False, null: bool = False) -> Rule:
    words = ("a string" if empty else "a non-empty string") + (", or null" if null else "")
    return Rule(words, lambda v: (null and v is None) or (isinstance(v, str) and (empty or bool(v.strip()))))


def strings(options: tuple[str, ...]) -> Rule:
    return Rule(
        f"a list of {', '.join(options)}",
        lambda v: isinstance(v, list) and all(isinstance(x, str) and x in options for x in v),
    )


def aspect_weights() -> Rule:
    """reward.weights of the LLM judge: null (the mean), or a weight >= 0 for each of its four aspects."""
    from rrhf.judging.aspects import ASPECTS, check_weights

    def ok(v: Any) -> bool:
        try:
            check_weights(v)
        except ValueError:
            return False
        return True

    return Rule(f"null (the mean), or a mapping of {', '.join(ASPECTS)} to numbers >= 0, not all 0", ok)


POSITIVE, COUNT = integer(1), integer(0)
DTYPE = choice("auto", *DTYPES)
PROBABILITY_MASS = number(0.0, 1.0, low_open=True)  # top-p
BETA = number(0.0, 1.0, high_open=True)  # Adam's betas

RULES: dict[str, Rule] = {
    "seed": Rule("an integer in [0, 2**32) (numpy's seed range)", lambda v: _is_int(v) and 0 <= v < 2**32),
    "threads": integer(1, null="torch's default"),
    "cpu_allocator": choice("keep_freed", "system"),
    "dtype": DTYPE,
    "collate": boolean(),
    "name": text(),
    "paths.artifacts": text(),
    "paths.results": text(),
    "paths.tables": text(),
    "task.name": text(),
    "task.family": choice("hh", "imdb", "offline", "alpaca"),
    "task.source": text(),
    "task.train_size": integer(1, null="every row"),
    "task.test_size": integer(1, null="every row"),
    "task.max_new_tokens": POSITIVE,
    "task.format": choice("imdb_prefix", "alpaca", null=True),
    "task.prefix.rule": choice(*IMDB_RULES),
    "task.prefix.prompt_fraction": number(0.0, 1.0, low_open=True, high_open=True),
    "task.prefix.train_fraction": number(0.0, 1.0, low_open=True),
    "task.prefix.shuffle_seed": integer(0, null="no shuffle"),
    "task.prefix.tokenizer": text(null=True),
    "task.prefix.prefix_tokens": integer(1, null="not used by this rule"),
    "model.name": text(),
    "model.path": text(),
    "model.trust_remote_code": boolean(),
    "sampling.name": text(),
    "sampling.generator": choice(*GENERATORS),
    "sampling.dataset_responses": strings(("chosen", "rejected")),
    "sampling.train_on": choice(*TRAIN_ON),
    "sampling.pad_over_group": boolean(),
    "sampling.num_candidates": POSITIVE,
    "sampling.num_beams": POSITIVE,
    "sampling.num_beam_groups": POSITIVE,
    "sampling.diversity_penalty": number(0.0),
    "sampling.top_p": PROBABILITY_MASS,
    "sampling.top_k": COUNT,
    "sampling.temperature": number(0.0, low_open=True),
    "sampling.max_new_tokens": POSITIVE,
    "sampling.max_prompt_tokens": POSITIVE,
    "sampling.min_new_tokens": COUNT,
    "sampling.prompt_bos": choice(*PROMPT_BOS),
    "sampling.stop_at_eos": boolean(),
    "sampling.add_pad_token": boolean(),
    "sampling.dtype": DTYPE,
    "sampling.batch_size": POSITIVE,
    "sampling.iterations": POSITIVE,
    "sampling.refresh_steps": integer(1, null="no online refresh"),
    "sampling.kl_coef": number(0.0, null="no KL term"),
    "sampling.table10_setting": text(null=True),
    "method.name": choice(*METHODS),
    "method.n": POSITIVE,
    "method.batch_size": POSITIVE,
    "method.temperature": number(0.0, low_open=True),
    "method.top_p": PROBABILITY_MASS,
    "method.source": text(null=True),
    "method.pairs": choice(*PAIRS),
    "reward.name": choice(*REWARDS),
    "reward.batch_size": POSITIVE,
    "reward.max_length": POSITIVE,
    "reward.dtype": DTYPE,
    "reward.separator": text(empty=True),
    "reward.label": COUNT,
    "reward.output": choice("prob", "logit"),
    "reward.text": choice("response", "prompt+response"),
    "reward.path": text(),
    "reward.tokenizer": text(),
    "reward.backbone": text(),
    "reward.checkpoint_repo": text(),
    "reward.checkpoint_file": text(),
    "reward.truncation_side": choice("left", "right", null=True),
    "reward.base_url": text(null=True),
    "reward.model": text(),
    "reward.api_key_env": text(null=True),
    "reward.temperature": number(0.0),
    "reward.max_tokens": integer(1, null="the template's"),
    "reward.concurrency": POSITIVE,
    "reward.retries": COUNT,
    "reward.reasks": COUNT,
    "reward.weights": aspect_weights(),
    "reward.template": choice("wombat_aspects", "wombat_aspects_shown"),
    "reward.threads": integer(1, null="torch's default"),
    "reward.device": text(),
    "reward.cache": text(null=True),
    "eval.max_new_tokens": POSITIVE,
    "eval.min_new_tokens": COUNT,
    "eval.max_prompt_tokens": POSITIVE,
    "eval.batch_size": POSITIVE,
    "eval.stop_cut": boolean(),
    "eval.judge": text(),
    "eval.ppl_batch_size": POSITIVE,
    "eval.rm_accuracy": boolean(),
    "eval.model_max_length": integer(2),
    "eval.dataset_responses": boolean(),
    "eval.reference_ppl": boolean(),
    "eval.reference_ppl_stride": POSITIVE,
    "eval.pairwise.questions": text(),
    "eval.pairwise.split": text(),
    "eval.pairwise.field": text(),
    "eval.pairwise.prompt_format": choice("auto", "chat_template", "hh", "alpaca"),
    "eval.pairwise.max_new_tokens": POSITIVE,
    "eval.pairwise.both_orders": boolean(),
    "eval.pairwise.judge.base_url": text(null=True),
    "eval.pairwise.judge.model": text(),
    "eval.pairwise.judge.concurrency": POSITIVE,
    "eval.pairwise.judge.template": choice("vicuna_pair_scores", "vicuna_pair_scores_shown"),
    "eval.pairwise.judge.max_tokens": integer(1, null="the endpoint's default"),
    "eval.pairwise.judge.threads": integer(1, null="torch's default"),
    "trainer.name": text(),
    "trainer.peft": choice(*ADAPTER_METHODS),
    "trainer.lora.r": integer(1),
    "trainer.lora.alpha": number(0.0, low_open=True),
    "trainer.lora.dropout": number(0.0, 1.0, high_open=True),
    "trainer.lora.target_modules": Rule(
        f"a non-empty list of module names, or {ALL_LINEAR!r}",
        lambda v: v == ALL_LINEAR or (isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)),
    ),
}
# Keys every run reads (the others belong to some options only).
REQUIRED = (
    "seed",
    "name",
    "paths.artifacts",
    "paths.results",
    "task.source",
    "task.train_size",
    "task.test_size",
    "task.max_new_tokens",
    "model.path",
    "model.trust_remote_code",
    "sampling.name",
    "sampling.generator",
    "method.name",
    "reward.name",
    "eval.max_new_tokens",
    "eval.judge",
    "eval.batch_size",
    "eval.ppl_batch_size",
    "trainer.args",
)

# trainer.args and method.train_args (RRHFArguments, i.e. TrainingArguments + RRHF's options): ranges beyond the
# field's type, which is checked for every field.
TRAINER_RULES: dict[str, Rule] = {
    "learning_rate": number(0.0, low_open=True),
    "num_train_epochs": number(0.0, low_open=True),
    "max_steps": integer(1, also=(-1,)),
    "warmup_steps": number(0.0),
    "weight_decay": number(0.0),
    "max_grad_norm": number(0.0),
    "adam_beta1": BETA,
    "adam_beta2": BETA,
    "adam_epsilon": number(0.0, low_open=True),
    "per_device_train_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "dataloader_num_workers": COUNT,
    "save_total_limit": integer(1, null="keep every checkpoint"),
    "logging_steps": Rule(
        "a number > 0, an integer when above 1 (a fraction of the steps below 1)",
        lambda v: _is_number(v) and v > 0 and (v <= 1 or float(v).is_integer()),
    ),
    "save_steps": Rule(
        "a number > 0, an integer when above 1 (a fraction of the steps below 1)",
        lambda v: _is_number(v) and v > 0 and (v <= 1 or float(v).is_integer()),
    ),
    "model_max_length": integer(2),
    "max_prompt_tokens": POSITIVE,
    "max_response_tokens": POSITIVE,
    "rank_weight": number(0.0),
    "length_penalty": number(),
    "objective": choice("rrhf", "lm"),
    "semantics": choice(*SEMANTICS),
    "layout": choice(*LAYOUTS),
    "beta": number(0.0, low_open=True, null="the method's default"),
    "gamma": number(null="the method's default"),
    "alpha": number(0.0, null="the method's default"),
    "fsdp": Rule("true, false, or a string of FSDP options", lambda v: isinstance(v, (bool, str))),
    "deepspeed": Rule("null, a DeepSpeed JSON file or a mapping", lambda v: v is None or isinstance(v, (str, dict))),
    "report_to": Rule(
        "null, a string or a list of strings",
        lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ),
}

# method.ppo (rrhf.ppo.PPOConfig): ranges beyond the field's type.
PPO_RULES: dict[str, Rule] = {
    "learning_rate": number(0.0, low_open=True),
    "adam_beta1": BETA,
    "adam_beta2": BETA,
    "adam_eps": number(0.0, low_open=True),
    "weight_decay": number(0.0),
    "iterations": POSITIVE,
    "num_rollouts": POSITIVE,
    "chunk_size": POSITIVE,
    "ppo_epochs": POSITIVE,
    "batch_size": POSITIVE,
    "init_kl_coef": number(0.0),
    "target": number(0.0, low_open=True, null="a fixed KL coefficient"),
    "horizon": POSITIVE,
    "gamma": number(0.0, 1.0),
    "lam": number(0.0, 1.0),
    "cliprange": number(0.0, low_open=True),
    "cliprange_value": number(0.0, low_open=True),
    "vf_coef": number(0.0),
    "cliprange_reward": number(0.0, low_open=True),
    "scale_reward": choice("running", null=True),
    "num_layers_unfrozen": integer(-1),
    "top_k": COUNT,
    "top_p": PROBABILITY_MASS,
    "temperature": number(0.0, low_open=True),
    "max_new_tokens": POSITIVE,
    "max_prompt_tokens": POSITIVE,
    "prompt_bos": choice(*PROMPT_BOS),
    "reward_separator": text(empty=True),
    "save_every": POSITIVE,
}


def check_config(
    cfg: DictConfig | Mapping[str, Any], *, ppo: type | None = None, launch: bool = True
) -> dict[str, Any]:
    """Refuse, with one `ConfigError`, a config that cannot run here; called before any model is loaded.

    `ppo` is the dataclass `method.ppo` becomes (rrhf.ppo.PPOConfig): its fields are that section's schema.
    `launch=False` leaves out `check_launch`, for a caller that runs it later. Returns the resolved config as
    plain containers (what `check_launch` takes without resolving it again).
    """
    plain = _plain(cfg)
    for key in REQUIRED:
        if _get(plain, key) is ABSENT:
            raise ConfigError(f"{key}: missing; every run needs it")
    for key, rule in RULES.items():
        _check(key, _get(plain, key), rule)
    _check_device(plain)
    check_output_paths(plain)
    _check_sampling(plain)
    _check_eval(plain)
    _check_reward(plain)
    method = plain["method"]["name"]
    if method in TRAINED_BY_THE_TRAINER:
        _check_trainer(plain)
    if method in (*TRAINED_BY_THE_TRAINER, "ppo"):
        _check_adapters(plain)
    if method == "rrhf":
        _check_ranking(plain)
    if method == "ppo" and ppo is not None:
        settings = plain["method"].get("ppo") or {}
        if "seed" in settings:
            raise ConfigError(f"method.ppo.seed: set by the pipeline ({SET_BY_THE_PIPELINE['seed']}); remove it")
        _check_fields("method.ppo", settings, ppo, PPO_RULES)
    _check_paths(plain)
    if launch:
        check_launch(plain)
    return plain


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        keys = [k for k in cfg if k != "hydra"]
        try:
            return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
        except Exception as error:  # an interpolation that does not resolve names its key
            raise ConfigError(f"the config does not resolve: {error}") from error
    return dict(cfg)


def _get(plain: dict[str, Any], key: str) -> Any:
    node: Any = plain
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def _check(key: str, value: Any, rule: Rule) -> None:
    if value is ABSENT:
        return
    if value == "???":
        raise ConfigError(f"{key}: missing value (???); expected {rule.allowed}")
    if not rule.ok(value):
        raise ConfigError(f"{key}={value!r}: expected {rule.allowed}")


def _check_device(plain: dict[str, Any]) -> None:
    import torch

    device = plain.get("device", "auto")
    if device == "auto":
        return
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N") from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={device!r}: this machine has no CUDA device; use device=auto or device=cpu")
        if where.index is not None and where.index >= count:
            raise ConfigError(f"device={device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif where.type != "cpu":
        raise ConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")


def _check_sampling(plain: dict[str, Any]) -> None:
    s = plain["sampling"]
    generator = s["generator"]
    if generator == "file":
        if s.get("train_file") in (None, "???") or not isinstance(s.get("train_file"), str):
            raise ConfigError(
                f"sampling.train_file={s.get('train_file')!r}: sampling=file needs the path of a "
                "training file in the authors' format"
            )
        return
    if generator == "sources":  # each policy source is checked as a sampling setting of its own
        from rrhf.sources import check_sources

        try:
            check_sources(s.get("sources"))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if s.get("refresh_steps"):
            raise ConfigError(
                f"sampling.refresh_steps={s['refresh_steps']}: online refreshes re-sample one policy; "
                "sampling=sources draws from several, once"
            )
        for spec in s["sources"].values():
            if spec is not None and spec["kind"] == "policy":
                own = {k: v for k, v in spec.items() if k not in ("kind", "model")}
                _check_sampling({"sampling": {k: v for k, v in s.items() if k != "sources"} | own})
        return
    beams, groups, n = s.get("num_beams"), s.get("num_beam_groups"), s.get("num_candidates")
    if generator == "diverse_beam":
        if beams < 2 or beams % groups:
            raise ConfigError(
                f"sampling.num_beams={beams}, sampling.num_beam_groups={groups}: diverse beam search "
                "needs at least 2 beams, a multiple of the groups"
            )
        if groups > 1 and not s.get("diversity_penalty", 0) > 0:
            raise ConfigError(
                f"sampling.diversity_penalty={s.get('diversity_penalty')!r}: expected > 0 with "
                f"{groups} beam groups (the groups are otherwise identical)"
            )
        if s.get("min_new_tokens"):
            raise ConfigError(
                f"sampling.min_new_tokens={s['min_new_tokens']}: not supported with generator=diverse_beam; expected 0"
            )
    if generator in ("diverse_beam", "beam") and n is not None and beams is not None and n > beams:
        raise ConfigError(f"sampling.num_candidates={n}: beam search returns at most sampling.num_beams={beams}")
    if s.get("refresh_steps") and generator == "none":
        raise ConfigError(
            f"sampling.refresh_steps={s['refresh_steps']}: online refreshes need a generator, "
            "got sampling.generator=none"
        )


def candidate_counts(sampling: dict[str, Any]) -> tuple[int, int] | None:
    """The candidates each training query has under a sampling setting, as (generated, the data set's): none
    generated by generator=none or kept by train_on=provided, none of the data set's kept by train_on=sampled.
    None for sampling=file, whose groups are in the file."""
    generator, train_on = sampling["generator"], sampling.get("train_on", "all")
    if generator == "file":
        return None
    if generator == "sources":  # a file source's groups are in its file
        sources = [spec for spec in (sampling.get("sources") or {}).values() if spec is not None]
        if any(spec.get("kind") == "file" for spec in sources):
            return None
        sizes = {"policy": lambda spec: int(spec.get("num_candidates") or sampling.get("num_candidates") or 0)}
        sizes |= {"endpoint": lambda spec: int(spec.get("n", 1)), "dataset": lambda spec: 0}
        generated = sum(sizes[spec["kind"]](spec) for spec in sources if spec.get("kind") in sizes)
        return generated, sum(spec.get("kind") == "dataset" for spec in sources)
    generated = 0 if generator == "none" or train_on == "provided" else int(sampling.get("num_candidates") or 0)
    provided = 0 if train_on == "sampled" else len(sampling.get("dataset_responses") or [])
    return generated, provided


def _check_ranking(plain: dict[str, Any]) -> None:
    """RRHF's ranking term compares the candidates of a query: with fewer than two it is empty, and the run
    would be SFT on one response filed as RRHF. A run that asks for no ranking term (rank_weight 0, Table 7's
    ablation, or objective lm) is not refused."""
    args = (plain["trainer"].get("args") or {}) | (plain["method"].get("train_args") or {})
    if args.get("rank_weight", 1.0) == 0 or args.get("objective", "rrhf") == "lm":
        return
    s = plain["sampling"]
    counts = candidate_counts(s)
    if counts is not None and sum(counts) < 2:
        generated, provided = counts
        raise ConfigError(
            f"sampling={s.get('name')}: {sum(counts)} candidate(s) per query ({generated} generated, from "
            f"sampling.num_candidates={s.get('num_candidates')} and generator={s['generator']}; {provided} of the "
            f"data set, from sampling.dataset_responses={s.get('dataset_responses')}; sampling.train_on="
            f"{s.get('train_on', 'all')}). method=rrhf ranks the candidates of each query, at least 2, or its "
            "ranking term is empty: raise sampling.num_candidates or add dataset responses, or set "
            "method.train_args.rank_weight=0 for the SFT term alone"
        )


def _check_reward(plain: dict[str, Any]) -> None:
    """The LLM judge can fail on a response (no answer it could read: NaN, not a score). The score stage leaves
    such a candidate out of its prompt's ranking; PPO's rollouts, best-of-n's pick and OP's refreshes use every
    score they get, so they would train on or pick by a NaN."""
    if plain["reward"].get("name") != "llm_judge":
        return
    method, refresh = plain["method"]["name"], plain["sampling"].get("refresh_steps")
    if method in ("ppo", "best_of_n") or refresh:
        what = f"method={method}" if method in ("ppo", "best_of_n") else f"sampling.refresh_steps={refresh}"
        raise ConfigError(
            f"reward=llm_judge with {what}: not supported; a failed judgement has no score, and only the score "
            "stage's ranking leaves it out (offline sampling with method=rrhf, dpo, simpo, cpo)"
        )
    if plain["method"].get("pairs") == "dataset":
        raise ConfigError(
            "reward=llm_judge with method.pairs=dataset: not supported; the data set's pair is found by its place at "
            "the end of a group, which a candidate left out for a failed judgement would shift (method.pairs="
            "best_worst or all)"
        )


def _check_eval(plain: dict[str, Any]) -> None:
    e = plain["eval"]
    if e.get("min_new_tokens", 0) > e["max_new_tokens"]:
        raise ConfigError(
            f"eval.min_new_tokens={e['min_new_tokens']}: expected at most eval.max_new_tokens={e['max_new_tokens']}"
        )


def _check_trainer(plain: dict[str, Any]) -> None:
    from rrhf.trainer import PairwiseArguments, RRHFArguments

    arguments = PairwiseArguments if plain["method"]["name"] in PAIRWISE else RRHFArguments
    args = plain["trainer"].get("args") or {}
    method_args = plain["method"].get("train_args") or {}
    for section, values in (("trainer.args", args), ("method.train_args", method_args)):
        if not isinstance(values, dict):
            raise ConfigError(f"{section}={values!r}: expected a mapping of trainer arguments")
        for key in SET_BY_THE_PIPELINE:
            if key in values:
                raise ConfigError(f"{section}.{key}: set by the pipeline ({SET_BY_THE_PIPELINE[key]}); remove it")
        _check_fields(section, values, arguments, TRAINER_RULES)
    merged = args | method_args  # a method's own settings win over the profile's
    if merged.get("bf16") and merged.get("fp16"):
        raise ConfigError("trainer.args.bf16=true and trainer.args.fp16=true: at most one mixed precision")


def _check_adapters(plain: dict[str, Any]) -> None:
    """trainer.lora holds LoRA's settings only; QLoRA needs bitsandbytes, and one process per device with the
    whole 4-bit model on it (FSDP and DeepSpeed shard or re-cast the weights that bitsandbytes packs)."""
    trainer = plain["trainer"]
    lora = trainer.get("lora")
    if lora is not None and not isinstance(lora, dict):
        raise ConfigError(f"trainer.lora={lora!r}: expected a mapping of LoRA settings")
    try:
        AdapterSettings.from_config({"peft": "lora", "lora": lora})  # unknown keys, whatever the method
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if trainer.get("peft") != "qlora":
        return
    merged = (trainer.get("args") or {}) | (plain["method"].get("train_args") or {})
    for key in ("fsdp", "deepspeed"):
        if merged.get(key) and plain["method"]["name"] != "ppo":
            raise ConfigError(
                f"trainer.peft=qlora with trainer.args.{key}={merged[key]!r} (trainer={trainer.get('name')}): not "
                "supported; QLoRA trains with the whole 4-bit model on each device: trainer=cpu or trainer=ddp"
            )
    missing = bitsandbytes_missing()
    if missing:
        raise ConfigError(missing)


def check_launch(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Refuse a trainer profile this launch cannot run: FSDP or DeepSpeed in a plain process, DeepSpeed without
    its package. Part of `check_config`; the pipeline runs it after `rrhf.hub.require`, so that a job missing
    its Hub files says so first (fetching them is the first step on a cluster, the launcher the second)."""
    plain = _plain(cfg)
    if plain["method"]["name"] not in TRAINED_BY_THE_TRAINER:
        return
    merged = (plain["trainer"].get("args") or {}) | (plain["method"].get("train_args") or {})
    deepspeed, fsdp = merged.get("deepspeed"), merged.get("fsdp")
    if (deepspeed or fsdp) and not all(k in os.environ for k in LAUNCH_VARIABLES):
        profile = plain["trainer"].get("name")
        what = "DeepSpeed" if deepspeed else "FSDP"
        raise ConfigError(
            f"trainer={profile} (trainer.args.{'deepspeed' if deepspeed else 'fsdp'}): {what} "
            "training needs a distributed launch, one process per device, and this is a plain "
            "process. Launch with `torchrun --nproc-per-node=N run.py ...` (N=1 works, also on a "
            "CPU), or a SLURM job with one task per GPU (hydra/launcher=slurm_gpu); or choose "
            "trainer=cpu or trainer=ddp for one process"
        )
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"trainer.args.deepspeed={deepspeed!r}: the deepspeed package is not installed "
            "(pip install -e '.[deepspeed]')"
        )


def _check_fields(section: str, values: dict[str, Any], cls: type, rules: dict[str, Rule]) -> None:
    """Every key of `values` a field of `cls`, of the field's type, and within `rules` where it has one."""
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{section}.{key}: not a setting of {cls.__module__}.{cls.__name__}{hint}")
        rule = rules.get(key) or _type_rule(hints.get(key))
        if rule is not None:
            _check(f"{section}.{key}", value, rule)


def _type_rule(hint: Any) -> Rule | None:
    """A rule from a field's annotation where it is simple (bool, int, float, str, an enum of names, or one of
    these or None); None where the annotation admits more than this checks."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    null = type(None) in members
    members = tuple(m for m in members if m is not type(None))
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums and set(members) <= {*enums, str}:
        return choice(*(e.value for e in enums[0]), null=null)
    if len(members) != 1:
        return None
    simple = {bool: boolean(), int: integer(), float: number(), str: text(empty=True)}.get(members[0])
    if simple is None:
        return None
    return simple if not null else Rule(simple.allowed + ", or null", lambda v: v is None or simple.ok(v))


OUTPUT_PATHS = ("paths.results", "paths.artifacts", "paths.tables")


def check_output_paths(plain: dict[str, Any]) -> None:
    """`paths.results`, `paths.artifacts` and `paths.tables` are folders, or can be made: none names a file or
    lies under one. Part of `check_config`; also run before Hydra makes the run folder (`OutputPathsCheck`)."""
    for key in OUTPUT_PATHS:
        value = _get(plain, key)
        if not isinstance(value, str) or not value.strip():
            continue  # missing or of the wrong type: the key rules say so
        path = Path(value).expanduser()
        for place in (path, *path.parents):
            if place.exists() or place.is_symlink():
                if not place.is_dir():
                    where = "is a file" if place == path else f"lies under {place}, a file"
                    raise ConfigError(
                        f"{key}={value!r}: {where}, not a folder; name a folder (it is made when missing)"
                    )
                break


class OutputPathsCheck(Callback):
    """`check_output_paths` before Hydra makes the run or sweep folder under `paths.results` (which it does
    before a job starts: a file there would otherwise end in a raw NotADirectoryError or FileExistsError)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        paths: dict[str, Any] = {}
        for key in OUTPUT_PATHS:
            try:
                paths[key.split(".")[1]] = OmegaConf.select(config, key)
            except Exception:  # not resolvable yet (${hydra:...} before the job): check_config checks it
                continue
        try:
            check_output_paths({"paths": paths})
        except ConfigError as error:
            # Hydra turns a callback's exception into a warning and goes on; SystemExit stops the command.
            raise SystemExit(f"rrhf: {error}") from None


def _check_paths(plain: dict[str, Any]) -> None:
    """The files and folders a config names exist, before a stage needs them."""
    for key in ("model.path", "eval.judge", "task.source"):
        value = _get(plain, key)
        if isinstance(value, str) and value.startswith(("/", ".", "~")) and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key}={value!r}: no such folder")
    s = plain["sampling"]
    if s["generator"] == "file" and not Path(s["train_file"]).expanduser().is_file():
        raise ConfigError(f"sampling.train_file={s['train_file']!r}: no such file")
    deepspeed = (plain["trainer"].get("args") or {}).get("deepspeed")
    if plain["method"]["name"] in TRAINED_BY_THE_TRAINER and isinstance(deepspeed, str):
        if not (Path(deepspeed).is_file() or (PROJECT_ROOT / deepspeed).is_file()):
            raise ConfigError(
                f"trainer.args.deepspeed={deepspeed!r}: no such file (relative paths are taken "
                "from the working folder or the project root)"
            )
