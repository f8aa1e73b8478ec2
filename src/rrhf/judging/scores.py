"""Two answers scored side by side by an LLM judge, as Vicuna's GPT-4 evaluation scored them (the Wombat rows).

The slides report Wombat against Alpaca and ChatGPT as summed scores over the Vicuna questions (e.g. Alpaca 567
vs Wombat 616): the judge saw a question and two assistants' answers and gave each a score from 1 to 10, the two
scores first, on one line, then an explanation. Here each pair is asked in that order (the evaluated system as
assistant 1) and, with `both_orders`, swapped as well, the two asks' scores then averaged per system, which
cancels the judge's preference for a position. A pair's winner is the system with the higher (averaged) score;
equal scores are a tie. An answer whose first line does not hold exactly two scores in range is "unparsed":
that pair has no scores and is left out of the sums and counted, never given 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from rrhf.judging.client import ChatClient, ChatRequest, Completion, EndpointError

Status = Literal["ok", "unparsed", "error"]

# Written for this project after the description of Vicuna's evaluation (Chiang et al., 2023: "Vicuna: An
# Open-Source Chatbot Impressing GPT-4 with 90% ChatGPT Quality", the pairwise scoring prompt given to GPT-4);
# a reconstruction of that form, not its text. The version enters the cache key: raise it whenever the text changes.
TEMPLATE_ID, TEMPLATE_VERSION = "vicuna_pair_scores", 1
SYSTEM = "You are a helpful and precise assistant for checking the quality of answers."
USER = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n[The End of Assistant 2's Answer]\n\n"
    "[System]\nWe would like to request your feedback on the performance of two AI assistants in response to "
    "the user question displayed above. Please rate the helpfulness, relevance, accuracy and level of detail of "
    "their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score "
    "indicates better overall performance. Please first output a single line containing only two values "
    "indicating the scores for Assistant 1 and 2, respectively, separated by a space. In the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring "
    "that the order in which the responses were presented does not affect your judgment."
)
LOW, HIGH = 1.0, 10.0
_NUMBER = r"(\d+(?:\.\d+)?)"
# The first non-empty line: two numbers, separated by a space, a comma or a slash, and nothing else but markup.
_TWO_SCORES = re.compile(rf"^[\s*_`\[(]*{_NUMBER}\s*(?:[,/]\s*|\s+){_NUMBER}[\s*_`\])]*$")


# For small local models, two worked examples before the request (`eval.pairwise.judge.template`): the embedded
# SmolLM2-135M answers the plain prompt with prose and no scores, and with the examples before it writes the two
# scores' line (copying the last example's, so its scores carry little signal). Ours, like the prompt.
SHOWN_ID = "vicuna_pair_scores_shown"
TEMPLATES = (TEMPLATE_ID, SHOWN_ID)
EXAMPLES = (
    ("What color is grass?", "Grass is green.", "Grass is purple and made of glass.", "9 2\nAssistant 1 is right."),
    ("Name a large animal.", "the the the", "An elephant is a large animal.", "1 8\nAssistant 2 answers; 1 does not."),
)


def template_name(template: str = TEMPLATE_ID) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"eval.pairwise.judge.template={template!r}: expected one of {', '.join(TEMPLATES)}")
    return f"{template}@v{TEMPLATE_VERSION}"


def messages(question: str, answer_1: str, answer_2: str, template: str = TEMPLATE_ID) -> list[dict[str, str]]:
    shown = []
    for example in EXAMPLES if template == SHOWN_ID else ():
        asked = USER.format(question=example[0], answer_1=example[1], answer_2=example[2])
        shown += [{"role": "user", "content": asked}, {"role": "assistant", "content": example[3]}]
    return [
        {"role": "system", "content": SYSTEM},
        *shown,
        {"role": "user", "content": USER.format(question=question, answer_1=answer_1, answer_2=answer_2)},
    ]


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """The two scores on the answer's first non-empty line, or None when that line is not exactly two numbers
    within [1, 10] (a judge that writes "8 out of 10" or three numbers has not given the two scores asked for)."""
    for line in (text or "").splitlines():
        if line.strip():
            match = _TWO_SCORES.match(line)
            if not match:
                return None
            first, second = float(match.group(1)), float(match.group(2))
            return (first, second) if LOW <= first <= HIGH and LOW <= second <= HIGH else None
    return None


@dataclass(frozen=True)
class ScoredPair:
    """One question's two answers scored: `evaluated` and `versus` are the two systems' scores (averaged over the
    orders asked), None when unparsed or failed; `raw` holds the judge's answers as written, one per order."""

    evaluated: float | None
    versus: float | None
    status: Status
    raw: tuple[str | None, ...]
    template: str
    error: str | None = None

    @property
    def outcome(self) -> Literal["win", "tie", "lose"] | None:
        """For the evaluated system."""
        if self.evaluated is None or self.versus is None:
            return None
        return "win" if self.evaluated > self.versus else "lose" if self.evaluated < self.versus else "tie"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"outcome": self.outcome}


def scored_pair(answers: Sequence[Completion | EndpointError | str], template: str = "") -> ScoredPair:
    """One pair from its answers: the first asked with the evaluated system as assistant 1, the second (if any)
    with the two swapped."""
    raws: list[str | None] = []
    errors: list[str] = []
    for answer in answers:
        if isinstance(answer, EndpointError):
            raws.append(None)
            errors.append(str(answer))
        else:
            raws.append(answer if isinstance(answer, str) else answer.content)
    if errors:
        return ScoredPair(None, None, "error", tuple(raws), template, "; ".join(errors))
    parsed = [parse_scores(raw) for raw in raws]
    if any(p is None for p in parsed):
        return ScoredPair(None, None, "unparsed", tuple(raws), template)
    evaluated = [p[0] if k == 0 else p[1] for k, p in enumerate(parsed)]
    versus = [p[1] if k == 0 else p[0] for k, p in enumerate(parsed)]
    return ScoredPair(sum(evaluated) / len(evaluated), sum(versus) / len(versus), "ok", tuple(raws), template)


def score_pairs(
    client: ChatClient,
    pairs: Iterable[tuple[str, str, str]],
    *,
    both_orders: bool = False,
    concurrency: int = 4,
    progress: bool = True,
    max_failures: int | None = None,
    template: str = TEMPLATE_ID,
) -> list[ScoredPair]:
    """Score every (question, evaluated answer, versus answer); one ScoredPair per pair, in order. One order (the
    evaluated system as assistant 1, as the original evaluation asked) unless `both_orders`."""
    per_pair = 2 if both_orders else 1
    name = template_name(template)
    requests: list[ChatRequest] = []
    for question, evaluated, versus in pairs:
        requests.append(ChatRequest(messages(question, evaluated, versus, template), name))
        if both_orders:
            requests.append(ChatRequest(messages(question, versus, evaluated, template), name))
    answers = client.complete_many(
        requests, concurrency=concurrency, progress=progress, desc=f"judge {name}", max_failures=max_failures
    )
    return [scored_pair(answers[i : i + per_pair], name) for i in range(0, len(answers), per_pair)]


def summarise(pairs: Sequence[ScoredPair]) -> dict[str, float | int]:
    """As the slides report it: each system's summed score over the scored pairs, and the evaluated system's wins,
    ties and losses; pairs without scores are counted apart (unparsed, error) and left out of the sums."""
    scored = [p for p in pairs if p.outcome is not None]
    outcomes = [p.outcome for p in scored]
    return {
        "pairs": len(pairs),
        "scored": len(scored),
        "evaluated_sum": sum(p.evaluated for p in scored),
        "versus_sum": sum(p.versus for p in scored),
        "win": outcomes.count("win"),
        "tie": outcomes.count("tie"),
        "lose": outcomes.count("lose"),
        "unparsed": sum(p.status == "unparsed" for p in pairs),
        "error": sum(p.status == "error" for p in pairs),
    }
