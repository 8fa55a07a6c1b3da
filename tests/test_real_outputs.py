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
