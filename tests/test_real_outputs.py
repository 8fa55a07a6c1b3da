"""Answer extraction on saved replies of the embedded SmolLM2-135M (first answers and corrections on
arithmetic, GSM8K, CommonsenseQA and BoolQ), each labelled by hand with the answer the reply states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfcorrect.tasks.extract import extract_choice, extract_number, extract_yes_no

FIXTURE = Path(__file__).parent / "fixtures" / "embedded_outputs.jsonl"
RECORDS = [json.loads(line) for line in FIXTURE.read_text().splitlines()]


@pytest.mark.parametrize("record", RECORDS, ids=[r["source"] for r in RECORDS])
def test_extracts_the_stated_answer(record):
    if record["kind"] == "number":
        answer = extract_number(record["response"])
    elif record["kind"] == "choice":
        answer = extract_choice(record["response"], record["choices"])
    else:
        answer = extract_yes_no(record["response"])
    assert answer == record["expected"], record.get("note", "")


MATH_CODE = Path(__file__).parent / "fixtures" / "embedded_math_code_outputs.jsonl"
MATH_CODE_RECORDS = [json.loads(line) for line in MATH_CODE.read_text().splitlines()]
DATA = {"math": "math_problems.jsonl", "mbpp": "mbpp_sample.jsonl", "humaneval": None}


@pytest.mark.parametrize("record", MATH_CODE_RECORDS, ids=[f"{r['task']}#{r['item_id']}" for r in MATH_CODE_RECORDS])
def test_math_and_code_graders_on_real_replies(record):
    """Replies of the embedded model to MATH-style, HumanEval and MBPP items, verdicts checked by hand."""
    from selfcorrect.tasks import load_task

    data = DATA[record["task"]] and Path(__file__).parent / "fixtures" / DATA[record["task"]]
    task = load_task(record["task"], data)
    item = next(i for i in task.items if i.id == record["item_id"])
    verdict = task.grade(item, record["response"])
    assert verdict.correct is record["correct"], (verdict.reason, record.get("note"))
    if "reason_starts" in record:
        assert verdict.reason.startswith(record["reason_starts"]), verdict.reason
