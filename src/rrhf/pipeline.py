"""The RRHF pipeline: sample -> score -> train -> evaluate, each stage a cached artifact.

Each stage reads only its config and the artifacts before it, and its artifact folder is keyed by a
hash of exactly those inputs (see `rrhf.artifacts`), so runs of a sweep share work and a rerun of a
finished run does no stage work. The run folder (Hydra's output folder) receives `metrics.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rrhf.artifacts import crash_point, rank, run_stage, write_json_atomic
from rrhf.data import read_jsonl
from rrhf.pairwise import LOSSES as PAIRWISE

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _task_key(cfg: DictConfig, split: str) -> dict:
    task = {k: v for k, v in _plain(cfg.task).items() if k not in ("max_new_tokens", "train_size", "test_size")}
    key = {**task, "split": split, "limit": cfg.task.train_size if split == "train" else cfg.task.test_size}
    local = Path(str(cfg.task.source)) / f"{split}.jsonl"
    if local.is_file():  # a local data file is keyed by its content, so an edit invalidates the cache
        key["sha256"] = hashlib.sha256(local.read_bytes()).hexdigest()
    return key


def _prompts(cfg: DictConfig, split: str) -> list[dict]:
    from rrhf.data import imdb_prefix_rows, load_split

    key = _task_key(cfg, split)
    if key.get("format") == "imdb_prefix":
        return imdb_prefix_rows(key["source"], split, tokenizer_name=key["prefix_tokenizer"],
                                prefix_tokens=key["prefix_tokens"], limit=key["limit"])
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
    # The process may hold memory from earlier runs of a sweep: rss_at_start_mib tells how much.
    cost = {"seconds": round(time.time() - started, 2), "peak_rss_mib": round(peak[0] / 2**20, 1),
            "rss_at_start_mib": round(start_rss / 2**20, 1)}
    if cuda:
        cost["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_json_atomic(work / "cost.json", cost)


def stage_cost(folder: Path) -> dict | None:
    """A stage artifact's cost.json (None for stages built before costs were recorded)."""
    path = Path(folder) / "cost.json"
    return json.loads(path.read_text()) if path.exists() else None


def _set_threads(cfg: DictConfig) -> None:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))


def sample_stage(cfg: DictConfig, model_path: str) -> Path | None:
    """Generate the sampled candidates of the training prompts (None for settings that sample nothing)."""
    s = cfg.sampling
    if s.generator in ("none", "file"):
        return None
    from rrhf.sampling import generation_settings

    inputs = {"stage": "sample", "task": _task_key(cfg, "train"), "model": model_path,
              "sampling": generation_settings(_plain(s)),
              "seed": cfg.seed if s.generator in ("top_p", "top_k") else None}

    def build(work: Path) -> None:
        from rrhf.assets import load_causal_lm
        from rrhf.sampling import generate_candidates

        rows = _prompts(cfg, "train")
        with measured(work):
            model, tokenizer = load_causal_lm(model_path, trust_remote_code=cfg.model.trust_remote_code)
            generate_candidates(model, tokenizer, [r["prompt"] for r in rows], s, work / "candidates.jsonl",
                                seed=cfg.seed)

    folder, _ = run_stage(Path(cfg.paths.artifacts), "sample", inputs, build)
    return folder


def score_stage(cfg: DictConfig, model_path: str, sampled: Path | None) -> Path:
    """The training file in the authors' format ({query, responses, scores} a line) and its statistics."""
    s = cfg.sampling
    if s.generator == "file":
        return _file_stage(cfg)
    inputs = {"stage": "score", "task": _task_key(cfg, "train"), "sampled": sampled.name if sampled else None,
              "dataset_responses": list(s.dataset_responses), "reward": _plain(cfg.reward)}

    def build(work: Path) -> None:
        from rrhf.data import with_dataset_responses
        from rrhf.reward import build_scorer, score_groups
        from rrhf.sampling import read_candidates
        from rrhf.stats import sample_statistics

        rows = _prompts(cfg, "train")
        generated = read_candidates(sampled / "candidates.jsonl") if sampled else {}
        groups = [with_dataset_responses(generated.get(i, []), row, s.dataset_responses) for i, row in enumerate(rows)]
        with measured(work):
            all_scores = score_groups(build_scorer(cfg.reward), [r["prompt"] for r in rows], groups)
        with open(work / "train.jsonl", "w") as handle:
            scored = []
            for i, (row, responses, scores) in enumerate(zip(rows, groups, all_scores)):
                scored.append((scores, len(generated.get(i, []))))
                handle.write(json.dumps({"query": row["prompt"], "responses": responses, "scores": scores}) + "\n")
            handle.flush()
            crash_point("score")
        stats = {"all": sample_statistics([sc for sc, _ in scored])}
        if any(n for _, n in scored):
            stats["sampled"] = sample_statistics([sc[:n] for sc, n in scored if n])
        write_json_atomic(work / "stats.json", stats)

    folder, _ = run_stage(Path(cfg.paths.artifacts), "score", inputs, build)
    return folder


def _file_stage(cfg: DictConfig) -> Path:
    """A user's training file in the authors' format, checked line by line, in place of sample + score."""
    from rrhf.data import read_training_file, write_training_file
    from rrhf.stats import sample_statistics

    source = Path(cfg.sampling.train_file).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"sampling.train_file={str(source)!r}: no such file")
    inputs = {"stage": "score", "file": str(source), "size": source.stat().st_size,
              "mtime_ns": source.stat().st_mtime_ns}

    def build(work: Path) -> None:
        rows = read_training_file(source, allow_empty_responses=False)  # names the file and line of a bad one
        write_training_file(work / "train.jsonl", rows)
        write_json_atomic(work / "stats.json", {"all": sample_statistics([r["scores"] for r in rows])})

    folder, _ = run_stage(Path(cfg.paths.artifacts), "score", inputs, build)
    return folder


def sft_data_stage(cfg: DictConfig) -> Path:
    """The data set's chosen responses as a training file of one candidate each: with rank_weight 0 the
    RRHF objective is then plain supervised fine-tuning (the Alpaca-sft initial model of Table 2)."""
    inputs = {"stage": "score", "task": _task_key(cfg, "train"), "sft_on": "chosen"}

    def build(work: Path) -> None:
        from rrhf.data import write_training_file

        rows = _prompts(cfg, "train")
        write_training_file(work / "train.jsonl",
                            ({"query": r["prompt"], "responses": [r["chosen"]], "scores": [1.0]} for r in rows))

    folder, _ = run_stage(Path(cfg.paths.artifacts), "score", inputs, build)
    return folder


def train_stage(cfg: DictConfig, model_path: str, scored: Path, *, online: bool = False) -> Path:
    """Fine-tune the policy with the RRHF loss on the scored candidates (OP-k: re-sampled as it trains)."""
    trainer_args = _plain(cfg.trainer.args)
    method_args = _plain(cfg.method.train_args)
    if cfg.method.name in PAIRWISE:  # DPO, SimPO, CPO: the loss, and which pairs the groups give
        method_args |= {"loss": cfg.method.name, "pairs": cfg.method.pairs,
                        "dataset_responses": list(cfg.sampling.get("dataset_responses") or [])}
    inputs = {"stage": "train", "model": model_path, "scored": scored.name, "trainer": trainer_args,
              "method": method_args, "seed": cfg.seed}
    if online:
        inputs["online"] = {"task": _task_key(cfg, "train"), "sampling": _plain(cfg.sampling),
                            "reward": _plain(cfg.reward)}

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
        args = arguments(output_dir=str(work / "checkpoints"), seed=cfg.seed, **(trainer_args | method_args))
        settings = None
        if online:
            from rrhf.online import OnlineSettings
            from rrhf.reward import build_scorer

            settings = OnlineSettings(rows=_prompts(cfg, "train"), sampling=cfg.sampling,
                                      scorer=build_scorer(cfg.reward), refresh_steps=int(cfg.sampling.refresh_steps),
                                      kl_coef=float(cfg.sampling.get("kl_coef") or 0.0), seed=cfg.seed)
        with measured(work):
            train(resolve_model(model_path), scored / "train.jsonl", work, args=args, callbacks=[CrashAfterSave()],
                  online=settings)

    folder, _ = run_stage(Path(cfg.paths.artifacts), "train", inputs, build, all_ranks=True)
    return folder / "model"


def ppo_stage(cfg: DictConfig, model_path: str) -> Path:
    """Fine-tune the policy with PPO (the trlX ppo_hh settings by default) on the training prompts."""
    settings = _plain(cfg.method.ppo)
    inputs = {"stage": "ppo", "model": model_path, "task": _task_key(cfg, "train"), "ppo": settings,
              "reward": _plain(cfg.reward), "seed": cfg.seed}

    def build(work: Path) -> None:
        from rrhf.ppo import PPOConfig, train_ppo
        from rrhf.reward import build_scorer

        rows = _prompts(cfg, "train")
        # Delta reward against the data set's chosen response (trlX ppo_hh), where the task has one.
        references = [r.get("chosen") or "" for r in rows] if all(r.get("chosen") for r in rows) else None
        with measured(work):
            train_ppo(model_path, [r["prompt"] for r in rows], references, build_scorer(cfg.reward), work,
                      PPOConfig(**settings, seed=cfg.seed))

    folder, _ = run_stage(Path(cfg.paths.artifacts), "ppo", inputs, build)
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
    inputs = {"stage": "evaluate", "policy": target.key, "task": _task_key(cfg, "test"), "eval": _plain(e),
              "reward": _plain(cfg.reward)}

    def build(work: Path) -> None:
        from rrhf.assets import load_causal_lm
        from rrhf.evaluation import best_of_n_responses, greedy_responses, perplexities, policy_scores
        from rrhf.generation import stop_cut
        from rrhf.reward import build_scorer
        from rrhf.stats import preference_accuracy

        rows = _prompts(cfg, "test")
        prompts = [r["prompt"] for r in rows]
        metrics: dict[str, Any] = {"num_prompts": len(prompts)}
        scorer = build_scorer(cfg.reward)
        if target.kind == "dataset":
            responses = [stop_cut(r[target.source] or "") for r in rows]
        elif target.kind == "best_of_n":
            m = cfg.method
            model, tokenizer = load_causal_lm(target.source, trust_remote_code=cfg.model.trust_remote_code)
            responses = best_of_n_responses(model, tokenizer, prompts, scorer, n=m.n, max_new_tokens=e.max_new_tokens,
                                            temperature=m.temperature, top_p=m.top_p, batch_size=m.batch_size,
                                            max_prompt_tokens=e.max_prompt_tokens, seed=cfg.seed)
            del model
        elif target.kind == "policy":
            model, tokenizer = load_causal_lm(target.source, trust_remote_code=cfg.model.trust_remote_code)
            raw = greedy_responses(model, tokenizer, prompts, max_new_tokens=e.max_new_tokens,
                                   batch_size=e.batch_size, max_prompt_tokens=e.max_prompt_tokens)
            responses = [stop_cut(r) for r in raw]
            crash_point("evaluate")
            pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows if r.get("rejected") is not None]
            if e.rm_accuracy and pairs:
                length_penalty = float(cfg.method.train_args.get("length_penalty", 1.0))
                scores = policy_scores(model, tokenizer, pairs, model_max_length=e.model_max_length,
                                       length_penalty=length_penalty)
                for semantics, (chosen, rejected) in scores.items():
                    metrics[f"rm_accuracy_{semantics}"] = preference_accuracy(chosen, rejected)
            del model
        else:
            raise ValueError(f"unknown evaluation target {target}")
        rewards = scorer.score(prompts, responses)
        judge, judge_tokenizer = load_causal_lm(e.judge)
        ppl = {mode: perplexities(responses, judge, judge_tokenizer, mode=mode, batch_size=e.ppl_batch_size)
               for mode in ("paper", "exact")}
        with open(work / "responses.jsonl", "w") as handle:
            for i, prompt in enumerate(prompts):
                handle.write(json.dumps({"prompt": prompt, "response": responses[i], "reward": rewards[i],
                                         "ppl_paper": ppl["paper"][i], "ppl_exact": ppl["exact"][i]}) + "\n")
        metrics |= {"reward": sum(rewards) / len(rewards),
                    "ppl_paper": sum(ppl["paper"]) / len(responses),
                    "ppl_exact": sum(ppl["exact"]) / len(responses)}
        write_json_atomic(work / "metrics.json", metrics)

    folder, _ = run_stage(Path(cfg.paths.artifacts), "evaluate", inputs, build)
    return {**json.loads((folder / "metrics.json").read_text()), "artifact": str(folder)}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run every stage the config asks for and write `metrics.json` into the run folder."""
    _set_threads(cfg)
    started = time.time()
    model_path = cfg.model.path
    metrics: dict[str, Any] = {"initial": evaluate_stage(cfg, Evaluated.policy(model_path, f"model:{model_path}"))}
    if cfg.eval.dataset_responses:
        fields = ("chosen",) if cfg.task.get("format") == "imdb_prefix" else ("chosen", "rejected")
        metrics["dataset"] = {field: evaluate_stage(cfg, Evaluated.dataset(field)) for field in fields}
        if len(fields) == 2:  # the reward model's own accuracy on the test pairs (Table 5's first row)
            chosen, rejected = (read_jsonl(Path(metrics["dataset"][f]["artifact"]) / "responses.jsonl")
                                for f in fields)
            metrics["reward_model_accuracy"] = sum(c["reward"] > r["reward"] for c, r in zip(chosen, rejected)) / len(
                chosen)
    costs: dict[str, Any] = {}  # the cost of producing the final policy, stage by stage
    if cfg.method.name in ("rrhf", *PAIRWISE):  # DPO, SimPO and CPO train on the candidates RRHF trains on
        online = bool(cfg.sampling.get("refresh_steps"))
        if online and cfg.method.name != "rrhf":
            raise ValueError(f"method={cfg.method.name} trains on fixed candidates; sampling={cfg.sampling.name} "
                             "re-samples while training, which only method=rrhf does")
        # IP-n: iteration k samples with, and trains from, the model of iteration k-1 (one pass otherwise).
        policy, metrics["iterations"] = model_path, []
        for i in range(int(cfg.sampling.get("iterations", 1))):
            sampled = sample_stage(cfg, policy)
            scored = score_stage(cfg, policy, sampled)
            trained = train_stage(cfg, policy, scored, online=online)
            policy = str(trained)
            costs |= {f"{name}_{i + 1}": stage_cost(folder)
                      for name, folder in (("sample", sampled), ("score", scored), ("train", trained.parent)) if folder}
            iteration = {
                "samples": json.loads((scored / "stats.json").read_text()),
                "candidates": str(scored / "train.jsonl"),
                "trained": evaluate_stage(cfg, Evaluated.policy(policy, f"train:{trained.parent.name}")),
                "train_log": str(trained.parent / "log_history.json")}
            if online:
                from rrhf.online import refresh_statistics

                iteration["refreshes"] = refresh_statistics(trained.parent / "online")
            metrics["iterations"].append(iteration)
        metrics |= {k: metrics["iterations"][-1][k] for k in ("samples", "candidates", "trained", "train_log")}
        metrics["final"] = metrics["trained"]
    elif cfg.method.name in ("sft", "ppo"):
        trained = train_stage(cfg, model_path, sft_data_stage(cfg)) if cfg.method.name == "sft" else ppo_stage(
            cfg, model_path)
        costs["train_1"] = stage_cost(trained.parent)
        metrics["trained"] = evaluate_stage(cfg, Evaluated.policy(str(trained),
                                                                  f"{trained.parent.parent.name}:{trained.parent.name}"))
        metrics["train_log"] = str(trained.parent / "log_history.json")
        metrics["final"] = metrics["trained"]
    elif cfg.method.name == "best_of_n":
        key = f"best_of_n:{model_path}:{_plain(cfg.method)}:seed={cfg.seed}"
        metrics["final"] = evaluate_stage(cfg, Evaluated.best_of_n(model_path, key))
    elif cfg.method.name == "none":
        metrics["final"] = metrics["initial"]
    else:
        raise ValueError(f"method.name={cfg.method.name!r}: expected rrhf, dpo, simpo, cpo, sft, ppo, best_of_n, none")
    if rank() != 0:  # under torchrun every rank runs the pipeline; one writes the results
        return metrics
    write_json_atomic(run_dir / "metrics.json", metrics)
    # Kept apart from metrics.json, which is a pure function of the config and seed.
    write_json_atomic(run_dir / "timing.json", {"wall_seconds": round(time.time() - started, 2), "stages": costs})
    log.info("metrics: reward %.4f -> %.4f, ppl(paper) %.2f -> %.2f", metrics["initial"]["reward"],
             metrics["final"]["reward"], metrics["initial"]["ppl_paper"], metrics["final"]["ppl_paper"])
    return metrics
