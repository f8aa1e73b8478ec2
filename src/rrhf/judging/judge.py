"""Pairwise preference from an LLM judge, asked in both orders (the MT-Bench protocol).

For each (prompt, response A, response B) the judge sees the two responses once as A, B and once swapped. Each
answer ends with a verdict: "[[A]]", "[[B]]" or "[[C]]" (a tie). The two verdicts, mapped back to the original
responses, are combined as MT-Bench combines them: the same winner twice is that winner; any disagreement (the
preference follows the position, or a tie once) is a tie. An answer without exactly one kind of verdict is
"unparsed": the pair gets no label (None), and both raw answers are kept, never guessed from.

Two templates, chosen by id (`TEMPLATES`, `template_by_id`):

- `mt_bench_pair` (the default, for real endpoints): an explanation, then "[[A]]", "[[B]]" or "[[C]]";
- `single_letter` (for small local models): a short prompt asking for one letter, read by `parse_letter` from
  the first characters of the answer. SmolLM2-135M never wrote an MT-Bench verdict (128 of 128 answers on the
  offline test pairs unparsed), so the offline judge needs a form it can follow.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from rrhf.judging.client import ChatClient, ChatRequest, Completion, EndpointError

Label = Literal["A", "tie", "B"]
Status = Literal["ok", "unparsed", "error"]


_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# The first thing in the answer, past whitespace and markup ("**", quotes, brackets), must be the letter standing
# alone: "A", "B." or "[[C" are read, "Answer A" or "Both" are not (their first letter is part of a word).
_LETTER = re.compile(r"^[\W_]*([ABC])(?![A-Za-z0-9])")
_LABELS: dict[str, Label] = {"A": "A", "B": "B", "C": "tie"}
_SWAP: dict[Label, Label] = {"A": "B", "B": "A", "tie": "tie"}


def parse_verdict(text: str) -> Label | None:
    """The verdict of one answer, or None when it has none or several different ones (a judge that writes
    "[[A]]" and "[[B]]" has not said which it means; taking the first or the last would be a guess)."""
    found = {_LABELS[m] for m in _VERDICT.findall(text or "")}
    return found.pop() if len(found) == 1 else None


def parse_letter(text: str) -> Label | None:
    """The single-letter verdict: the answer's first letter when it is a capital A, B or C standing alone (C is a
    tie); anything else, lower case included ("a" is as likely the article), is None: unparsed, never a label."""
    match = _LETTER.match(text or "")
    return _LABELS[match.group(1)] if match else None


@dataclass(frozen=True)
class PairwiseTemplate:
    """A pairwise judging prompt. `user` is formatted with {question}, {answer_a} and {answer_b}. The id and
    version enter the cache key: change the version whenever the text changes. `parser` reads one answer into a
    verdict; `max_tokens` is the answer length the template needs, used where the configuration sets none."""

    id: str
    version: int
    system: str
    user: str
    parser: Callable[[str], Label | None] = parse_verdict
    max_tokens: int | None = None

    @property
    def name(self) -> str:
        return f"{self.id}@v{self.version}"

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.user.format(question=question, answer_a=answer_a, answer_b=answer_b)},
        ]


# Written for this project in the style of MT-Bench's pairwise judge prompt (Zheng et al., 2023: an impartial
# judge, a short explanation, then the verdict in double brackets, C for a tie); a reconstruction of that style,
# not a copy of its text.
MT_BENCH_PAIR = PairwiseTemplate(
    id="mt_bench_pair",
    version=1,
    system=(
        "You are an impartial judge. You will see a user's request and the answers of two AI assistants, "
        "A and B. Decide which assistant answered the request better, considering how helpful, relevant, "
        "accurate and detailed each answer is. The order in which the answers appear, their length and the "
        "assistants' names must not affect your decision. First explain your comparison in a few sentences. "
        'Then write your verdict on its own line, exactly as "[[A]]" if assistant A is better, "[[B]]" if '
        'assistant B is better, or "[[C]]" if they are equally good.'
    ),
    user=(
        "[User Request]\n{question}\n\n"
        "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
    ),
    # Room for a few sentences and the verdict; what benchmarks/judge_accuracy.py measured with.
    max_tokens=256,
)

# For a small local model: no explanation to write (a 135M model loses the thread of one before any verdict), the
# question last so that the letter is the next thing to say, and two tokens of answer, which also makes a judgement
# cost about one prompt read on a CPU.
SINGLE_LETTER = PairwiseTemplate(
    id="single_letter",
    version=1,
    system="You compare two answers to a request and reply with a single letter.",
    user=(
        "Request:\n{question}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n"
        "Which answer is better? Reply with one letter only: A, B, or C if they are equally good."
    ),
    parser=parse_letter,
    max_tokens=2,
)

TEMPLATES: dict[str, PairwiseTemplate] = {t.id: t for t in (MT_BENCH_PAIR, SINGLE_LETTER)}


def template_by_id(template_id: str) -> PairwiseTemplate:
    """The template a configuration names; KeyError lists the known ids."""
    try:
        return TEMPLATES[template_id]
    except KeyError:
        raise KeyError(f"unknown judge template {template_id!r} (known: {', '.join(sorted(TEMPLATES))})") from None


def combine(verdict_ab: Label | None, verdict_ba: Label | None) -> Label | None:
    """The label of a pair from its two verdicts, both already in the original naming (A = the first response
    given): agreement is kept, any disagreement is a tie, a missing verdict leaves the pair unlabelled."""
    if verdict_ab is None or verdict_ba is None:
        return None
    return verdict_ab if verdict_ab == verdict_ba else "tie"


@dataclass(frozen=True)
class PairJudgement:
    """One pair's judgement. `verdict_ab`: the verdict with response A shown first; `verdict_ba`: with the two
    swapped, mapped back so that "A" still means response A. `raw_*` are the judge's answers as written (None
    when the request failed, see `error`)."""

    label: Label | None
    status: Status
    verdict_ab: Label | None
    verdict_ba: Label | None
    raw_ab: str | None
    raw_ba: str | None
    template: str
    error: str | None = None

    @property
    def consistent(self) -> bool:
        """Both orders gave the same verdict."""
        return self.verdict_ab is not None and self.verdict_ab == self.verdict_ba

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judgement_from_answers(
    answer_ab: Completion | EndpointError | str,
    answer_ba: Completion | EndpointError | str,
    template: str = "",
    parser: Callable[[str], Label | None] = parse_verdict,
) -> PairJudgement:
    """Combine the answers to the two orders (the second asked with the responses swapped) into one judgement,
    each read with `parser` (the template's)."""
    raws: list[str | None] = []
    errors: list[str] = []
    for answer in (answer_ab, answer_ba):
        if isinstance(answer, EndpointError):
            raws.append(None)
            errors.append(str(answer))
        else:
            raws.append(answer if isinstance(answer, str) else answer.content)
    raw_ab, raw_ba = raws
    verdict_ab = parser(raw_ab) if raw_ab is not None else None
    swapped = parser(raw_ba) if raw_ba is not None else None
    verdict_ba = _SWAP[swapped] if swapped is not None else None
    label = combine(verdict_ab, verdict_ba)
    status: Status = "error" if errors else ("ok" if label is not None else "unparsed")
    return PairJudgement(label, status, verdict_ab, verdict_ba, raw_ab, raw_ba, template, "; ".join(errors) or None)


def pair_requests(
    prompt: str, response_a: str, response_b: str, template: PairwiseTemplate = MT_BENCH_PAIR
) -> tuple[ChatRequest, ChatRequest]:
    """The two requests of one pair: A first, then B first."""
    return (
        ChatRequest(template.messages(prompt, response_a, response_b), template.name),
        ChatRequest(template.messages(prompt, response_b, response_a), template.name),
    )


def pairwise_judgements(
    client: ChatClient,
    pairs: Iterable[tuple[str, str, str]],
    *,
    template: PairwiseTemplate = MT_BENCH_PAIR,
    concurrency: int = 4,
    progress: bool = True,
    max_failures: int | None = None,
) -> list[PairJudgement]:
    """Judge every (prompt, response_A, response_B), asking in both orders; one PairJudgement per pair, in order.
    A request that failed after its retries gives that pair status "error" (and is not cached, so a rerun asks
    it again); past `max_failures` failed requests the whole call raises EndpointError."""
    requests: list[ChatRequest] = []
    for prompt, response_a, response_b in pairs:
        requests.extend(pair_requests(prompt, response_a, response_b, template))
    answers = client.complete_many(
        requests, concurrency=concurrency, progress=progress, desc=f"judge {template.name}", max_failures=max_failures
    )
    return [
        judgement_from_answers(answers[i], answers[i + 1], template.name, template.parser)
        for i in range(0, len(answers), 2)
    ]


def summarise(judgements: Sequence[PairJudgement]) -> dict[str, float | int]:
    """Fractions of all pairs labelled A, tie, B, unparsed and failed, and how many pairs were consistent."""
    n = len(judgements)
    count = {"A": 0, "tie": 0, "B": 0, "unparsed": 0, "error": 0}
    for j in judgements:
        count[j.label if j.label is not None else j.status] += 1
    out: dict[str, float | int] = {"pairs": n}
    out.update({k: (v / n if n else 0.0) for k, v in count.items()})
    out["consistent"] = sum(j.consistent for j in judgements) / n if n else 0.0
    return out
