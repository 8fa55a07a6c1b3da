"""Keeping training and evaluation items apart, by content rather than by id.

An item is known by its question text with runs of white space collapsed (`question_key`): the same
question under another id, in another data file or another task option set is the same question. Two
things rest on that key: a seeded split of a task's items into a training and a held-out part
(`split_part`, `held_out_part`), and the refusal to measure a trained model on questions it was trained on
(`check_no_leak`; a trained model's card lists the keys of its training questions).
"""

from __future__ import annotations

import hashlib

from .errors import UserError


def question_key(text: str) -> str:
    """SHA-256 (hex) of the question with white space normalised: the same text however it was wrapped."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def split_part(question_text: str, seed: int, test_share: float) -> str:
    """"test" for about `test_share` of all questions, "train" for the rest, decided by a hash of the question's
    key and `seed` alone: the same question always falls in the same part (so the parts are disjoint by
    content, however many ids or files it appears under), whatever else the task holds."""
    digest = hashlib.sha256(f"{seed}\0{question_key(question_text)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_share * 2**64 else "train"


def check_no_leak(questions: list[tuple[str, str]], trained: set[str], model_spec: str, allow: bool) -> None:
    """Refuse (UserError) to measure `model_spec` on `questions` ((item id, question text) pairs) of which any
    is among `trained` (the question keys of its training data), unless `allow` (--allow-train-items)."""
    if allow or not trained:
        return
    leaked = [item_id for item_id, text in questions if question_key(text) in trained]
    if leaked:
        raise UserError(
            f"--model {model_spec}: {len(leaked)} of the {len(questions)} evaluation items (first: {leaked[0]}) are "
            "questions it was trained on; measure it on held-out items (--split test), or pass --allow-train-items "
            "to measure on training items on purpose"
        )


SPLIT_PARTS = ("train", "test")


def held_out_part(items: list, split: str | None, seed: int, test_share: float) -> list:
    """The items in part `split` of the seeded split by question content (all of them when `split` is None)."""
    if split is None:
        return items
    if split not in SPLIT_PARTS:
        raise UserError(f"--split {split}: choose train or test")
    if not 0 < test_share < 1:
        raise UserError(f"--test-share {test_share:g}: must be between 0 and 1 (the share of questions held out)")
    part = [item for item in items if split_part(item.question, seed, test_share) == split]
    if not part:
        raise UserError(f"--split {split}: no item of this task falls in that part; use more items or another --test-share")
    return part
