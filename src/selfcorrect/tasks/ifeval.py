"""IFEval (Zhou et al., 2023, "Instruction-Following Evaluation for Large Language Models"): prompts with
instructions a program can check ("answer in fewer than 100 words", "do not use commas", "wrap the reply in
JSON"), 25 kinds of them, each with its keyword arguments in the data.

The checks are written here from the paper and its reference code (google-research's
instruction_following_eval), with the same semantics: a reply follows an instruction under the *strict* check
when the reply as it stands passes, and under the *loose* check when the reply passes after one of the
reference's edits (first line removed, last line removed, both, asterisks removed, or a mix). An item is right
when its reply follows every instruction under the strict check: the paper's prompt-level strict accuracy. The
grade's `extra` holds the per-instruction verdicts of both checks, from which a report computes the other three
numbers (prompt-level loose, instruction-level strict and loose).

Where the reference needs NLTK data (punkt for sentences, word_tokenize for capital words), this file uses
rules of its own that need no download; their docstrings say where they differ. Other deliberate differences:
keyword arguments are taken as text, not regular expressions (keywords, section splitter, postscript marker;
no IFEval item has a regex character in them, so no verdict on the data changes), and malformed keyword
arguments are an error where the reference would draw random ones.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .base import Grade, Item, Task, file_identity, read_records, register_task, reject_unknown_options
from .base import require_field, require_items
from ..protocols import YANG2025, YANG2025_SYSTEM, prompt_style
from .hub import load_hub_rows

HUB_DATASET = "google/IFEval"
HUB_SPLIT = "train"  # IFEval's only split: the 541 prompts

# ---------------------------------------------------------------------------------------------------------------
# Counting words, sentences and capital words; detecting the language.


def count_words(text: str) -> int:
    r"""Runs of word characters (`\w+`, Unicode): what the reference's RegexpTokenizer(r"\w+") counts."""
    return len(re.findall(r"\w+", text))


# Abbreviations after which a period never ends a sentence: titles and words that introduce what follows.
_NEVER_FINAL = frozenset(
    "mr mrs ms messrs dr prof rev fr hon gen col capt cpt lt sgt maj cmdr adm gov sen rep pres st mt "
    "vs e.g i.e cf viz approx no nos vol fig figs pp ch sec eq ref dept est ca".split()
)
# Abbreviations that often end a sentence: the period ends one when a capitalised word follows.
_OFTEN_FINAL = frozenset("etc inc ltd co corp llc plc jr sr bros esq al a.m p.m".split())
# Words that start sentences often and names rarely: after an initial ("J.") or a dotted acronym ("U.S."),
# a period ends a sentence only when one of these follows, so "J. K. Rowling" and "U.S. Army" stay whole.
_STARTERS = frozenset(
    "the this that these those it its he she we they i you there here in on at for but and so or if when while as "
    "after before however also then my our their his her your some many most all each every one what how why who "
    "where which to with by from thus therefore moreover finally first today yes please let since although "
    "because during".split()
)
_OPENERS = "\"'“‘([{*_«"
_CLOSERS = "\"'”’)]}*_»"
_ACRONYM = re.compile(r"[A-Za-z]{1,2}(?:\.[A-Za-z]{1,2})+")  # U.S, Ph.D, e.g (the final period taken off)
_NUMBER = re.compile(r"\d[\d,.]*")


def _next_word(token: str | None) -> str:
    return "" if token is None else token.lstrip(_OPENERS)


def _ends_sentence(token: str, following: str | None, starts_line: bool) -> bool:
    """Whether the whitespace after `token` ends a sentence, given the token after it (None at the end)."""
    core = token.rstrip(_CLOSERS)
    if not core or core[-1] not in ".?!…":
        return False
    if following is None:
        return True
    after = _next_word(following)
    capitalised = after[:1].isupper()
    if core[-1] in "?!":
        return True
    if core.endswith("...") or core.endswith("…"):
        return capitalised  # "I waited... Then" ends one; "wait... and see" does not
    word = core[:-1].lstrip(_OPENERS)
    lowered = word.lower()
    is_starter = after.rstrip(".,;:!?" + _CLOSERS).lower() in _STARTERS and not re.fullmatch(r"[A-Za-z]\.", after)
    if lowered in _NEVER_FINAL:
        return False
    if lowered in _OFTEN_FINAL:
        return capitalised
    if (len(word) == 1 and word.isalpha()) or _ACRONYM.fullmatch(word):
        return capitalised and is_starter  # an initial or a dotted acronym
    if word.isdigit() and starts_line:
        return False  # "2." numbering a list item
    if _NUMBER.fullmatch(word):
        return not after[:1].islower()  # "in 1999. The" ends one; "about 3. or so" does not
    return True


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, by rules that need no downloaded data (the reference counts sentences with
    NLTK's punkt model for English).

    A sentence ends at a run of '.', '?', '!' or '…', with any closing quotes, brackets or markdown asterisks
    after it, followed by whitespace or the end of the text; text after the last end mark is one more sentence.
    A period does not end one inside a token (decimals 3.14, URLs, e.g.), nor after a title or an abbreviation
    that introduces what follows (Mr., Dr., St., vs., e.g., i.e., No., Fig. ...). After an abbreviation that
    often ends a sentence (etc., Inc., Ltd., Jr., a.m. ...) or an ellipsis, it ends one when a capitalised word
    follows; after an initial (J.) or a dotted acronym (U.S., Ph.D.), only when a common sentence starter
    follows (The, This, It, We ...). A number's period ends one unless a lowercase word follows.

    Where it differs from punkt: punkt decides abbreviations, initials and ellipses from statistics learned on
    a corpus (its abbreviation list and which words start sentences), so on rarer abbreviations and names the
    two can disagree; here those are fixed lists. A list number such as "2." at the start of a line is not a
    sentence of its own here; punkt often counts it as one. Like punkt, line breaks are whitespace: a line
    without an end mark (a heading, a list item) runs on into the next sentence, and a period followed by a
    line break ends one as before any other whitespace.
    """
    tokens = [(match.group(), match.start(), match.end()) for match in re.finditer(r"\S+", text)]
    sentences, start = [], None
    for index, (token, begin, end) in enumerate(tokens):
        if start is None:
            start = begin
        following = tokens[index + 1][0] if index + 1 < len(tokens) else None
        starts_line = not text[text.rfind("\n", 0, begin) + 1:begin].strip()
        if _ends_sentence(token, following, starts_line):
            sentences.append(text[start:end])
            start = None
    if start is not None:
        sentences.append(text[start:tokens[-1][2]])
    return sentences


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks, approximating NLTK's word_tokenize (Treebank rules) without its punkt
    download: hyphenated words, words joined by '/' and dotted abbreviations stay whole; other punctuation
    ('&' of "AT&T" too) is a token of its own; contractions and possessives split as Treebank splits them
    ("DON'T" is "DO" and "N'T", "JOHN'S" is "JOHN" and "'S"; "cannot" is "can" and "not"). Differences: Treebank
    leaves a period inside a sentence on the word before it ("etc." mid-sentence), here it is always a token of
    its own, and curly apostrophes stay inside words; neither changes which words are all capitals.
    """
    tokens = []
    for token in re.findall(r"\w+(?:[-'’./]\w+)*|[^\w\s]", text):
        contraction = _CONTRACTION.match(token)
        if contraction:
            tokens += [contraction.group(1), contraction.group(2)]
        elif token.lower() == "cannot":
            tokens += [token[:3], token[3:]]
        else:
            tokens.append(token)
    return tokens


def count_capital_words(text: str) -> int:
    """Tokens whose cased characters are all capitals (str.isupper), as the reference counts them."""
    return sum(token.isupper() for token in word_tokens(text))


_LANGDETECT = threading.Lock()  # langdetect's first call loads its profiles, which is not safe in two threads


def detect_language(text: str) -> str | None:
    """The ISO 639-1 code langdetect gives the text (seeded, so the same text always gets the same code), or
    None when langdetect cannot tell (no letters, say): the reference then counts the instruction as followed."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    with _LANGDETECT:
        DetectorFactory.seed = 0
        try:
            return detect(text)
        except LangDetectException:
            return None


# ---------------------------------------------------------------------------------------------------------------
# The 25 checks. Each takes the reply and the instruction's keyword arguments and says whether it is followed.

LESS_THAN, AT_LEAST = "less than", "at least"


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == LESS_THAN else count >= threshold


def _keywords_existence(reply: str, *, keywords: list[str]) -> bool:
    return all(re.search(re.escape(keyword), reply, re.IGNORECASE) for keyword in keywords)


def _keywords_frequency(reply: str, *, keyword: str, frequency: int, relation: str) -> bool:
    found = len(re.findall(re.escape(keyword.strip()), reply, re.IGNORECASE))
    return _compare(found, relation, frequency)


def _forbidden_words(reply: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(word)}\b", reply, re.IGNORECASE) for word in forbidden_words)


def _letter_frequency(reply: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(reply.lower().count(letter.strip().lower()), let_relation, let_frequency)


def _response_language(reply: str, *, language: str) -> bool:
    found = detect_language(reply)
    return found is None or found == language


def _number_sentences(reply: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(reply), relation, num_sentences)


def _number_paragraphs(reply: str, *, num_paragraphs: int) -> bool:
    """Paragraphs separated by the markdown divider ***: empty text before the first or after the last divider
    is no paragraph, an empty one between two dividers fails the check."""
    paragraphs = re.split(r"\s?\*\*\*\s?", reply)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index not in (0, len(paragraphs) - 1):
                return False
            count -= 1
    return count == num_paragraphs


def _number_words(reply: str, *, num_words: int, relation: str) -> bool:
    return _compare(count_words(reply), relation, num_words)


def _nth_paragraph_first_word(reply: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs separated by a blank line ("\\n\\n"): the count of non-empty ones must be `num_paragraphs`, and
    the `nth_paragraph`-th piece of the split (counting empty pieces, as the reference does) must start with
    `first_word`, compared without case, leading quotes and anything from the first punctuation mark on."""
    paragraphs = reply.split("\n\n")
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def _number_placeholders(reply: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", reply)) >= num_placeholders


def _postscript(reply: str, *, postscript_marker: str) -> bool:
    """A line holding the marker, without case; "P.S." and "P.P.S" also match with spaces after their periods."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, reply.lower(), flags=re.MULTILINE))


def _number_bullet_lists(reply: str, *, num_bullets: int) -> bool:
    """Exactly `num_bullets` lines starting with '*' (not '**') or '-' after optional whitespace."""
    stars = re.findall(r"^\s*\*[^\*].*$", reply, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", reply, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_response(reply: str) -> bool:
    reply = reply.strip()
    return any(option in reply for option in CONSTRAINED_RESPONSES)


def _number_highlighted_sections(reply: str, *, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty *highlights* or **highlights** within a line."""
    single = [text for text in re.findall(r"\*[^\n\*]*\*", reply) if text.strip("*").strip()]
    double = [text for text in re.findall(r"\*\*[^\n\*]*\*\*", reply) if text[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def _multiple_sections(reply: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` markers "<splitter> <number>" (case matters), e.g. "SECTION 1"."""
    marker = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(marker, reply)) - 1 >= num_sections


def _json_format(reply: str) -> bool:
    """The whole reply is JSON, optionally inside a ``` or ```json fence."""
    text = reply.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _title(reply: str) -> bool:
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", reply))


def _two_responses(reply: str) -> bool:
    """Two different replies separated by ******; nothing but whitespace may be empty between separators."""
    pieces = reply.split("******")
    kept = []
    for index, piece in enumerate(pieces):
        if piece.strip():
            kept.append(piece.strip())
        elif index not in (0, len(pieces) - 1):
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def _repeat_prompt(reply: str, *, prompt_to_repeat: str) -> bool:
    return reply.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _end_checker(reply: str, *, end_phrase: str) -> bool:
    return reply.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _capital_word_frequency(reply: str, *, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(count_capital_words(reply), capital_relation, capital_frequency)


def _english_capital(reply: str) -> bool:
    return reply.isupper() and detect_language(reply) in ("en", None)


def _english_lowercase(reply: str) -> bool:
    return reply.islower() and detect_language(reply) in ("en", None)


def _no_comma(reply: str) -> bool:
    return "," not in reply


def _quotation(reply: str) -> bool:
    reply = reply.strip()
    return len(reply) > 1 and reply[0] == '"' and reply[-1] == '"'


# ---------------------------------------------------------------------------------------------------------------
# The instructions: each check with the keyword arguments it takes, and how to tell a well-formed value.

# ISO 639-1 codes the reference accepts for language:response_language (instructions_util.LANGUAGE_CODES).
LANGUAGES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French",
    "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian",
    "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish",
    "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}


@dataclass(frozen=True)
class Argument:
    """What a keyword argument must be: `valid(value)` and how to say it in an error."""

    valid: Callable[[object], bool]
    description: str


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


COUNT = Argument(_is_count, "a whole number, 0 or more")
POSITIVE = Argument(lambda v: _is_count(v) and v >= 1, "a whole number, 1 or more")
RELATION = Argument(lambda v: v in (LESS_THAN, AT_LEAST), f"'{LESS_THAN}' or '{AT_LEAST}'")
TEXT = Argument(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
WORDS = Argument(
    lambda v: isinstance(v, list) and bool(v) and all(isinstance(w, str) and w.strip() for w in v),
    "a non-empty list of non-empty strings",
)
CHARACTER = Argument(lambda v: isinstance(v, str) and len(v.strip()) == 1, "a single character")
LANGUAGE = Argument(lambda v: v in LANGUAGES, "an ISO 639-1 code IFEval knows (" + ", ".join(LANGUAGES) + ")")


@dataclass(frozen=True)
class Instruction:
    check: Callable[..., bool]
    arguments: dict[str, Argument]


INSTRUCTIONS: dict[str, Instruction] = {
    "keywords:existence": Instruction(_keywords_existence, {"keywords": WORDS}),
    "keywords:frequency": Instruction(_keywords_frequency, {"keyword": TEXT, "frequency": COUNT, "relation": RELATION}),
    "keywords:forbidden_words": Instruction(_forbidden_words, {"forbidden_words": WORDS}),
    "keywords:letter_frequency": Instruction(
        _letter_frequency, {"letter": CHARACTER, "let_frequency": COUNT, "let_relation": RELATION}
    ),
    "language:response_language": Instruction(_response_language, {"language": LANGUAGE}),
    "length_constraints:number_sentences": Instruction(
        _number_sentences, {"num_sentences": COUNT, "relation": RELATION}
    ),
    "length_constraints:number_paragraphs": Instruction(_number_paragraphs, {"num_paragraphs": COUNT}),
    "length_constraints:number_words": Instruction(_number_words, {"num_words": COUNT, "relation": RELATION}),
    "length_constraints:nth_paragraph_first_word": Instruction(
        _nth_paragraph_first_word, {"num_paragraphs": POSITIVE, "nth_paragraph": POSITIVE, "first_word": TEXT}
    ),
    "detectable_content:number_placeholders": Instruction(_number_placeholders, {"num_placeholders": COUNT}),
    "detectable_content:postscript": Instruction(_postscript, {"postscript_marker": TEXT}),
    "detectable_format:number_bullet_lists": Instruction(_number_bullet_lists, {"num_bullets": COUNT}),
    "detectable_format:constrained_response": Instruction(_constrained_response, {}),
    "detectable_format:number_highlighted_sections": Instruction(
        _number_highlighted_sections, {"num_highlights": COUNT}
    ),
    "detectable_format:multiple_sections": Instruction(
        _multiple_sections, {"section_spliter": TEXT, "num_sections": COUNT}
    ),
    "detectable_format:json_format": Instruction(_json_format, {}),
    "detectable_format:title": Instruction(_title, {}),
    "combination:two_responses": Instruction(_two_responses, {}),
    "combination:repeat_prompt": Instruction(_repeat_prompt, {"prompt_to_repeat": TEXT}),
    "startend:end_checker": Instruction(_end_checker, {"end_phrase": TEXT}),
    "change_case:capital_word_frequency": Instruction(
        _capital_word_frequency, {"capital_frequency": COUNT, "capital_relation": RELATION}
    ),
    "change_case:english_capital": Instruction(_english_capital, {}),
    "change_case:english_lowercase": Instruction(_english_lowercase, {}),
    "punctuation:no_comma": Instruction(_no_comma, {}),
    "startend:quotation": Instruction(_quotation, {}),
}


def instruction_arguments(instruction_id: str, kwargs: dict) -> dict:
    """The instruction's keyword arguments, checked: null values dropped (the Hub's rows carry every argument
    of every instruction, null where unused), then each required one present and valid and no other left.
    Raises ValueError with a message fit to follow "file:line: " in a UserError."""
    if instruction_id not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction '{instruction_id}' (not one of IFEval's {len(INSTRUCTIONS)})")
    wanted = INSTRUCTIONS[instruction_id].arguments
    given = {key: value for key, value in kwargs.items() if value is not None}
    for key in given:
        if key not in wanted:
            takes = ", ".join(wanted) or "none"
            raise ValueError(f"'{instruction_id}' takes no argument '{key}' (it takes: {takes})")
    for key, argument in wanted.items():
        if key not in given:
            raise ValueError(f"'{instruction_id}' needs argument '{key}' ({argument.description})")
        if not argument.valid(given[key]):
            raise ValueError(
                f"'{instruction_id}' argument '{key}' must be {argument.description}, got {given[key]!r}"
            )
    if instruction_id == "length_constraints:nth_paragraph_first_word":
        if given["nth_paragraph"] > given["num_paragraphs"]:
            raise ValueError(f"'{instruction_id}' argument 'nth_paragraph' must be at most 'num_paragraphs'")
    return given


def follows(instruction_id: str, kwargs: dict, reply: str) -> bool:
    """Whether `reply` follows one instruction under the strict check (an empty reply follows none)."""
    return bool(reply.strip()) and INSTRUCTIONS[instruction_id].check(reply, **kwargs)


def loose_variants(reply: str) -> list[str]:
    """The reply and the reference's edits of it for the loose check: first line removed, last line removed,
    both, and each of these four with every asterisk removed."""
    lines = reply.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [reply, reply.replace("*", ""), *cut, *(text.replace("*", "") for text in cut)]


# ---------------------------------------------------------------------------------------------------------------
# Grading.


@functools.lru_cache(maxsize=4096)
def _instructions_of(target: str) -> tuple[tuple[str, dict], ...]:
    spec = json.loads(target)
    return tuple(zip(spec["instruction_id_list"], spec["kwargs"]))


def grade_ifeval(item: Item, response: str) -> Grade:
    """Right when the reply follows every instruction of the item under the strict check (the paper's
    prompt-level strict accuracy). `extra` has one verdict per instruction under each check, for prompt-level
    loose and instruction-level strict and loose accuracy.

    `answer` is None: strategies read it (self-consistency votes on it), and a summary of which instructions
    were followed is the verdict itself, which must not steer generation.
    """
    instructions = _instructions_of(item.target)
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in instructions:
        followed = follows(instruction_id, kwargs, response)
        strict.append(followed)
        loose.append(followed or any(follows(instruction_id, kwargs, text) for text in variants[1:]))
    missed = [instruction_id for (instruction_id, _), ok in zip(instructions, strict) if not ok]
    if missed:
        reason = f"not followed (strict): {', '.join(missed)}; {len(strict) - len(missed)} of {len(strict)} followed"
    else:
        reason = f"all {len(strict)} instructions followed (strict)"
    extra = {
        "strict": strict,
        "loose": loose,
        "loose_correct": all(loose),
        "instructions": [instruction_id for instruction_id, _ in instructions],
    }
    return Grade(None, not missed, reason, extra)


# ---------------------------------------------------------------------------------------------------------------
# Items and the task.


def _item(source: str, line: int, record: dict) -> Item:
    id_field = "id" if "id" in record or "key" not in record else "key"  # the reference's own files say "key"
    item_id = require_field(source, line, record, id_field, (int, str))
    prompt = require_field(source, line, record, "prompt", str)
    instruction_ids = require_field(source, line, record, "instruction_id_list", list)
    kwargs = require_field(source, line, record, "kwargs", list)
    if not instruction_ids:
        raise UserError(f"{source}:{line}: field 'instruction_id_list' is empty; every prompt has an instruction")
    if len(kwargs) != len(instruction_ids):
        raise UserError(
            f"{source}:{line}: field 'kwargs' must have one entry per instruction "
            f"({len(instruction_ids)}), got {len(kwargs)}"
        )
    checked = []
    for index, (instruction_id, arguments) in enumerate(zip(instruction_ids, kwargs)):
        if not isinstance(instruction_id, str) or instruction_id not in INSTRUCTIONS:
            raise UserError(
                f"{source}:{line}: field 'instruction_id_list' names unknown instruction {instruction_id!r} "
                f"(not one of IFEval's {len(INSTRUCTIONS)}, e.g. 'punctuation:no_comma')"
            )
        if not isinstance(arguments, dict):
            raise UserError(f"{source}:{line}: field 'kwargs' entry {index + 1} must be an object, "
                            f"got {type(arguments).__name__}")
        try:
            checked.append(instruction_arguments(instruction_id, arguments))
        except ValueError as err:
            raise UserError(f"{source}:{line}: field 'kwargs' entry {index + 1}: {err}") from None
    target = json.dumps(
        {"instruction_id_list": instruction_ids, "kwargs": checked, "prompt": prompt}, ensure_ascii=False
    )
    return Item(str(item_id), prompt, target)


class IFEvalTask(Task):
    """A task whose question is the whole prompt: an IFEval prompt states its own instructions, and a line
    appended to it would be one more instruction the reply is not graded on. `instruction` is still what the
    correction prompts end with."""

    def prompt(self, item: Item) -> str:
        return item.question


CORRECTION_INSTRUCTION = "Give your whole reply again, following every instruction of the original request."


@register_task(
    "ifeval", "IFEval: prompts with verifiable instructions (--data JSONL, or the Hub when online)",
    grader="ifeval (strict, prompt level)", answer="a reply following the prompt's instructions",
)
def ifeval(data: Path | None, options: dict[str, str]) -> Task:
    reject_unknown_options("ifeval", options, {"prompt"})
    style = prompt_style("ifeval", options)
    if data is None or str(data).startswith("hf:"):
        # hf:DATASET[:CONFIG][@SPLIT], as the custom task reads it; IFEval's own split is the default.
        name = str(data).removeprefix("hf:") if data is not None else HUB_DATASET
        dataset, _, split = name.partition("@")
        dataset, _, config = dataset.partition(":")
        split = split or HUB_SPLIT
        rows = load_hub_rows(dataset, config or None, split, task="ifeval")
        source = f"hf:{name}"
        items = require_items([_item(source, number, row) for number, row in enumerate(rows, start=1)], source)
        identity = {"hub": ":".join(part for part in (dataset, config, split) if part)}
    else:
        items = require_items([_item(str(data), line, record) for line, record in read_records(data)], str(data))
        identity = file_identity(data)
    return IFEvalTask(
        name="ifeval",
        items=items,
        instruction=lambda item: CORRECTION_INSTRUCTION,
        grade=grade_ifeval,
        # IFEval asks for long replies ("at least 300 words", several sections or paragraphs): 1024 tokens hold
        # about 700 English words, so the length limit rarely decides whether an instruction is followed.
        max_tokens=2048 if style == YANG2025 else 1024,
        identity={"task": "ifeval", **identity, **({"prompt": style} if style else {})},
        system=YANG2025_SYSTEM if style == YANG2025 else None,
    )


def instruction_following(turns: list) -> list[dict] | None:
    """IFEval's four accuracies for each round, from the per-instruction verdicts its grader stores: prompt
    level (every instruction of a reply followed) and instruction level (over all instructions of all replies),
    each under the strict and the loose check. Over every graded reply of the round, incomplete items
    included. None for a task whose grades hold no such verdicts."""
    graded = [turn for turn in turns if "strict" in turn.extra and "loose" in turn.extra]
    if not graded:
        return None
    rounds = []
    for round_ in sorted({turn.round for turn in graded}):
        replies = [turn for turn in graded if turn.round == round_]
        figures = {"round": round_, "replies": len(replies)}
        for check in ("strict", "loose"):
            verdicts = [verdict for turn in replies for verdict in turn.extra[check]]
            figures[f"prompt_{check}"] = sum(all(turn.extra[check]) for turn in replies) / len(replies)
            figures[f"instruction_{check}"] = sum(verdicts) / len(verdicts) if verdicts else None
        rounds.append(figures)
    return rounds
