"""Candidate sampling benchmarks.

Part 1, diverse beam search: `rrhf.beam_search.diverse_beam_search` (this venv, transformers 5.x) against
`generate(num_beam_groups=...)` of transformers 4.55.4, run in a worker subprocess of another interpreter
(`--hf455-python`) on the same model folder, the same token ids and the same number of threads. The two
sides alternate, one timed call each per repetition, after one untimed warm-up call each. Prints the median
seconds per call of both, the ratio ours / 4.55.4 (<= 1 means ours is not slower) and whether the returned
sequences are identical.

Part 2, scoring throughput with and without length-sorted batching: see `scoring_throughput` below.

    python benchmarks/sampling.py [--model PATH] [--hf455-python /tmp/tf455/bin/python] [--max-new-tokens 32]
        [--reps 5] [--threads N]

The 4.55.4 interpreter: `python3 -m venv /tmp/tf455 && /tmp/tf455/bin/pip install torch==2.13.0
transformers==4.55.4`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rrhf.beam_search import diverse_beam_search

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Review: I went into this film expecting very little, and",
    "Review: The first twenty minutes of this movie",
    "Review: Few directors could have turned such a thin script into",
    "Review: My main complaint about the sequel is",
]

# Runs under transformers 4.55.4: reads one JSON job, answers "ready", then one timed generate per "run"
# line. Output lines of the protocol start with "@@" so library messages on stdout cannot be mistaken.
WORKER = r"""
import json, sys, time
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM

job = json.loads(sys.stdin.readline())
torch.set_num_threads(job["threads"])
config = AutoConfig.from_pretrained(job["model"])
# Folders written by transformers 5.x keep RoPE settings under `rope_parameters`, which 4.x ignores
# (it would fall back to its default theta and compute a different model).
rope = getattr(config, "rope_parameters", None)
if isinstance(rope, dict) and "rope_theta" in rope:
    config.rope_theta = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config.rope_scaling = rope
model = AutoModelForCausalLM.from_pretrained(job["model"], config=config, torch_dtype=torch.float32).eval()
ids, mask = torch.tensor(job["input_ids"]), torch.tensor(job["attention_mask"])
print("@@" + json.dumps({"ready": transformers.__version__}), flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, **job["kwargs"])
    seconds = time.perf_counter() - start
    print("@@" + json.dumps({"seconds": seconds, "sequences": out.tolist()}), flush=True)
"""


def default_model() -> str:
    root = Path(os.environ.get("RRHF_CACHE", Path.home() / ".cache" / "rrhf")).expanduser()
    return str(root / "models" / "smollm2-135m-instruct")


class Hf455Worker:
    """A transformers 4.55.4 process holding the model, timed one generate call at a time."""

    def __init__(self, python: str, job: dict):
        self.proc = subprocess.Popen(
            [python, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(job["threads"])},
        )
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.version = self._reply()["ready"]

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"the 4.55.4 worker exited with code {self.proc.wait()}")

    def run(self) -> tuple[float, torch.Tensor]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        reply = self._reply()
        return reply["seconds"], torch.tensor(reply["sequences"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def diverse_beam_benchmark(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = [tokenizer(p).input_ids for p in PROMPTS]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs = dict(
        num_beams=args.num_beams,
        num_beam_groups=args.num_beam_groups,
        diversity_penalty=args.diversity_penalty,
        num_return_sequences=args.num_return_sequences,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )

    def ours() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = diverse_beam_search(model, input_ids, attention_mask, **kwargs)
        return time.perf_counter() - start, out

    worker = Hf455Worker(
        args.hf455_python,
        dict(
            model=args.model,
            threads=args.threads,
            kwargs=kwargs,
            input_ids=input_ids.tolist(),
            attention_mask=attention_mask.tolist(),
        ),
    )
    try:
        ours(), worker.run()  # warm-up: first-call allocations and kernel selection
        times = {"ours": [], "hf455": []}
        outputs = {}
        for _ in range(args.reps):
            for name, call in (("ours", ours), ("hf455", worker.run)):
                seconds, outputs[name] = call()
                times[name].append(seconds)
    finally:
        worker.close()

    import transformers

    med = {name: statistics.median(values) for name, values in times.items()}
    identical = outputs["ours"].shape == outputs["hf455"].shape and torch.equal(outputs["ours"], outputs["hf455"])
    print(
        f"diverse beam search: {len(PROMPTS)} prompts (<= {width} tokens), {args.num_beams} beams / "
        f"{args.num_beam_groups} groups, diversity {args.diversity_penalty}, "
        f"{args.num_return_sequences} returned, {args.max_new_tokens} new tokens, {args.threads} threads, "
        f"{args.reps} reps"
    )
    print(
        f"  ours  (transformers {transformers.__version__}): median {med['ours']:.3f} s  "
        f"[{', '.join(f'{t:.3f}' for t in times['ours'])}]"
    )
    print(
        f"  hf455 (transformers {worker.version}): median {med['hf455']:.3f} s  "
        f"[{', '.join(f'{t:.3f}' for t in times['hf455'])}]"
    )
    print(f"  ratio ours / hf455: {med['ours'] / med['hf455']:.3f}")
    print(f"  identical sequences: {identical}")
    texts = tokenizer.batch_decode(outputs["ours"][: args.num_return_sequences, width:], skip_special_tokens=True)
    for text in texts:
        print(f"    {PROMPTS[0]!r} -> {text!r}")


# ---------------------------------------------------------------------------------------------------------
# Part 2: scoring throughput with / without length-sorted batching.
# ---------------------------------------------------------------------------------------------------------
def scoring_throughput(args: argparse.Namespace) -> None:
    """Responses scored per second by a reward model, with and without length-sorted batching.

    The reward model is the embedded SmolLM2 backbone with a (random) one-label classification head: a
    real transformer of realistic cost. Texts are the offline task's prompts with continuations cut to
    many lengths, in the order a candidate file holds them (lengths mixed within every batch).
    """
    import random

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rrhf.reward import SequenceClassifierScorer

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in open(ROOT / "data" / "imdb_offline" / "train.jsonl")][: args.scoring_texts]
    rng = random.Random(0)
    prompts, responses = [], []
    for row in rows:
        for text in (row["chosen"], row["rejected"]):
            words = (text + " " + row["prompt"] + " " + text).split()
            prompts.append(row["prompt"])
            responses.append(" " + " ".join(words[: rng.randint(3, len(words))]))
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    scorers = {
        sort: SequenceClassifierScorer(
            model,
            tokenizer,
            label=0,
            output="logit",
            text="prompt+response",
            batch_size=args.scoring_batch,
            sort_by_length=sort,
        )
        for sort in (False, True)
    }
    times: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for _ in range(args.reps):
        for sort in (False, True):  # interleaved, so drift in machine load hits both alike
            start = time.perf_counter()
            results[sort] = scorers[sort].score(prompts, responses)
            times[sort].append(time.perf_counter() - start)
    n = len(responses)
    unsorted, sorted_ = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"scoring {n} (prompt, response) pairs, batch {args.scoring_batch}, {args.reps} reps, "
        f"{args.threads} threads, model {args.model}"
    )
    print(f"  in file order : median {unsorted:.2f} s  ({n / unsorted:.1f} responses/s)")
    print(f"  length-sorted : median {sorted_:.2f} s  ({n / sorted_:.1f} responses/s)")
    print(
        f"  speed-up {unsorted / sorted_:.2f}x; largest score difference "
        f"{max(abs(a - b) for a, b in zip(results[False], results[True])):.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("diverse_beam", "scoring"), default="diverse_beam")
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--hf455-python", default="/tmp/tf455/bin/python")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--num-beam-groups", type=int, default=4)
    parser.add_argument("--diversity-penalty", type=float, default=1.0)
    parser.add_argument("--num-return-sequences", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--scoring-texts", type=int, default=128, help="offline rows (2 responses each)")
    parser.add_argument("--scoring-batch", type=int, default=16)
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    {"diverse_beam": diverse_beam_benchmark, "scoring": scoring_throughput}[args.part](args)


if __name__ == "__main__":
    main()
