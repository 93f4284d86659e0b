"""Paired 95 % intervals for the difference between two methods measured on the same evaluation data.

Two methods evaluated on the same examples (images, evaluation windows, zero-shot items) differ per example;
the uncertainty of their difference comes from which examples were drawn, so it is estimated from the
per-example differences (paired), never from two separate standard errors:

* :func:`paired_bootstrap` — the percentile interval of the mean per-example difference over
  :data:`RESAMPLES` resamples of the examples (seeded with :data:`SEED`, so the same data give the same
  interval). Differences with few distinct values (0/1 outcomes give -1, 0, 1) are resampled through the
  multinomial counts of those values, the same distribution as drawing indices and O(resamples) work;
  others are drawn in chunks of indices.
* :func:`mcnemar_exact` — the exact two-sided McNemar test of paired 0/1 outcomes: under "the methods are
  equally accurate" each of the ``b + c`` discordant examples is won by either method with probability 1/2,
  so ``p = min(1, 2 · P[Binomial(b + c, 1/2) ≤ min(b, c)])``.
* :func:`accuracy_difference` (0/1 outcomes, in points), :func:`perplexity_ratio` (each window's mean
  per-token NLL: the interval of the mean difference, exponentiated into an interval of the perplexity
  ratio ``ppl_a / ppl_b``; windows are equally long, so the perplexity is ``exp`` of the windows' mean), and
  :func:`paired_bootstrap` itself for per-example means (metrics ending in :data:`MEAN_SUFFIXES`: an image's
  cross-entropy or its KL divergence from the full-precision model's prediction, in nats).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

RESAMPLES = 10_000
"""Bootstrap resamples per interval."""

SEED = 0
"""Seed of the bootstrap's generator (``numpy.random.default_rng``)."""

CONFIDENCE = 0.95
"""Coverage of every interval."""

MEAN_SUFFIXES = ("_nll", "_kl")
"""Metrics whose value is the mean of per-example real numbers (nats), compared by the paired difference of
means; lower is better."""

_DISTINCT_LIMIT = 16
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class PairedInterval:
    """An estimate of ``a − b`` (or of ``a / b`` for ratios) with its paired ``CONFIDENCE`` interval.

    ``p_value`` is the exact McNemar test's for 0/1 outcomes, else ``None``; ``significant`` says whether
    the interval excludes "no difference" (0, or 1 for a ratio) — for 0/1 outcomes also ``p < 0.05``.
    """

    estimate: float
    low: float
    high: float
    null: float = 0.0
    p_value: float | None = None

    @property
    def significant(self) -> bool:
        outside = not (self.low <= self.null <= self.high)
        return outside if self.p_value is None else outside and self.p_value < 1.0 - CONFIDENCE


def _as_pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"paired data must be two 1-D sequences of the same length >= 2, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired data must be finite")
    return x, y


def bootstrap_means(differences: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``resamples`` bootstrap means of ``differences`` [n] (float64 [resamples])."""
    rng = np.random.default_rng(seed)
    n = differences.size
    values, counts = np.unique(differences, return_counts=True)
    if values.size <= _DISTINCT_LIMIT:
        drawn = rng.multinomial(n, counts / n, size=resamples)
        return drawn @ values / n
    means = np.empty(resamples)
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        means[start:start + rows] = differences[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    return means


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES,
                     seed: int = SEED) -> PairedInterval:
    """Mean of ``a − b`` over the examples and its percentile bootstrap interval."""
    x, y = _as_pair(a, b)
    differences = x - y
    means = bootstrap_means(differences, resamples, seed)
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedInterval(float(differences.mean()), float(low), float(high))


def mcnemar_exact(a: Sequence[int], b: Sequence[int]) -> float:
    """Exact two-sided McNemar p-value of paired 0/1 outcomes ``a`` and ``b`` (1 when they never disagree)."""
    x, y = _as_pair(a, b)
    if not np.isin(x, (0, 1)).all() or not np.isin(y, (0, 1)).all():
        raise ValueError("McNemar's test needs 0/1 outcomes")
    only_a = int(((x == 1) & (y == 0)).sum())
    only_b = int(((x == 0) & (y == 1)).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def accuracy_difference(a: Sequence[int], b: Sequence[int], **bootstrap: int) -> PairedInterval:
    """``accuracy(a) − accuracy(b)`` in points from per-example 0/1 outcomes, with its paired bootstrap
    interval and the exact McNemar p-value."""
    interval = paired_bootstrap(a, b, **bootstrap)
    return PairedInterval(100 * interval.estimate, 100 * interval.low, 100 * interval.high,
                          p_value=mcnemar_exact(a, b))


def perplexity_ratio(nll_a: Sequence[float], nll_b: Sequence[float], **bootstrap: int) -> PairedInterval:
    """``ppl_a / ppl_b`` from each window's mean per-token NLL (nats) under both models, with the interval
    of ``exp(mean NLL difference)`` from a paired bootstrap over windows."""
    interval = paired_bootstrap(nll_a, nll_b, **bootstrap)
    return PairedInterval(math.exp(interval.estimate), math.exp(interval.low), math.exp(interval.high), null=1.0)


def outcome_string(outcomes: Iterable[object]) -> str:
    """0/1 (or boolean) outcomes as the ``"0110..."`` string run JSONs store (inverse of :func:`outcomes_of`)."""
    return "".join("1" if outcome else "0" for outcome in outcomes)


def outcomes_of(text: str) -> list[int]:
    """The 0/1 outcomes of a ``"0110..."`` string (how run JSONs store them)."""
    if set(text) - {"0", "1"}:
        raise ValueError("per-example outcomes must be a string of 0 and 1")
    return [int(char) for char in text]


def _outcomes(data: Sequence[float] | str) -> list[int]:
    return outcomes_of(data) if isinstance(data, str) else [int(value) for value in data]


def paired_interval(metric: str, a: Sequence[float] | str, b: Sequence[float] | str) -> PairedInterval:
    """The paired interval of two methods' per-example data of ``metric`` as run JSONs store it: a
    perplexity (``*_ppl``: per-window mean NLLs) gives :func:`perplexity_ratio`, anything else 0/1 outcomes
    (a ``"0110..."`` string or a sequence) and :func:`accuracy_difference`; a per-example mean
    (:data:`MEAN_SUFFIXES`) :func:`paired_bootstrap`."""
    if metric.endswith("_ppl"):
        return perplexity_ratio(a, b)
    if metric.endswith(MEAN_SUFFIXES):
        return paired_bootstrap(a, b)
    return accuracy_difference(_outcomes(a), _outcomes(b))


def reproduces(metric: str, data: Sequence[float] | str, value: float, rel: float = 1e-4) -> bool:
    """Whether per-example ``data`` give ``value`` (as the CSV prints it, 6 significant digits): the
    ``exp`` of the mean NLL for a perplexity, the mean for a per-example mean, the percentage of 1s for an
    accuracy."""
    try:
        if metric.endswith("_ppl"):
            values = np.asarray(data, dtype=np.float64)
            recomputed = math.exp(values.mean()) if values.size and values.mean() < 700 else math.inf
        elif metric.endswith(MEAN_SUFFIXES):
            values = np.asarray(data, dtype=np.float64)
            recomputed = float(values.mean()) if values.size else math.nan
        else:
            outcomes = _outcomes(data)
            recomputed = 100.0 * sum(outcomes) / len(outcomes) if outcomes else math.nan
    except (TypeError, ValueError):
        return False
    return math.isfinite(recomputed) and abs(recomputed - value) <= rel * max(abs(value), 1e-12)


def comparisons(per_example: Mapping[str, Mapping[str, object]], baseline: str
                ) -> dict[str, dict[str, PairedInterval]]:
    """``{metric: {method: interval of method vs baseline}}`` for every metric the baseline and another
    method both have per-example data of (``per_example``: ``{method: {metric: data}}``, one setting).

    A metric measured on fewer than two examples (``--eval_max_windows 1``) has no interval; a warning says so.
    """
    reference = per_example.get(baseline, {})
    found: dict[str, dict[str, PairedInterval]] = {}
    for method, metrics in per_example.items():
        if method == baseline:
            continue
        for metric, data in metrics.items():
            if metric not in reference:
                continue
            examples = min(len(data), len(reference[metric]))
            if examples < 2:
                logger.warning("no interval of %s for %s against %s: it needs two examples, got %d", metric,
                               method, baseline, examples)
            else:
                found.setdefault(metric, {})[method] = paired_interval(metric, data, reference[metric])
    return found
