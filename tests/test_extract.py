"""Answer extraction on edge cases; tests/test_real_outputs.py checks it on saved real model outputs."""

from __future__ import annotations

import pytest

from selfcorrect.tasks.extract import extract_choice, extract_number, extract_yes_no, numbers_equal


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 42.", "42"),
        ("5 + 3 = 8. The answer is 8", "8"),
        ("We get \\boxed{17} in the end, not 3.", "17"),
        ("#### 1,234", "1234"),
        ("She pays $1,234.50 in total.", "1234.5"),
        ("The answer is \u22127.", "-7"),  # unicode minus
        ("The answer is -7.", "-7"),
        ("It costs 12 dollars. The answer is 12 dollars.", "12"),
        ("The percentage is 25%.", "25"),
        ("The answer is 3.0", "3"),
        ("First 4, then 9, finally 16", "16"),
        ("Answer: 0.5", "0.5"),
        ("\\boxed{\\frac{1}{2}}", "2"),  # LaTeX fractions are MATH's business (issue 3), here the last number
        ("No idea.", None),
        ("", None),
        # An explicit "answer is" wins over numbers written after it, when they come soon.
        ("The answer is 6. Check: 2 * 3 = 6, and 6 - 1 = 5.", "6"),
    ],
)
def test_extract_number(response, expected):
    assert extract_number(response) == expected


def test_numbers_equal_tolerates_float_noise_only():
    assert numbers_equal("0.30000000000000004", "0.3")
    assert numbers_equal("18", "18")
    assert not numbers_equal("18.5", "18")
    assert not numbers_equal(None, "18")


CHOICES = ["bank", "library", "department store", "mall", "new york"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is C.", "C"),
        ("Answer: (B)", "B"),
        ("B. library", "B"),
        ("D", "D"),
        ("I would go to the library to find one.", "B"),  # option text, only one mentioned
        ("a bank or a mall", None),  # two options mentioned, no letter: no answer
        ("a person would go there", None),  # lower-case "a" is not option A
        ("The answer is F.", None),  # beyond the options
        ("(A) is wrong. The answer is (E).", "E"),
    ],
)
def test_extract_choice(response, expected):
    assert extract_choice(response, CHOICES) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Yes, the sky is blue.", "yes"),
        ("No. It is not.", "no"),
        ("Well, I think it is true.", "yes"),
        ("Some say yes, but the answer is no.", "no"),
        ("The answer is: **Yes**", "yes"),
        ("It depends.", None),
    ],
)
def test_extract_yes_no(response, expected):
    assert extract_yes_no(response) == expected


def test_answer_statement_with_working_takes_the_result():
    assert extract_number("The answer is 60 + 60 = 120 meters.\n\nCheck it.") == "120"
    # "answer" used as an ordinary word is not an answer statement.
    assert extract_number("Let us find the answer step by step.\nStep 1: 15 meals. Step 2: 25 meals.") == "25"
