"""Pull the final answer out of what a model wrote.

Models state answers in many ways: `\\boxed{42}`, "The answer is 42.", "#### 42", "Answer: (B)", or just a
number at the end of their working. Each extractor tries the explicit forms first (the model told us which
part is the answer) and only then falls back to a heuristic (the last number, the only option mentioned).
Every function returns a canonical string, or None when no answer can be found.
"""

from __future__ import annotations

import re

# Unicode minus and dashes that models (and LaTeX renderers) put in front of negative numbers.
_MINUS_SIGNS = "\u2212\u2012\u2013\u2014\ufe63\uff0d"
_NUMBER = r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# "answer is", "answer:", "answer to the problem is", but not "find the answer step by step".
_ANSWER_PHRASE_RE = re.compile(r"answer(?:\s+to\s+[^.\n]{0,40}?)?\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)


def normalise_text(text: str) -> str:
    """Replace unicode minus signs and dashes with '-' so numbers parse."""
    for sign in _MINUS_SIGNS:
        text = text.replace(sign, "-")
    return text


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def canonical_number(token: str) -> str | None:
    """'1,234.50' -> '1234.5', '$-3' -> '-3', '7.0' -> '7'; None when it is not a number."""
    cleaned = normalise_text(token).replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    cleaned = cleaned.rstrip("%")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _numbers_in(text: str) -> list[str]:
    return [n for n in (canonical_number(m) for m in _NUMBER_RE.findall(text)) if n is not None]


def extract_number(response: str) -> str | None:
    """The number the response gives as its answer.

    Order: the last \\boxed{}, then the number stated after the last "answer is"/"answer:"/"####"
    (in the same sentence), then the last number anywhere.
    """
    text = normalise_text(response)
    boxed = last_boxed(text)
    if boxed is not None:
        numbers = _numbers_in(boxed.replace("\\frac", ""))
        if numbers:
            return numbers[-1]
    marker = max(text.rfind("####"), *(m.end() for m in _ANSWER_PHRASE_RE.finditer(text)), -1)
    if marker >= 0:
        # The statement after the marker, up to the end of its sentence or line.
        statement = re.match(r"(.*?)(?:\.\s|\.$|\n|$)", text[marker:]).group(1)
        numbers = _numbers_in(statement)
        if numbers:
            # "The answer is 60 + 60 = 120": the result is after the last "=".
            return numbers[-1] if "=" in statement else numbers[0]
    numbers = _numbers_in(text)
    return numbers[-1] if numbers else None


def numbers_equal(answer: str | None, target: str) -> bool:
    """Numeric equality with a relative tolerance for rounding in decimals."""
    if answer is None:
        return False
    try:
        a, t = float(answer), float(target)
    except ValueError:
        return False
    return abs(a - t) <= 1e-6 * max(1.0, abs(t))


_LETTER_PATTERNS = [
    # "The answer is (B)", "Answer: B", "answer is B."
    r"answer\s*(?:is|:)?\s*:?\s*\(?\b([A-{L}])\b\)?",
    # "(B)" or "B)" or "B." or "B:" at the start of a line
    r"(?:^|\n)\s*\(?([A-{L}])[\).:]\s",
    # a bare letter as the whole response or line: "B"
    r"(?:^|\n)\s*\(?([A-{L}])\)?\s*(?:$|\n)",
]


def extract_choice(response: str, choices: list[str]) -> str | None:
    """The option letter (A, B, ...) the response picks.

    Explicit letters after "answer" win; then a letter that opens a line; then, if exactly one option's
    text appears in the response, that option. Letters beyond the number of options are ignored.
    """
    last_letter = chr(ord("A") + len(choices) - 1)
    for pattern in _LETTER_PATTERNS:
        matches = re.findall(pattern.replace("{L}", last_letter), response, re.IGNORECASE)
        # Lower-case "a" is an article far more often than an option, so only upper case counts here.
        matches = [m for m in matches if m.isupper()]
        if matches:
            return matches[-1]
    lowered = response.lower()
    mentioned = [
        chr(ord("A") + k)
        for k, choice in enumerate(choices)
        if re.search(r"\b" + re.escape(choice.lower()) + r"\b", lowered)
    ]
    return mentioned[0] if len(mentioned) == 1 else None


_YES_WORDS = {"yes": "yes", "true": "yes", "correct": "yes", "no": "no", "false": "no", "incorrect": "no"}
_YES_NO_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def extract_yes_no(response: str) -> str | None:
    """'yes' or 'no'.

    An explicit "answer is yes/no" wins; then the word the response opens with; then the last yes/no word.
    """
    explicit = re.findall(
        r"answer\s*(?:is|:)?\s*:?\s*\**\s*(yes|no|true|false)\b", response, re.IGNORECASE
    )
    if explicit:
        return _YES_WORDS[explicit[-1].lower()]
    opening = re.match(r"\W*(yes|no|true|false)\b", response, re.IGNORECASE)
    if opening:
        return _YES_WORDS[opening.group(1).lower()]
    words = _YES_NO_RE.findall(response)
    return _YES_WORDS[words[-1].lower()] if words else None
