"""Option scores from an OpenAI-compatible server's token log-probabilities: the exact estimator over HTTP.

`LlamaCppBackend.option_probs` defines the quantity: the conversation, the assistant's reply started with the
answer prefix ("The answer is:"), and the next-token probability of each " LABEL", renormalised over the
labels. Over HTTP the reply start is sent as a final assistant message the server must continue rather than
answer, one token is asked for with the server's `TOP_LOGPROBS` most likely next tokens, and each label's
probability is read at its token. A label outside those tokens gets 0 (its probability is below the
least likely one shown); when none is among them the pass fails rather than guess.

Continuing a final assistant message is not part of the OpenAI API. vLLM and SGLang do it when asked
(`continue_final_message`, with `add_generation_prompt` off); llama.cpp's llama-server does it for any final
assistant message; others (llama-cpp-python's server, hosted APIs) close the message and open a new reply,
which would score the options at the start of a fresh answer. So before the first score a probe finds out
what the server does, from the prompt tokens it reports for three requests: the question alone (n0), with
the reply started by P (n1), and started by P twice (n2). A server that continues adds P's tokens: n1 - n0 =
n2 - n1. One that opens a new reply adds also the tokens that close a message and open the next: n1 - n0 >
n2 - n1. Only an exact match counts, so a template or tokenizer that blurs the counts leads to sampling
(the safe side), never to scores read at the wrong place.
"""

from __future__ import annotations

import math
from typing import Callable

from .base import BackendError, Message

TOP_LOGPROBS = 20  # the most the OpenAI API allows, and vLLM's default cap
# Asked of every server; those that do not know the fields ignore them (the probe tells).
CONTINUE_FINAL_MESSAGE = {"continue_final_message": True, "add_generation_prompt": False}
PROBE_QUESTION = [{"role": "user", "content": "Which of these is a colour? A. red B. four"}]
PROBE_PREFIX = "The answer is:"


def scoring_request(messages: list[Message], answer_prefix: str) -> dict:
    """The chat completion request whose one generated token's log-probabilities score the options."""
    return {
        "messages": [*messages, {"role": "assistant", "content": answer_prefix}],
        "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": TOP_LOGPROBS,
        "extra_body": CONTINUE_FINAL_MESSAGE,
    }


def label_probs(reply, labels: list[str]) -> list[float]:
    """P(label) renormalised over `labels`, from the top log-probabilities of the reply's first token."""
    choice = reply.choices[0]
    content = choice.logprobs.content if choice.logprobs else None
    if not content or not content[0].top_logprobs:
        raise BackendError("the server returned no token log-probabilities")
    mass = [sum(math.exp(top.logprob) for top in content[0].top_logprobs if top.token == f" {label}") for label in labels]
    total = sum(mass)
    if total == 0:
        seen = ", ".join(repr(top.token) for top in content[0].top_logprobs[:5])
        raise BackendError(f"none of the options {labels} is among the server's {TOP_LOGPROBS} most likely next "
                           f"tokens (first: {seen})")
    return [share / total for share in mass]


def continuation_problem(create: Callable[..., object]) -> str | None:
    """Why the server behind `create` (chat.completions.create with the model bound) cannot score options,
    or None when it can: it must return log-probabilities, report prompt tokens and continue a final
    assistant message (the module docstring says how that is told)."""
    alone = create(messages=PROBE_QUESTION, max_tokens=1, temperature=0.0)
    once = create(**scoring_request(PROBE_QUESTION, PROBE_PREFIX))
    twice = create(**scoring_request(PROBE_QUESTION, PROBE_PREFIX * 2))
    try:
        label_probs(once, ["A", "B"])
    except BackendError as missing:
        if "log-probabilities" in str(missing):
            return str(missing)
    counts = [reply.usage.prompt_tokens if reply.usage else 0 for reply in (alone, once, twice)]
    if not all(counts):
        return "the server reports no prompt token counts, so whether it continues a started reply cannot be checked"
    started, repeated = counts[1] - counts[0], counts[2] - counts[1]
    if started != repeated:
        return (f"the server does not continue a started assistant reply (starting it added {started} prompt tokens, "
                f"its repetition {repeated}), so options would be scored at the start of a new reply")
    return None
