"""The Vicuna-style pairwise evaluation (`eval=pairwise_judge`): the slides' Wombat rows.

The trained policy answers a question set (Vicuna's 80 at paper scale, by Hub id; `data/offline_questions`
offline), each other system named in `eval.pairwise.versus` answers the same questions, and an LLM judge scores
each pair of answers side by side (`rrhf.judging.scores`: two scores from 1 to 10). Reported as the slides report
it: each system's summed score, and the trained policy's wins, ties and losses. Two cached stages:

- `answers`: one system's answers to the questions: a local policy's greedy answers (the initial policy, or any
  model path), an OpenAI-compatible endpoint's (a hosted model), or a file of answers the user made.
- `judged`: the judge's scores of one (evaluated, versus) pair of answer sets; the judge's answers also go
  through the judge cache, so a rerun with another key asks nothing it asked before.

`versus` entries: `initial` (the run's initial policy), `policy:<model path>`, `file:<answers.jsonl>` (one JSON
object a line with `question_id` and `answer`), or a mapping {name, base_url, model, api_key_env} for an endpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rrhf import placement
from rrhf.artifacts import run_stage, write_json_atomic
from rrhf.data import ALPACA_PROMPT, read_jsonl, write_jsonl

PROMPT_FORMATS = ("auto", "chat_template", "hh", "alpaca")
HH_PROMPT = "\n\nHuman: {question}\n\nAssistant:"  # Anthropic HH's raw turns, as the HH policies were trained


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def load_questions(source: str, *, field: str = "question", split: str = "test") -> list[dict[str, Any]]:
    """The question set: a local .jsonl file, or a folder / Hub data set read by `rrhf.data.hub_rows`-style split
    loading. Each row needs `field`; `question_id` defaults to the row's position (from 1)."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        rows, where = read_jsonl(path), str(path)
    elif path.is_dir():
        rows, where = read_jsonl(path / f"{split}.jsonl"), str(path / f"{split}.jsonl")
    else:
        from rrhf.data import hub_rows

        rows, where = hub_rows(str(source), split), f"{source}[{split}]"
    if not rows:
        raise ValueError(f"{where}: no questions")
    questions = []
    for i, row in enumerate(rows):
        text = row.get(field) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: row {i + 1} has no text in field {field!r} (eval.pairwise.field)")
        questions.append({"question_id": row.get("question_id", i + 1), "question": text})
    ids = [q["question_id"] for q in questions]
    if len(set(map(str, ids))) != len(ids):
        raise ValueError(f"{where}: question_id repeats; every question needs its own")
    return questions


def question_prompt(tokenizer, question: str, prompt_format: str) -> str:
    """The text a local policy continues: its chat template (`auto` where the tokenizer has one), HH's raw turns
    (`auto` otherwise), or Alpaca's instruction prompt."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"eval.pairwise.prompt_format={prompt_format!r}: expected one of {PROMPT_FORMATS}")
    if prompt_format == "chat_template" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None)):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt_format == "alpaca":
        return ALPACA_PROMPT.format(instruction=question)
    return HH_PROMPT.format(question=question)


def _questions_key(p: DictConfig) -> dict[str, Any]:
    source = str(p.questions)
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        content = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        return {"file_sha256": content, "field": p.field, "split": p.split}
    from rrhf import hub

    return {"hub": hub.identity(source, "dataset"), "field": p.field, "split": p.split}


def answers_stage(cfg: DictConfig, system: Any, policies: dict[str, tuple[str, str]]) -> tuple[str, Path]:
    """One system's answers to the question set: (its name, the artifact folder holding answers.jsonl). `policies`
    maps the run's own policies ("initial", "trained") to their model path and stage key."""
    p = cfg.eval.pairwise
    spec = _plain(system)
    inputs: dict[str, Any] = {"stage": "answers", "questions": _questions_key(p)}
    if isinstance(spec, dict):
        name = str(spec.get("name") or spec["model"])
        inputs |= {"endpoint": {"base_url": spec["base_url"], "model": spec["model"]}, "max_tokens": p.max_new_tokens}
    elif spec in policies or str(spec).startswith("policy:"):
        from rrhf.assets import model_identity

        if spec in policies:
            name, (path, key) = spec, policies[spec]
        else:
            name = path = str(spec).removeprefix("policy:")
            key = f"model:{model_identity(path)}"
        where = placement.from_config(cfg)
        inputs |= {
            "policy": key,
            "prompt_format": p.prompt_format,
            "max_new_tokens": p.max_new_tokens,
            "placement": where.key(),
        }
    elif str(spec).startswith("file:"):
        path = Path(str(spec).removeprefix("file:")).expanduser()
        if not path.is_file():
            raise ValueError(f"eval.pairwise.versus: {spec!r}: no such file")
        name = path.stem
        inputs |= {"file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        raise ValueError(
            f"eval.pairwise.versus: {spec!r}: expected initial, policy:<model path>, file:<answers.jsonl> or a "
            "mapping {name, base_url, model, api_key_env}"
        )

    def build(work: Path) -> None:
        questions = load_questions(str(p.questions), field=p.field, split=p.split)
        if isinstance(spec, dict):
            answers = _endpoint_answers(spec, questions, int(p.max_new_tokens))
        elif "policy" in inputs:
            answers = _policy_answers(cfg, path, questions)
        else:
            given = {str(r["question_id"]): r.get("answer", r.get("text")) for r in read_jsonl(path)}
            missing = [q["question_id"] for q in questions if not isinstance(given.get(str(q["question_id"])), str)]
            if missing:
                raise ValueError(f"{path}: no answer for question_id {missing[:5]} ({len(missing)} missing)")
            answers = [given[str(q["question_id"])] for q in questions]
        write_jsonl(work / "answers.jsonl", ({**q, "answer": a} for q, a in zip(questions, answers)))

    folder, _ = run_stage(Path(cfg.paths.artifacts), "answers", inputs, build)
    return name, folder


def _policy_answers(cfg: DictConfig, path: str, questions: list[dict[str, Any]]) -> list[str]:
    from rrhf.assets import load_causal_lm
    from rrhf.generation import greedy_responses

    p = cfg.eval.pairwise
    model, tokenizer = load_causal_lm(path, placement=placement.from_config(cfg))
    prompts = [question_prompt(tokenizer, q["question"], p.prompt_format) for q in questions]
    raw = greedy_responses(model, tokenizer, prompts, max_new_tokens=int(p.max_new_tokens))
    return [r.strip() for r in raw]


def _endpoint_answers(spec: dict[str, Any], questions: list[dict[str, Any]], max_tokens: int) -> list[str]:
    from rrhf.assets import cache_root
    from rrhf.judging import ChatClient, ChatRequest, EndpointError, JudgeCache

    requests = [ChatRequest([{"role": "user", "content": q["question"]}], "question") for q in questions]
    with ChatClient(
        spec["base_url"],
        spec["model"],
        api_key_env=spec.get("api_key_env", "OPENAI_API_KEY"),
        cache=JudgeCache(cache_root() / "judge_cache"),
        max_tokens=max_tokens,
    ) as client:
        answers = client.complete_many(requests, desc=f"answers of {spec['model']}")
    failed = [a for a in answers if isinstance(a, EndpointError)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(answers)} questions got no answer: {failed[0]}")
    return [a.content.strip() for a in answers]


def judged_stage(cfg: DictConfig, evaluated: Path, versus: Path) -> Path:
    """The judge's scores of the answers in `evaluated` against those in `versus` (two `answers` artifacts)."""
    from rrhf.assets import model_identity
    from rrhf.judging.scores import template_name
    from rrhf.judging.server import JUDGE_DEFAULTS

    p = cfg.eval.pairwise
    judge = {**JUDGE_DEFAULTS, **_plain(p.judge)}
    template = judge.pop("template", None) or "vicuna_pair_scores"
    model_id = judge["model"] if judge["base_url"] else model_identity(judge["model"])
    inputs = {
        "stage": "judged",
        "evaluated": evaluated.name,
        "versus": versus.name,
        "judge": {"model": model_id, "endpoint": judge["base_url"], "max_tokens": judge["max_tokens"]},
        "template": template_name(template),
        "both_orders": bool(p.both_orders),
    }

    def build(work: Path) -> None:
        from rrhf.assets import cache_root
        from rrhf.judging import ChatRequest, JudgeCache
        from rrhf.judging.scores import messages, score_pairs, summarise
        from rrhf.judging.server import judge_client

        ours = read_jsonl(evaluated / "answers.jsonl")
        theirs = {str(r["question_id"]): r["answer"] for r in read_jsonl(versus / "answers.jsonl")}
        pairs = [(r["question"], r["answer"], theirs[str(r["question_id"])]) for r in ours]
        asked = [ChatRequest(messages(*pair, template), template_name(template)) for pair in pairs]
        if p.both_orders:
            asked += [ChatRequest(messages(q, b, a, template), template_name(template)) for q, a, b in pairs]
        cache = JudgeCache(judge["cache"] or cache_root() / "judge_cache")
        with judge_client(judge, asked, cache=cache, max_tokens=judge["max_tokens"]) as client:
            scored = score_pairs(
                client,
                pairs,
                both_orders=bool(p.both_orders),
                concurrency=int(judge["concurrency"]),
                template=template,
            )
            judge_name = client.model_id
        failed = [s for s in scored if s.status == "error"]
        if failed:
            raise RuntimeError(
                f"judged: {len(failed)} of {len(scored)} pairs got no answer from the judge ({judge_name}); first: "
                f"{failed[0].error}. The answers received are cached: rerun to ask the rest."
            )
        write_jsonl(
            work / "judgements.jsonl",
            ({"question_id": r["question_id"], **s.to_dict()} for r, s in zip(ours, scored)),
        )
        write_json_atomic(
            work / "summary.json", {"judge": judge_name, "template": template_name(template), **summarise(scored)}
        )

    folder, _ = run_stage(Path(cfg.paths.artifacts), "judged", inputs, build)
    return folder


def pairwise_evaluation(cfg: DictConfig, policies: dict[str, tuple[str, str]]) -> dict:
    """The trained policy (`policies["trained"]`: model path, stage key) against every system of
    `eval.pairwise.versus`: per system, the judge's summary (summed scores, win / tie / lose, unparsed and failed
    pairs) and the artifact that holds the judgements."""
    p = cfg.eval.pairwise
    _, ours = answers_stage(cfg, "trained", policies)
    out: dict[str, Any] = {"questions": str(p.questions), "answers": str(ours)}
    for system in p.versus:
        name, theirs = answers_stage(cfg, system, policies)
        judged = judged_stage(cfg, ours, theirs)
        out[name] = {**json.loads((judged / "summary.json").read_text()), "artifact": str(judged)}
    return out
