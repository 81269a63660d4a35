"""mgff.stats: paired and pooled paired bootstrap intervals on constructed per-image results with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from mgff.stats import paired_bootstrap, pooled_paired_bootstrap


def results(n: int, better: int, worse: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(correct_a, correct_b)`` over ``n`` images: B alone right on ``better`` images, A alone right on ``worse``
    (placed from ``offset`` on, cyclically), both right on the rest: per-image difference +1, -1 or 0."""
    a, b = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    positions = (offset + np.arange(better + worse)) % n
    a[positions[:better]] = False
    b[positions[better:]] = False
    return a, b


def test_paired_bootstrap_known_answers():
    assert paired_bootstrap(np.zeros(50, bool), np.ones(50, bool)) == (1.0, 1.0, 1.0)  # every resample: +1
    assert paired_bootstrap(np.ones(9), np.ones(9)) == (0.0, 0.0, 0.0)
    # two images, differences +1 and 0: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4
    assert paired_bootstrap(np.array([0, 1]), np.array([1, 1])) == (0.5, 0.0, 1.0)
    # 2000 images, +1 on 400, -1 on 200: mean 0.1, per-image sd sqrt(0.3 - 0.01), 95 % ~ mean +- 1.96 sd / sqrt(N)
    diff, low, high = paired_bootstrap(*results(2000, 400, 200))
    half_width = 1.96 * np.sqrt(0.29 / 2000)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1 - half_width, abs=0.002) and high == pytest.approx(0.1 + half_width, abs=0.002)


def test_paired_bootstrap_gives_the_numbers_of_the_benchmark_runner():
    """The same draws as benchmarks/real_photos.paired_bootstrap had (one integers((samples, N)) draw of
    default_rng(seed)), numbers pinned from it: B - A and the interval in accuracy units."""
    a = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1] * 7, dtype=bool)
    b = np.array([1, 1, 1, 0, 1, 0, 1, 1, 1, 1] * 7, dtype=bool)
    assert paired_bootstrap(a, b) == (0.2, 0.05714285714285714, 0.34285714285714286)
    diff, low, high = paired_bootstrap(b, a)  # A and B swapped: the difference and the interval flip
    assert (diff, low, high) == pytest.approx((-0.2, -0.34285714285714286, -0.05714285714285714))


def test_pooled_paired_bootstrap_averages_the_seeds_differences_per_resample():
    one_seed = results(300, 40, 10)
    assert pooled_paired_bootstrap([one_seed]) == paired_bootstrap(*one_seed)  # one pair: the same numbers
    assert pooled_paired_bootstrap([one_seed, one_seed], samples=500, seed=4) == paired_bootstrap(*one_seed, samples=500, seed=4)
    # seed 0: B better on every image, seed 1: A better on every image -> the seeds cancel on every resample
    assert pooled_paired_bootstrap([results(20, 20, 0), results(20, 0, 20)]) == (0.0, 0.0, 0.0)
    # three seeds, each +1 on 400 and -1 on 200 of 2000 images, on different images: per resample the mean over
    # seeds of the accuracy differences is the resampled mean of the per-image difference averaged over seeds
    pairs = [results(2000, 400, 200, offset=700 * s) for s in range(3)]
    averaged = np.mean([b.astype(float) - a.astype(float) for a, b in pairs], axis=0)
    diff, low, high = pooled_paired_bootstrap(pairs)
    half_width = 1.96 * averaged.std() / np.sqrt(2000)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1 - half_width, abs=0.002) and high == pytest.approx(0.1 + half_width, abs=0.002)
    assert high - low < paired_bootstrap(*pairs[0])[2] - paired_bootstrap(*pairs[0])[1]  # pooling seeds narrows it


def test_bootstrap_refuses_results_on_different_images():
    with pytest.raises(ValueError, match=r"different images: correct_a has shape \(10,\) vs correct_b \(9,\)$"):
        paired_bootstrap(np.ones(10), np.ones(9))
    with pytest.raises(ValueError, match=r"same test images.*pair 1 has shape \(9,\), pair 0 \(10,\)"):
        pooled_paired_bootstrap([(np.ones(10), np.ones(10)), (np.ones(9), np.ones(9))])
    with pytest.raises(ValueError, match=r"at least one"):
        pooled_paired_bootstrap([])
