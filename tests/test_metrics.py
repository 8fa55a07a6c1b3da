"""Tests for selfcorrect.metrics: hand-worked tables, identities, edge cases, McNemar and bootstrap."""

import json

import numpy as np
import pytest

from selfcorrect.metrics import accuracy, mcnemar_exact, pair_metrics, summarize

approx = pytest.approx


# --- 1. hand-worked tables -------------------------------------------------------------------------

def test_hand_table_five_items_one_sample():
    # item: 0  1  2  3  4
    a = [[1], [1], [0], [0], [0]]
    b = [[1], [0], [1], [1], [0]]
    # pa  = 1, 1, 0, 0, 0                      -> Acc1 = 2/5
    # x   = pa*P(b|a)     = 1, 0, 0, 0, 0      -> sum x = 1
    # y   = (1-pa)*P(b|~a) = 0, 0, 1, 1, 0     -> sum y = 2
    # Acc2 = (1 + 2)/5 = 3/5
    # CL = 1 / 2 = 1/2 ; CS = 2 / 3
    # RSS = (3/5 - 4/25) / (2 * 2/5 * 3/5) = (11/25) / (12/25) = 11/12
    # Acc_inf = (2/3) / (1 - 1/2 + 2/3) = (2/3) / (7/6) = 4/7
    # transitions over 5 cells: c->c 1, c->w 1, w->c 2, w->w 1
    # McNemar b=1, c=2: 2 * (C(3,0) + C(3,1)) / 8 = 1
    m = pair_metrics(a, b, n_boot=200)
    assert m["n_items"] == 5 and m["n_samples"] == 1
    assert m["acc1"] == approx(2 / 5)
    assert m["acc2"] == approx(3 / 5)
    assert m["delta"] == approx(1 / 5)
    assert m["cl"] == approx(1 / 2)
    assert m["cs"] == approx(2 / 3)
    assert m["rss"] == approx(11 / 12)
    assert m["acc_inf"] == approx(4 / 7)
    assert m["counts"] == {"c->c": 1, "c->w": 1, "w->c": 2, "w->w": 1}
    assert m["transitions"] == approx({"c->c": 1 / 5, "c->w": 1 / 5, "w->c": 2 / 5, "w->w": 1 / 5})
    assert m["mcnemar_p"] == approx(1.0)


def test_hand_table_three_items_two_samples():
    a = [[1, 1], [1, 0], [0, 1]]
    b = [[1, 0], [1, 1], [1, 1]]
    # item 0: a=(1,1) b=(1,0): pa=1,   P(b|a)=1/2, P(b|~a)=0 (no wrong)  -> x=1/2, y=0
    # item 1: a=(1,0) b=(1,1): pa=1/2, P(b|a)=1,   P(b|~a)=1             -> x=1/2, y=1/2
    # item 2: a=(0,1) b=(1,1): pa=1/2, P(b|a)=1,   P(b|~a)=1             -> x=1/2, y=1/2
    # sum pa = 2, sum (1-pa) = 1, sum x = 3/2, sum y = 1
    # Acc1 = 2/3 ; Acc2 = (1/2 + 1 + 1)/3 = 5/6 ; delta = 1/6
    # CL = (3/2)/2 = 3/4 ; CS = 1/1 = 1   (check: 2/3*3/4 + 1/3*1 = 5/6)
    # RSS = (5/6 - 4/9) / (2 * 2/3 * 1/3) = (7/18) / (8/18) = 7/8
    # Acc_inf = 1 / (1 - 3/4 + 1) = 4/5
    # cells: item0 c->c, c->w; item1 c->c, w->c; item2 w->c, c->c  -> 3, 1, 2, 0 of 6
    m = pair_metrics(a, b, n_boot=200)
    assert m["n_items"] == 3 and m["n_samples"] == 2
    assert m["acc1"] == approx(2 / 3)
    assert m["acc2"] == approx(5 / 6)
    assert m["delta"] == approx(1 / 6)
    assert m["cl"] == approx(3 / 4)
    assert m["cs"] == approx(1.0)
    assert m["rss"] == approx(7 / 8)
    assert m["acc_inf"] == approx(4 / 5)
    assert m["counts"] == {"c->c": 3, "c->w": 1, "w->c": 2, "w->w": 0}
    assert m["transitions"] == approx({"c->c": 1 / 2, "c->w": 1 / 6, "w->c": 1 / 3, "w->w": 0.0})


def test_point_estimates_inside_intervals():
    rng = np.random.default_rng(7)
    a = rng.random((60, 3)) < 0.6
    b = np.where(a, rng.random(a.shape) < 0.85, rng.random(a.shape) < 0.4)
    m = pair_metrics(a, b, n_boot=500)
    for name, (lo, hi) in m["ci"].items():
        assert lo <= m[name] <= hi, name


# --- 2. identity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 1), (20, 1), (7, 2), (30, 3), (50, 8), (3, 10)])
def test_identity_acc2_from_cl_cs(shape):
    rng = np.random.default_rng(100 * shape[0] + shape[1])
    checked = 0
    for _ in range(50):
        p = rng.random()
        a = rng.random(shape) < p
        b = rng.random(shape) < rng.random()
        m = pair_metrics(a, b, n_boot=1)
        if m["cl"] is None or m["cs"] is None:
            continue
        assert m["acc2"] == approx(m["acc1"] * m["cl"] + (1 - m["acc1"]) * m["cs"], abs=1e-12)
        checked += 1
    assert checked >= 25


# --- 3./4. RSS and undefined metrics ------------------------------------------------------------

def test_rss_none_when_acc1_is_zero_or_one():
    zeros = np.zeros((4, 3), dtype=int)
    ones = np.ones((4, 3), dtype=int)
    mixed = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    assert pair_metrics(zeros, mixed, n_boot=50)["rss"] is None
    assert pair_metrics(ones, mixed, n_boot=50)["rss"] is None
    assert pair_metrics(zeros, mixed, n_boot=50)["ci"]["rss"] is None
    assert pair_metrics(ones, mixed, n_boot=50)["ci"]["rss"] is None


def test_rss_negative_is_not_clipped():
    # Acc1 = 1/2, every answer wrong afterwards: Acc2 = 0
    # RSS = (0 - 1/4) / (2 * 1/2 * 1/2) = -1/2
    m = pair_metrics([[1], [1], [0], [0]], [[0], [0], [0], [0]], n_boot=50)
    assert m["rss"] == approx(-1 / 2)


def test_rss_above_one_is_not_clipped():
    # Acc1 = 1/4, every answer right afterwards: Acc2 = 1
    # RSS = (1 - 1/16) / (2 * 1/4 * 3/4) = (15/16) / (6/16) = 5/2 ; CL = CS = 1 -> Acc_inf = 1
    m = pair_metrics([[1], [0], [0], [0]], [[1], [1], [1], [1]], n_boot=50)
    assert m["rss"] == approx(5 / 2)
    assert m["acc_inf"] == approx(1.0)


def test_rss_is_half_when_nothing_changes():
    rng = np.random.default_rng(3)
    for shape in [(10, 1), (25, 4)]:
        a = rng.random(shape) < 0.5
        m = pair_metrics(a, a, n_boot=50)
        assert 0 < m["acc1"] < 1
        assert m["cl"] == 1.0 and m["cs"] == 0.0
        assert m["acc2"] == approx(m["acc1"])
        assert m["rss"] == approx(0.5)
        assert m["acc_inf"] is None  # 1 - CL + CS == 0: every state is a fixed point
        assert m["mcnemar_p"] == 1.0


def test_cl_none_when_no_first_answer_right():
    a = np.zeros((3, 2), dtype=int)
    b = np.array([[1, 0], [0, 0], [1, 1]])
    m = pair_metrics(a, b, n_boot=50)
    assert m["cl"] is None and m["ci"]["cl"] is None
    assert m["acc_inf"] is None
    assert m["cs"] == approx(3 / 6)


def test_cs_none_when_all_first_answers_right():
    a = np.ones((3, 2), dtype=int)
    b = np.array([[1, 0], [0, 0], [1, 1]])
    m = pair_metrics(a, b, n_boot=50)
    assert m["cs"] is None and m["ci"]["cs"] is None
    assert m["acc_inf"] is None
    assert m["cl"] == approx(3 / 6)


# --- 5. McNemar -----------------------------------------------------------------------------------

def test_mcnemar_known_values():
    assert mcnemar_exact(0, 5) == approx(2 / 32)          # 2 * (1/2)^5 = 0.0625
    assert mcnemar_exact(5, 0) == approx(0.0625)
    assert mcnemar_exact(1, 9) == approx(22 / 1024)       # 2 * (1 + 10) / 2^10
    assert mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_used_on_cells():
    # 5 cells go wrong->right, none right->wrong
    a = [[0, 0], [0, 0], [0, 1], [1, 1]]
    b = [[1, 1], [1, 1], [1, 1], [1, 1]]
    assert pair_metrics(a, b, n_boot=10)["mcnemar_p"] == approx(0.0625)


# --- 6. simulation: coverage and bias -------------------------------------------------------------

@pytest.mark.parametrize("n_samples", [1, 4])
def test_bootstrap_coverage_on_simulated_runs(n_samples):
    cl_true, cs_true = 0.8, 0.3
    acc2_true = 0.5 * cl_true + 0.5 * cs_true  # E[p] = 0.5 for Beta(2, 2)
    truth = {"cl": cl_true, "cs": cs_true, "acc2": acc2_true}
    rng = np.random.default_rng(2024 + n_samples)
    n_sims, n_items = 200, 300
    covered = {k: 0 for k in truth}
    estimates = {k: [] for k in truth}
    for sim in range(n_sims):
        p = rng.beta(2, 2, size=(n_items, 1))
        a = rng.random((n_items, n_samples)) < p
        b = np.where(a, rng.random(a.shape) < cl_true, rng.random(a.shape) < cs_true)
        m = pair_metrics(a, b, n_boot=500, seed=sim)
        for k, value in truth.items():
            lo, hi = m["ci"][k]
            covered[k] += lo <= value <= hi
            estimates[k].append(m[k])
    # NumPy's seeded generators draw the same runs on every CPU, so these bounds meet the same simulations
    # everywhere. 0.90-0.99 is the nominal 0.95 give or take three binomial standard deviations over 200
    # simulations (0.015 each); 0.01 is about four standard errors of the mean estimate over them.
    for k, value in truth.items():
        assert 0.90 <= covered[k] / n_sims <= 0.99, (k, covered[k] / n_sims)
        assert np.mean(estimates[k]) == approx(value, abs=0.01), k


# --- 7. the bootstrap resamples items, not samples ------------------------------------------------

def test_bootstrap_is_over_items():
    rng = np.random.default_rng(11)
    a1 = rng.random((200, 1)) < 0.5
    b1 = np.where(a1, rng.random(a1.shape) < 0.8, rng.random(a1.shape) < 0.3)
    one = pair_metrics(a1, b1, n_boot=1000)
    # Four identical samples per item: no new information, so the interval must not shrink.
    tiled = pair_metrics(np.tile(a1, (1, 4)), np.tile(b1, (1, 4)), n_boot=1000)
    # The same 800 cells treated as 800 independent items: the interval should shrink by about 2.
    as_items = pair_metrics(np.repeat(a1, 4, axis=0), np.repeat(b1, 4, axis=0), n_boot=1000)
    for k in ("acc1", "acc2", "cl", "cs", "delta"):
        assert tiled[k] == approx(one[k])
        assert as_items[k] == approx(one[k])
        width_one = one["ci"][k][1] - one["ci"][k][0]
        width_tiled = tiled["ci"][k][1] - tiled["ci"][k][0]
        width_items = as_items["ci"][k][1] - as_items["ci"][k][0]
        # Seeded: the same resamples on every machine. Four times the items should narrow the interval by
        # about half (1/sqrt(4)); 0.7 leaves room for the bootstrap's own noise, and tiling should change nothing
        # beyond that noise.
        assert width_tiled == approx(width_one, rel=0.05), k
        assert width_items < 0.7 * width_one, k


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(5)
    a = rng.random((40, 2)) < 0.5
    b = rng.random((40, 2)) < 0.6
    assert pair_metrics(a, b, seed=1)["ci"] == pair_metrics(a, b, seed=1)["ci"]
    assert pair_metrics(a, b, seed=1)["ci"] != pair_metrics(a, b, seed=2)["ci"]


# --- 8. errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    (np.zeros((0, 3)), np.zeros((0, 3))),          # no items
    (np.zeros((3, 0)), np.zeros((3, 0))),          # no samples
    (np.zeros(3), np.zeros(3)),                    # 1-D
    (np.zeros((2, 2, 2)), np.zeros((2, 2, 2))),    # 3-D
    (np.zeros((3, 2)), np.zeros((3, 1))),          # shapes differ
    (np.full((2, 2), 2), np.zeros((2, 2))),        # not 0/1
])
def test_pair_metrics_rejects_bad_input(a, b):
    with pytest.raises(ValueError):
        pair_metrics(a, b)


@pytest.mark.parametrize("correct", [np.zeros((0, 2, 3)), np.zeros((4, 2)), np.zeros((2, 2, 2, 2))])
def test_summarize_rejects_bad_input(correct):
    with pytest.raises(ValueError):
        summarize(correct)


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        accuracy(np.zeros((0, 1)))
    with pytest.raises(ValueError):
        accuracy(np.zeros(5))


# --- 9. summarize -----------------------------------------------------------------------------

def test_summarize_three_rounds():
    rng = np.random.default_rng(9)
    correct = rng.random((30, 2, 3)) < 0.6
    s = summarize(correct, n_boot=300, seed=4)
    assert (s["n_items"], s["n_samples"], s["n_rounds"]) == (30, 2, 3)
    assert len(s["acc"]) == 3 and len(s["acc_ci"]) == 3
    assert [(p["from"], p["to"]) for p in s["pairs"]] == [(0, 1), (1, 2)]
    for t, pair in enumerate(s["pairs"]):
        assert pair["acc1"] == approx(s["acc"][t])
        assert pair["acc2"] == approx(s["acc"][t + 1])
        assert pair["ci"]["acc1"] == approx(s["acc_ci"][t])  # same seed -> same item resamples
    assert s["first_last"]["acc1"] == approx(s["acc"][0])
    assert s["first_last"]["acc2"] == approx(s["acc"][2])
    json.dumps(s, allow_nan=False)


def test_summarize_single_round():
    s = summarize(np.ones((5, 2, 1), dtype=int), n_boot=50)
    assert s["acc"] == [1.0]
    assert s["pairs"] == [] and s["first_last"] is None
    json.dumps(s, allow_nan=False)


def test_accuracy_matches_pair_metrics_acc1():
    rng = np.random.default_rng(12)
    a = rng.random((25, 3)) < 0.4
    b = rng.random((25, 3)) < 0.5
    acc = accuracy(a, n_boot=400, seed=8)
    m = pair_metrics(a, b, n_boot=400, seed=8)
    assert acc["acc"] == approx(m["acc1"])
    assert acc["ci"] == approx(m["ci"]["acc1"])


def test_pair_metrics_output_is_plain_json():
    rng = np.random.default_rng(13)
    m = pair_metrics(rng.random((10, 2)) < 0.5, rng.random((10, 2)) < 0.5, n_boot=100)
    assert json.loads(json.dumps(m, allow_nan=False)) == m
