"""Paired intervals (common.results.intervals) against their definitions: a naive float64 bootstrap, exact
McNemar p-values computed by hand, and the coverage of a known difference over many seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.results.intervals import (
    CONFIDENCE,
    accuracy_difference,
    bootstrap_means,
    comparisons,
    mcnemar_exact,
    outcome_string,
    outcomes_of,
    paired_bootstrap,
    paired_interval,
    perplexity_ratio,
    reproduces,
)


def _naive_bootstrap_means(differences: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The definition, one resample at a time: draw n indices with replacement, average."""
    rng = np.random.default_rng(seed)
    n = differences.size
    return np.array([np.mean(differences[rng.integers(0, n, size=n)]) for _ in range(resamples)])


def test_index_bootstrap_is_the_naive_definition() -> None:
    differences = np.random.default_rng(1).normal(0.3, 1.0, size=300)
    np.testing.assert_allclose(bootstrap_means(differences, 3000, seed=7),
                               _naive_bootstrap_means(differences, 3000, seed=7), rtol=0, atol=1e-12)


def test_counting_bootstrap_of_few_values_has_the_naive_distribution() -> None:
    # -1/0/1 differences go through multinomial counts: other draws, the same distribution
    rng = np.random.default_rng(2)
    differences = rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.75, 0.15], size=2000)
    fast = bootstrap_means(differences, 20000, seed=3)
    naive = _naive_bootstrap_means(differences, 20000, seed=4)
    for q in (0.025, 0.5, 0.975):
        assert abs(np.quantile(fast, q) - np.quantile(naive, q)) < 1.5e-3  # bootstrap sd of the mean ≈ 1e-2
    assert abs(fast.std() - naive.std()) < 3e-4


@pytest.mark.parametrize(("only_a", "only_b", "p"), [
    (3, 0, 2 / 8),
    (5, 1, 2 * (1 + 6) / 64),
    (10, 0, 2 / 1024),
    (4, 4, 1.0),
    (0, 0, 1.0),
    (7, 9, min(1.0, 2 * sum(math.comb(16, k) for k in range(8)) / 2**16)),
])
def test_mcnemar_matches_hand_computation(only_a: int, only_b: int, p: float) -> None:
    both, neither = 20, 5
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    assert mcnemar_exact(a, b) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact(b, a) == pytest.approx(p, rel=1e-12)


def test_accuracy_difference_in_points_with_mcnemar() -> None:
    a = [1] * 60 + [0] * 40
    b = [1] * 50 + [0] * 50
    interval = accuracy_difference(a, b)
    assert interval.estimate == pytest.approx(10.0)
    assert interval.low < 10.0 < interval.high
    assert interval.p_value == pytest.approx(2 / 1024)
    assert interval.significant


def test_perplexity_ratio_of_a_constant_shift_is_exact() -> None:
    nll_b = np.random.default_rng(5).uniform(2.5, 3.5, size=40)
    interval = perplexity_ratio(nll_b - 0.1, nll_b)
    for value in (interval.estimate, interval.low, interval.high):
        assert value == pytest.approx(math.exp(-0.1), rel=1e-12)
    assert interval.significant and interval.null == 1.0


@pytest.mark.parametrize("binary", [False, True])
def test_coverage_of_a_known_difference(binary: bool) -> None:
    """Over 400 seeds, the 95 % interval holds the true difference 91–98 % of the time (±3.5 σ)."""
    truth, hits, trials = 0.05 if binary else 0.3, 0, 400
    for seed in range(trials):
        rng = np.random.default_rng(1000 + seed)
        if binary:  # paired outcomes: b right w.p. 0.7; a gets 27 % of b's errors right and 5 % of its hits wrong
            b = (rng.random(400) < 0.7).astype(float)
            flip = rng.random(400)
            a = np.where(b == 0, flip < 0.1 + truth / 0.3, flip >= 0.05).astype(float)
            true_difference = 0.3 * (0.1 + truth / 0.3) - 0.7 * 0.05
        else:
            b = rng.normal(0.0, 1.0, size=200)
            a = b + rng.normal(truth, 1.0, size=200)
            true_difference = truth
        interval = paired_bootstrap(a, b, resamples=2000, seed=seed)
        hits += interval.low <= true_difference <= interval.high
    coverage = hits / trials
    assert 0.91 <= coverage <= 0.98, coverage
    assert CONFIDENCE == 0.95


def test_comparisons_pair_each_method_with_the_baseline() -> None:
    per_example = {
        "gptq": {"top1": "1100110011", "wiki_ppl": [3.0, 3.1, 2.9]},
        "gptaq": {"top1": "1110110011", "wiki_ppl": [2.9, 3.0, 2.8]},
        "fp": {"top1": "1111111111"},
    }
    found = comparisons(per_example, "gptq")
    assert set(found) == {"top1", "wiki_ppl"}
    assert set(found["top1"]) == {"gptaq", "fp"} and set(found["wiki_ppl"]) == {"gptaq"}
    assert found["top1"]["gptaq"].estimate == pytest.approx(10.0)
    assert not found["top1"]["gptaq"].significant  # one image of ten
    assert found["wiki_ppl"]["gptaq"].estimate == pytest.approx(math.exp(-0.1))


def test_a_single_example_gets_no_interval_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    per_example = {"gptq": {"wiki_ppl": [3.0], "top1": "10"}, "gptaq": {"wiki_ppl": [2.9], "top1": "11"}}
    found = comparisons(per_example, "gptq")
    assert set(found) == {"top1"}
    assert "no interval of wiki_ppl for gptaq against gptq: it needs two examples, got 1" in caplog.text


@pytest.mark.parametrize(("a", "b", "message"), [
    ([1.0], [1.0], "length >= 2"),
    ([1.0, 2.0], [1.0], "same length"),
    ([1.0, math.nan], [1.0, 2.0], "finite"),
])
def test_bad_paired_data_is_refused(a, b, message) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b)


def test_mcnemar_refuses_non_binary_outcomes() -> None:
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0, 2], [1, 0])


def test_outcome_strings_round_trip() -> None:
    outcomes = [1, 0, 0, 1, True, False]
    assert outcome_string(outcomes) == "100110"
    assert outcomes_of(outcome_string(outcomes)) == [1, 0, 0, 1, 1, 0]


def test_per_example_means_compare_by_their_paired_difference() -> None:
    rng = np.random.default_rng(3)
    base = rng.exponential(0.5, size=400)
    shifted = base + 0.1 + rng.normal(0.0, 0.01, size=400)
    for metric in ("test_nll", "fp_kl"):
        interval = paired_interval(metric, list(shifted), list(base))
        assert interval.estimate == pytest.approx(float((shifted - base).mean()), rel=1e-12)
        assert interval.low < interval.estimate < interval.high and interval.low > 0.09 and interval.significant
        assert interval.p_value is None and interval.null == 0.0
        assert reproduces(metric, list(shifted), float(f"{shifted.mean():.6g}"))
        assert not reproduces(metric, list(shifted), float(shifted.mean()) * 1.01)
