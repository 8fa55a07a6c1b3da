"""Self-correction metrics: how often a model keeps right answers and fixes wrong ones.

For item i with samples j, a_ij says whether the answer in round t was correct and b_ij whether the
answer in round t+1 was. Per item:

    P(a_i) = mean_j a_ij
    P(b_i|a_i)     = sum_j a_ij b_ij / sum_j a_ij              (0 when no a_ij is right)
    P(b_i|not a_i) = sum_j (1-a_ij) b_ij / sum_j (1-a_ij)      (0 when every a_ij is right)

and over items:

    Acc1 = mean_i P(a_i)                 Acc2 = mean_i [P(a_i) P(b_i|a_i) + (1-P(a_i)) P(b_i|not a_i)]
    CL   = sum_i P(a_i) P(b_i|a_i) / sum_i P(a_i)                 (confidence level: keep a right answer)
    CS   = sum_i (1-P(a_i)) P(b_i|not a_i) / sum_i (1-P(a_i))     (critique score: fix a wrong answer)
    RSS  = (Acc2 - Acc1^2) / (2 Acc1 (1-Acc1))                    (never clipped)
    Acc_inf = CS / (1 - CL + CS)                                  (fixed point of repeating the step)

so that Acc2 = Acc1 CL + (1-Acc1) CS. Every metric is a ratio of sums of three per-item quantities
(pa_i, x_i = P(a_i)P(b_i|a_i), y_i = (1-P(a_i))P(b_i|not a_i)), which is what lets the bootstrap over
items run as one vectorised computation. Undefined metrics are reported as None.

Inputs are 0/1 (or bool) arrays: (n_items, n_samples) for one pair of rounds, and
(n_items, n_samples, n_rounds) for a whole run. Outputs are plain JSON-serialisable dicts.
"""

import numpy as np

CI_LEVEL = 0.95
TRANSITIONS = ("c->c", "c->w", "w->c", "w->w")
_RATIO_METRICS = ("acc1", "acc2", "cl", "cs", "rss", "acc_inf", "delta")


def mcnemar_exact(n_cw: int, n_wc: int) -> float:
    """Two-sided exact McNemar p-value for the discordant counts (right->wrong, wrong->right).

    Under "correction changes nothing", each discordant cell is equally likely to go either way, so the
    smaller count is Binomial(n_cw + n_wc, 1/2); the p-value doubles its lower tail, capped at 1.
    """
    from scipy.stats import binom  # here, not at the top: importing scipy.stats takes a second

    n = int(n_cw) + int(n_wc)
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(n_cw, n_wc), n, 0.5)))


def pair_metrics(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """All metrics for the step from round t (correctness `a`) to round t+1 (correctness `b`).

    `a` and `b` have shape (n_items, n_samples). Confidence intervals are percentile intervals from
    `n_boot` bootstrap resamples of items (samples of one item are not independent, so items are the
    unit that is resampled); the same `seed` gives the same resamples for any table with the same
    number of items, so intervals from different round pairs of one run are comparable.
    """
    a = _as_table(a, 2, "a")
    b = _as_table(b, 2, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    n_items, n_samples = a.shape

    counts = {
        "c->c": int(np.sum(a & b)),
        "c->w": int(np.sum(a & ~b)),
        "w->c": int(np.sum(~a & b)),
        "w->w": int(np.sum(~a & ~b)),
    }
    result = {"n_samples": int(n_samples), **_metrics_from_item_quantities(*_item_quantities(a, b), n_boot, seed)}
    result["counts"] = counts
    result["mcnemar_p"] = mcnemar_exact(counts["c->w"], counts["w->c"])
    return result


def pair_metrics_from_probabilities(p_a, p_b_given_a, p_b_given_not_a, n_boot: int = 2000, seed: int = 0) -> dict:
    """The same metrics from per-item probabilities instead of samples (the exact estimator).

    With P(a_i), P(b_i|a_i) and P(b_i|not a_i) known for each item, there is no sampling noise within
    an item; the intervals still resample items. Transition shares are expected shares; there are no
    discrete counts, so no McNemar test.
    """
    p_a, p_b_a, p_b_na = (np.asarray(v, dtype=float) for v in (p_a, p_b_given_a, p_b_given_not_a))
    if p_a.ndim != 1 or p_a.size == 0 or not (p_a.shape == p_b_a.shape == p_b_na.shape):
        raise ValueError("need three 1-D arrays of the same non-zero length, one value per item")
    if not all(((v >= 0) & (v <= 1)).all() for v in (p_a, p_b_a, p_b_na)):
        raise ValueError("probabilities must lie in [0, 1]")
    result = _metrics_from_item_quantities(p_a, p_a * p_b_a, (1.0 - p_a) * p_b_na, n_boot, seed)
    return {**result, "counts": None, "mcnemar_p": None}


def _metrics_from_item_quantities(pa: np.ndarray, x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict:
    """Point estimates, bootstrap intervals and transition shares from the per-item (pa, x, y)."""
    point = _ratio_metrics(pa[None, :], x[None, :], y[None, :])
    idx = bootstrap_indices(len(pa), n_boot, seed)
    replicates = _ratio_metrics(pa[idx], x[idx], y[idx])
    result = {"n_items": int(len(pa))}
    result.update({name: _scalar(point[name][0]) for name in _RATIO_METRICS})
    # x_i is P(right then right) for item i and y_i P(wrong then right): their means are the shares.
    shares = {"c->c": x.mean(), "c->w": (pa - x).mean(), "w->c": y.mean(), "w->w": (1.0 - pa - y).mean()}
    result["transitions"] = {k: float(shares[k]) for k in TRANSITIONS}
    result["ci"] = {name: percentile_ci(replicates[name]) for name in _RATIO_METRICS}
    return result


def accuracy(correct, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean per-item accuracy of one round, with a bootstrap-over-items interval.

    Uses the same resampling as `pair_metrics`, so for equal `n_boot`/`seed` the interval equals
    pair_metrics(...)["ci"]["acc1"] for the same round.
    """
    correct = _as_table(correct, 2, "correct")
    pa = correct.mean(axis=1)
    idx = bootstrap_indices(len(pa), n_boot, seed)
    return {"acc": float(pa.mean()), "ci": percentile_ci(pa[idx].mean(axis=1))}


def summarize(correct, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per-round accuracy and pair metrics for every consecutive round pair and for first -> last.

    `correct` has shape (n_items, n_samples, n_rounds); round 0 is the first answer, rounds 1.. are
    successive corrections.
    """
    correct = _as_table(correct, 3, "correct")
    n_items, n_samples, n_rounds = correct.shape
    per_round = [accuracy(correct[:, :, t], n_boot=n_boot, seed=seed) for t in range(n_rounds)]
    pairs = [
        {"from": t, "to": t + 1,
         **pair_metrics(correct[:, :, t], correct[:, :, t + 1], n_boot=n_boot, seed=seed)}
        for t in range(n_rounds - 1)
    ]
    first_last = (
        pair_metrics(correct[:, :, 0], correct[:, :, -1], n_boot=n_boot, seed=seed)
        if n_rounds > 1 else None
    )
    return {
        "n_items": int(n_items),
        "n_samples": int(n_samples),
        "n_rounds": int(n_rounds),
        "acc": [r["acc"] for r in per_round],
        "acc_ci": [r["ci"] for r in per_round],
        "pairs": pairs,
        "first_last": first_last,
    }


def _as_table(values, ndim: int, name: str) -> np.ndarray:
    """Validate a 0/1 correctness array of the expected rank and return it as bool."""
    arr = np.asarray(values)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got {arr.ndim}-D with shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no items (shape {arr.shape}); need at least one")
    if 0 in arr.shape:
        raise ValueError(f"{name} has an empty axis (shape {arr.shape})")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 or bool values")
    return arr.astype(bool)


def _item_quantities(a: np.ndarray, b: np.ndarray):
    """Per-item (pa, x, y) = (P(a), P(a)P(b|a), (1-P(a))P(b|not a)), with the 0 conventions."""
    a = a.astype(float)
    b = b.astype(float)
    n_right = a.sum(axis=1)
    n_wrong = (1.0 - a).sum(axis=1)
    kept = (a * b).sum(axis=1)
    fixed = ((1.0 - a) * b).sum(axis=1)
    p_b_given_a = np.divide(kept, n_right, out=np.zeros_like(kept), where=n_right > 0)
    p_b_given_not_a = np.divide(fixed, n_wrong, out=np.zeros_like(fixed), where=n_wrong > 0)
    pa = a.mean(axis=1)
    return pa, pa * p_b_given_a, (1.0 - pa) * p_b_given_not_a


def _ratio_metrics(pa: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    """All ratio metrics from per-item arrays of shape (n_replicates, n_items); NaN where undefined.

    The point estimate is the single replicate pa[None, :]; bootstrap replicates are rows of pa[idx].
    Keeping one code path guarantees the intervals describe exactly the reported statistics.
    """
    sum_pa = pa.sum(axis=1)
    sum_not_pa = (1.0 - pa).sum(axis=1)
    acc1 = pa.mean(axis=1)
    acc2 = (x + y).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cl = np.where(sum_pa > 0, x.sum(axis=1) / sum_pa, np.nan)
        cs = np.where(sum_not_pa > 0, y.sum(axis=1) / sum_not_pa, np.nan)
        spread = 2.0 * acc1 * (1.0 - acc1)
        rss = np.where(spread > 0, (acc2 - acc1**2) / spread, np.nan)
        denom = 1.0 - cl + cs  # NaN propagates when CL or CS is undefined
        acc_inf = np.where(denom != 0, cs / denom, np.nan)
    return {"acc1": acc1, "acc2": acc2, "cl": cl, "cs": cs, "rss": rss,
            "acc_inf": acc_inf, "delta": acc2 - acc1}


def bootstrap_indices(n_items: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_items) matrix of item indices; each row is one resample of items with replacement."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_items, size=(n_boot, n_items))


def percentile_ci(replicates: np.ndarray):
    """Percentile interval of the defined replicates, or None if no replicate is defined."""
    defined = replicates[np.isfinite(replicates)]
    if defined.size == 0:
        return None
    tail = 100.0 * (1.0 - CI_LEVEL) / 2.0
    lo, hi = np.percentile(defined, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def _scalar(value) -> float | None:
    """A numpy value as a Python float, with NaN (undefined) as None."""
    value = float(value)
    return None if np.isnan(value) else value
