import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from malaria_cells.evaluation import (
    _bootstrap, _weighted_auc, compute_metrics, format_report, threshold_for_sensitivity,
    wilson_interval,
)


def test_metrics_from_a_known_confusion_matrix():
    y_true = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    y_prob = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.1, 0.05, 0.4])
    m = compute_metrics(y_true, y_prob, threshold=0.5, resamples=200)
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 5, "fn": 1}
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(roc_auc_score(y_true, y_prob))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_prob >= 0.5))
    for name in ("accuracy", "sensitivity", "specificity", "precision", "f1", "mcc", "auc"):
        low, high = m["ci"][name]
        assert low <= m[name] <= high, name


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert np.isnan(wilson_interval(0, 0)).all()


def test_weighted_auc_equals_auc_of_the_resampled_cells():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.4 * y + rng.random(300) * 0.6, 0, 1), 2)  # rounded: many ties
    weights = rng.integers(0, 3, (5, 300)).astype(float)
    for row in weights:
        index = np.repeat(np.arange(300), row.astype(int))
        assert _weighted_auc(y, p, row[None])[0] == pytest.approx(roc_auc_score(y[index], p[index]))


def test_patient_bootstrap_is_wider_than_cell_bootstrap_when_patients_differ():
    rng = np.random.default_rng(1)
    groups = np.repeat([f"C{i}" for i in range(20)], 50)
    y = rng.integers(0, 2, 1000)
    noisy_patient = np.repeat(rng.random(20) < 0.3, 50)
    y_pred = np.where(noisy_patient, 1 - y, y)
    p = y_pred * 0.8 + 0.1
    by_cell = _bootstrap(y, p, y_pred, None, 500, 0)["f1"]
    by_patient = _bootstrap(y, p, y_pred, groups, 500, 0)["f1"]
    assert by_patient[1] - by_patient[0] > 2 * (by_cell[1] - by_cell[0])


def test_threshold_reaches_the_target_sensitivity():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = np.clip(0.35 * y + rng.random(2000) * 0.65, 0, 1)
    for target in (0.9, 0.98, 1.0):
        t = threshold_for_sensitivity(y, p, target)
        sensitivity = np.mean(p[y == 1] >= t)
        assert sensitivity >= target
        assert np.mean(p[y == 1] >= t) >= target
        positives_above = np.sort(p[(y == 1) & (p > t)])
        if len(positives_above) > 1:  # the next stricter threshold misses the target
            assert np.mean(p[y == 1] >= positives_above[1]) < target
        assert not np.any(p == t)  # never exactly on a cell's score


def test_per_patient_figures_and_report():
    y = np.array([1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.1, 0.2])
    m = compute_metrics(y, p, groups=["C1", "C1", "C2", "C2"], resamples=0)
    assert m["patients"] == [
        {"patient": "C1", "cells": 2, "true_parasitized": 0.5, "predicted_parasitized": 1.0, "errors": 1},
        {"patient": "C2", "cells": 2, "true_parasitized": 0.0, "predicted_parasitized": 0.0, "errors": 0},
    ]
    text = format_report(m)
    assert "sensitivity" in text and "C2" in text


def test_calibration_scores():
    y = np.array([0, 0, 1, 1])
    m = compute_metrics(y, np.array([0.0, 0.0, 1.0, 1.0]), resamples=0)
    assert m["brier"] == 0 and m["ece"] == 0
    m = compute_metrics(y, np.array([0.5, 0.5, 0.5, 0.5]), resamples=0)
    assert m["brier"] == pytest.approx(0.25) and m["ece"] == pytest.approx(0.0)


def test_specificity_floor_limits_a_threshold_dragged_down_by_odd_cells():
    from malaria_cells.evaluation import choose_threshold, threshold_for_specificity

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(900), np.zeros(1000)].astype(int)
    p = np.r_[rng.uniform(0.6, 1, 850), rng.uniform(0, 0.05, 50), rng.uniform(0, 0.5, 1000)]
    t = threshold_for_specificity(y, p, 0.9)
    assert np.mean(p[y == 0] < t) >= 0.9
    below = p[p < t].max()
    assert np.mean(p[y == 0] < below) < 0.9
    free = choose_threshold(y, p, 0.98)
    assert free["limited_by"] == "sensitivity" and free["specificity"] < 0.2
    guarded = choose_threshold(y, p, 0.98, min_specificity=0.9)
    assert guarded["limited_by"] == "specificity"
    assert guarded["specificity"] >= 0.9 and guarded["threshold"] == pytest.approx(t)


def test_bootstrap_intervals_do_not_depend_on_how_resamples_are_blocked(monkeypatch):
    from malaria_cells import evaluation

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 600)
    p = np.clip(0.3 * y + 0.7 * rng.random(600), 0, 1)
    groups = [f"C{i % 30}" for i in range(600)]
    results = []
    for cells in (10**9, 600 * 7, 1):  # all at once, blocks of 7 resamples, one at a time
        monkeypatch.setattr(evaluation, "_BOOTSTRAP_BLOCK_CELLS", cells)
        results.append([evaluation.compute_metrics(y, p, groups=g, resamples=50, seed=0) for g in (groups, None)])
    assert results[0] == results[1] == results[2]
    assert results[0][0]["ci"]["auc"][0] < results[0][0]["ci"]["auc"][1]


def test_binomial_tail_matches_the_exact_sum():
    from math import comb

    from malaria_cells.evaluation import binomial_tail

    for k, n, p in [(0, 10, 0.1), (1, 10, 0.1), (3, 10, 0.1), (10, 10, 0.3), (11, 10, 0.3), (7, 400, 0.005)]:
        exact = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert abs(binomial_tail(k, n, p) - exact) <= 1e-12 + 1e-9 * exact
    assert binomial_tail(5, 10, 0.0) == 0.0 and binomial_tail(5, 10, 1.0) == 1.0
