"""Wombat's reward: an LLM rates one (prompt, response) on relevance, correctness, coherence and safety.

The RRHF authors trained Wombat with ChatGPT as the reward function, "score on Relevance, Correctness, Coherence,
and Safety" (seed-rrhf-slides.txt, line 443). They did not publish the prompt ChatGPT was given, nor the scale or
how the four scores became one reward. `WOMBAT_ASPECTS` is therefore a reconstruction written for this project:
the four aspects named on the slide, each an integer from 1 to 10, asked in one request, answered as four
`name: score` lines. The reward is the mean of the four (`aspect_reward`), or a weighted mean (`reward.weights`).

An answer is read by `parse_aspects`, which is tolerant of layout (whitespace, markdown emphasis, bullets, a JSON
object, "8/10") and strict about content: each of the four names exactly as written, an integer in 1-10, no
aspect given twice with two values. An answer it cannot read is not guessed from: `judge_pair` asks again with a
follow-up that says what was wrong (`reasks` times), and after that the judgement is recorded as failed (no score,
which the score stage leaves out of the prompt's ranking; a 0 would rank it last).

Every answer goes through the client's `JudgeCache`, the follow-ups too (their messages hold the answer before
them), so a judgement is a pure function of the cache: a rerun asks nothing, and `judge_pair` can also be walked
over the cache alone to find what is left to ask. The scorer that runs it for the stages is
`rrhf.reward.LLMJudgeScorer`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rrhf.judging.client import ChatRequest

ASPECTS = ("relevance", "correctness", "coherence", "safety")
LOWEST, HIGHEST = 1, 10


class UnparsedAnswer(ValueError):
    """An answer without a readable rating; the message says what is wrong (it is sent back in the follow-up)."""


@dataclass(frozen=True)
class AspectTemplate:
    """The rating prompt. `user` is formatted with {prompt} and {response}, `follow_up` with {problem}. The id and
    version enter every cache key: change the version whenever any of the texts changes."""

    id: str
    version: int
    system: str
    user: str
    follow_up: str
    max_tokens: int
    # Worked examples shown as earlier turns of the conversation: (prompt, response, the answer as it should read).
    examples: tuple[tuple[str, str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.id}@v{self.version}"

    def messages(self, prompt: str, response: str) -> list[dict[str, str]]:
        shown = []
        for example_prompt, example_response, answer in self.examples:
            shown += [
                {"role": "user", "content": self.user.format(prompt=example_prompt, response=example_response)},
                {"role": "assistant", "content": answer},
            ]
        return [
            {"role": "system", "content": self.system},
            *shown,
            {"role": "user", "content": self.user.format(prompt=prompt, response=response)},
        ]


_FORMAT = "relevance: <score>\ncorrectness: <score>\ncoherence: <score>\nsafety: <score>"

# A reconstruction (see the module docstring): the slide's four aspects, each explained in one line so that two
# judges read them alike, 1-10 integers, and a fixed four-line answer with no explanation, which also keeps the
# answer short (a few tokens per candidate, the cost that counts when every candidate of every prompt is rated).
# The format is repeated at the end of the user turn for small local models, which lose a system prompt's
# instructions by the end of a long response.
WOMBAT_ASPECTS = AspectTemplate(
    id="wombat_aspects",
    version=1,
    system=(
        "You are a strict grader of an AI assistant's answers. Rate the answer to the user's request on four "
        f"aspects, each an integer from {LOWEST} (very poor) to {HIGHEST} (excellent):\n"
        "relevance: the answer addresses what the request asks, without drifting off the subject;\n"
        "correctness: what the answer states is true, and its reasoning and any calculation are right;\n"
        "coherence: the answer is clear, well organised and consistent with itself;\n"
        "safety: the answer contains nothing harmful, dangerous, unethical or offensive "
        f"({HIGHEST}: entirely safe).\n"
        "Rate each aspect on its own; length is no merit in itself. Reply with exactly these four lines and "
        f"nothing else:\n{_FORMAT}"
    ),
    user=(
        "[Request]\n{prompt}\n\n[Answer]\n{response}\n\n"
        "Rate the answer: four lines, relevance, correctness, coherence and safety, each followed by a colon "
        f"and an integer from {LOWEST} to {HIGHEST}."
    ),
    follow_up=(
        "Your rating could not be read ({problem}). Reply with exactly these four lines and nothing else, each "
        f"score an integer from {LOWEST} to {HIGHEST}:\n{_FORMAT}"
    ),
    # Four short lines take about 20 tokens; the rest leaves room for a model that opens with a word or two.
    max_tokens=64,
)

# The same rating with two worked examples before the real request, for small local models: the embedded
# SmolLM2-135M-Instruct answers the plain template with prose ("The answer is: ...") and no rating at all, and with
# the examples before it answers in the four-line form. The examples' ratings are ours (one good answer, one
# off-topic and wrong) and bias a judge toward them; a capable hosted judge should use the plain template.
WOMBAT_ASPECTS_SHOWN = AspectTemplate(
    id="wombat_aspects_shown",
    version=1,
    system=WOMBAT_ASPECTS.system,
    user=WOMBAT_ASPECTS.user,
    follow_up=WOMBAT_ASPECTS.follow_up,
    max_tokens=WOMBAT_ASPECTS.max_tokens,
    examples=(
        (
            "Describe the sky on a clear day.",
            "The sky is blue and bright, with the sun shining.",
            "relevance: 10\ncorrectness: 9\ncoherence: 9\nsafety: 10",
        ),
        (
            "How many legs does a spider have?",
            "Spiders are blue and live on the moon moon moon.",
            "relevance: 3\ncorrectness: 1\ncoherence: 2\nsafety: 10",
        ),
    ),
)
TEMPLATES = {t.id: t for t in (WOMBAT_ASPECTS, WOMBAT_ASPECTS_SHOWN)}  # reward.template


def template_named(name: str) -> AspectTemplate:
    """`reward.template`'s template; ValueError names the choices."""
    if name not in TEMPLATES:
        raise ValueError(f"reward.template={name!r}: expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# One rating: an aspect's name standing alone (not part of a longer word), markup around it, an optional note in
# parentheses ("relevance (1-10)"), a colon, "=" or a table's "|", then the number, perhaps as "8/10". Quotes let a
# JSON object through ("relevance": 8). A name followed by prose ("Safety: the answer is safe") is no rating.
_MARK = r"[\s*_`\"'\[]*"
_RATING = re.compile(
    rf"(?<![A-Za-z])({'|'.join(ASPECTS)})(?![A-Za-z]){_MARK}(?:\([^)\n]*\){_MARK})?[:=|]{_MARK}"
    r"([-+]?\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?",
    re.IGNORECASE,
)


def parse_aspects(text: str) -> dict[str, int]:
    """The four ratings of one answer, by aspect name, in `ASPECTS` order.

    Raises UnparsedAnswer naming the problem: an empty answer, an aspect without a rating, an aspect rated twice
    with two values, a value that is not an integer (7.5) or lies outside 1-10 (0, 11), or a fraction on another
    scale (4/5). Other text around the ratings (a heading, an explanation) is allowed.
    """
    if not (text or "").strip():
        raise UnparsedAnswer("the answer is empty")
    found: dict[str, list[str]] = {}
    values: dict[str, int] = {}
    for match in _RATING.finditer(text):
        name, raw, denominator = match.group(1).lower(), match.group(2), match.group(3)
        shown = raw + (f"/{denominator}" if denominator else "")
        if denominator is not None and int(denominator) != HIGHEST:
            raise UnparsedAnswer(f"{name}: {shown} is not on the {LOWEST}-{HIGHEST} scale")
        number = float(raw)
        if not number.is_integer():
            raise UnparsedAnswer(f"{name}: {raw} is not an integer")
        if not LOWEST <= number <= HIGHEST:
            raise UnparsedAnswer(f"{name}: {raw} is outside {LOWEST}-{HIGHEST}")
        if name in values and values[name] != int(number):
            raise UnparsedAnswer(f"{name} is rated twice ({found[name][0]} and {shown})")
        found.setdefault(name, []).append(shown)
        values[name] = int(number)
    missing = [a for a in ASPECTS if a not in values]
    if missing:
        raise UnparsedAnswer(f"no rating for {', '.join(missing)}")
    return {a: values[a] for a in ASPECTS}


def check_weights(weights: Mapping[str, Any] | None) -> dict[str, float] | None:
    """`reward.weights` as floats: every aspect named once, each a finite number >= 0, their sum above 0; None (the
    plain mean) stays None. ValueError says what is wrong."""
    if weights is None:
        return None
    if not isinstance(weights, Mapping) or set(weights) != set(ASPECTS):
        got = sorted(weights) if isinstance(weights, Mapping) else weights
        raise ValueError(f"reward.weights={got!r}: expected a weight for each of {', '.join(ASPECTS)}")
    out = {}
    for name in ASPECTS:
        value = weights[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"reward.weights.{name}={value!r}: expected a finite number >= 0")
        out[name] = float(value)
    if sum(out.values()) <= 0:
        raise ValueError("reward.weights: every weight is 0; at least one must be above 0")
    return out


def aspect_reward(aspects: Mapping[str, int], weights: Mapping[str, float] | None = None) -> float:
    """The reward of one judgement: the mean of the four ratings, or their weighted mean. Normalised by the
    weights' sum, so that the reward stays on the 1-10 scale whatever the weights (and Table 6's statistics of
    two weightings are comparable)."""
    if weights is None:
        return sum(aspects[a] for a in ASPECTS) / len(ASPECTS)
    return sum(weights[a] * aspects[a] for a in ASPECTS) / sum(weights[a] for a in ASPECTS)


@dataclass(frozen=True)
class AspectJudgement:
    """One (prompt, response)'s judgement: the ratings and the reward, or, when no answer could be read, None for
    both and the last problem. `answers` holds every raw answer in the order asked (the first, then one per
    follow-up)."""

    aspects: dict[str, int] | None
    score: float | None
    answers: tuple[str, ...]
    problem: str | None = None

    @property
    def failed(self) -> bool:
        return self.score is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "aspects": self.aspects,
            "failed": self.failed,
            "problem": self.problem,
            "answers": list(self.answers),
        }


def judge_pair(
    prompt: str,
    response: str,
    answer: Callable[[ChatRequest], str | None],
    *,
    template: AspectTemplate = WOMBAT_ASPECTS,
    reasks: int = 1,
    weights: Mapping[str, float] | None = None,
) -> AspectJudgement | None:
    """Rate `response` to `prompt`. `answer(request)` returns the model's text for a request (from the cache or the
    endpoint; an EndpointError it raises goes through), or None when it cannot answer without asking (a walk over
    the cache alone): the whole judgement is then None.

    An unreadable answer is followed, in the same conversation, by `template.follow_up` naming the problem, at
    most `reasks` times; when none of the answers can be read the judgement is a failure (score None)."""
    messages = template.messages(prompt, response)
    answers: list[str] = []
    problem = None
    for _ in range(1 + max(0, reasks)):
        text = answer(ChatRequest(messages, template.name))
        if text is None:
            return None
        answers.append(text)
        try:
            aspects = parse_aspects(text)
        except UnparsedAnswer as error:
            problem = str(error)
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": template.follow_up.format(problem=problem)},
            ]
            continue
        return AspectJudgement(aspects, aspect_reward(aspects, weights), tuple(answers))
    return AspectJudgement(None, None, tuple(answers), problem)
