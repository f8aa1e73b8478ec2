"""How often an LLM judge prefers the chosen response of the offline task's test pairs (data/imdb_offline).

Each (prompt, chosen, rejected) is judged with a pairwise template (--template: the MT-Bench-style
`mt_bench_pair`, or `single_letter` for small models) in both orders (`rrhf.judging.pairwise_judgements`): the
chosen response is "A", the rejected "B". Printed: the fractions of pairs where the chosen response wins, the
rejected wins, a tie (including every order flip), unparsed (an answer without a verdict) and failed requests,
how many pairs got the same verdict in both orders, timings, and the command. The judge is the embedded
SmolLM2-135M-Instruct behind a local `transformers serve` (started and
stopped here) unless --base-url names an endpoint already running.

The task's chosen continuation is the positive one. With `--framing positive` (the default) the judge's request
says so ("continue this review so that it praises the film"); with `--framing plain` it sees the review opening
alone and judges helpfulness in general, where no preference is the right one.

Answers are cached (default: $RRHF_CACHE/judge_cache), so a rerun asks nothing again.

    python benchmarks/judge_accuracy.py [--limit N] [--template mt_bench_pair|single_letter] [--max-tokens N]
                                        [--framing positive|plain]
                                        [--base-url URL --model NAME [--api-key-env VAR]] [--out judgements.jsonl]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rrhf.judging import (  # noqa: E402
    TEMPLATES,
    ChatClient,
    JudgeCache,
    local_server,
    pair_requests,
    pairwise_judgements,
    summarise,
    template_by_id,
)

FRAMINGS = {
    "positive": "Continue the following movie review so that it praises the film:\n\n{prompt}",
    "plain": "{prompt}",
}


def _cached_client(model: str, settings: dict) -> ChatClient:
    # Cache keys name the model by its identity, not by where it is served, so a client that can reach nothing
    # finds the answers a local server gave.
    from rrhf.assets import model_identity

    return ChatClient("http://127.0.0.1:9/v1", model, model_id=model_identity(model), api_key_env=None, **settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "imdb_offline" / "test.jsonl"))
    parser.add_argument("--limit", type=int, default=None, help="judge the first N pairs only")
    parser.add_argument("--framing", choices=sorted(FRAMINGS), default="positive")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="mt_bench_pair")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the template's (256; 2 for a letter)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--model",
        default="embedded:smollm2",
        help="local: a config's model path; with --base-url: the name the endpoint knows",
    )
    parser.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint already running")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local server")
    parser.add_argument("--device", default="cpu", help="device of the local server (cpu, cuda, auto)")
    parser.add_argument("--cache", default=None, help="cache folder (default $RRHF_CACHE/judge_cache)")
    parser.add_argument("--out", default=None, help="write every pair's judgement here (JSON lines)")
    args = parser.parse_args(argv)

    if args.cache is None:
        from rrhf.assets import cache_root

        args.cache = str(cache_root() / "judge_cache")
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    pairs = [(FRAMINGS[args.framing].format(prompt=r["prompt"]), r["chosen"], r["rejected"]) for r in rows]
    template = template_by_id(args.template)
    args.max_tokens = args.max_tokens or template.max_tokens
    cache = JudgeCache(args.cache)
    settings = {"cache": cache, "max_tokens": args.max_tokens, "timeout": 600.0}

    started = time.monotonic()
    startup_s = None
    with ExitStack() as stack:
        if args.base_url:
            client = stack.enter_context(
                ChatClient(args.base_url, args.model, api_key_env=args.api_key_env, **settings)
            )
        elif not (probe := _cached_client(args.model, settings)).uncached(
            [r for pair in pairs for r in pair_requests(*pair, template)]
        ):
            client = stack.enter_context(probe)  # every answer is cached: no server to start
        else:
            server = stack.enter_context(local_server(args.model, threads=args.threads, device=args.device))
            startup_s = server.startup_s
            client = stack.enter_context(server.client(**settings))
        asked = time.monotonic()
        judgements = pairwise_judgements(client, pairs, template=template, concurrency=args.concurrency)
        judging_s = time.monotonic() - asked
    total_s = time.monotonic() - started

    if args.out:
        with open(args.out, "w") as handle:
            for row, judgement in zip(rows, judgements):
                handle.write(json.dumps({"prompt": row["prompt"], **judgement.to_dict()}) + "\n")
    summary = summarise(judgements)
    where = client.base_url if args.base_url or startup_s is not None else "(every answer cached: no server started)"
    sent = len(pairs) * 2 - cache.stats.hits
    print(
        f"judge: {client.model_id} at {where}, template {judgements[0].template if judgements else '-'}, "
        f"framing {args.framing}, max_tokens {args.max_tokens}, temperature 0"
    )
    print(
        f"pairs: {summary['pairs']} (both orders: {2 * len(pairs)} answers, {cache.stats.hits} from the cache, "
        f"{sent} asked)"
    )
    print(f"chosen preferred:   {summary['A']:.3f}")
    print(f"rejected preferred: {summary['B']:.3f}")
    print(f"tie:                {summary['tie']:.3f}  (order flips included)")
    print(f"unparsed:           {summary['unparsed']:.3f}")
    print(f"failed requests:    {summary['error']:.3f}")
    print(f"same verdict in both orders: {summary['consistent']:.3f}")
    verdicts = sum((j.verdict_ab is not None) + (j.verdict_ba is not None) for j in judgements)
    print(f"answers with a verdict: {verdicts} of {2 * len(judgements)}")
    if startup_s is not None:
        print(f"server start: {startup_s:.1f} s")
    per = f", {judging_s / sent:.1f} s per asked request" if sent else ""
    print(f"judging: {judging_s:.1f} s{per}; total {total_s:.1f} s")
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
