"""fastvae.metrics against independent implementations (scipy, sklearn, torch.distributions)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import roc_auc_score

from fastvae.app import metrics
from fastvae.app.data import load_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_matches_the_scipy_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(loc=0.5, size=(300, 5)) @ rng.normal(size=(5, 5))
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-7)


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.integers(0, 6, 200), rng.integers(2, 9, 150)  # many ties
    expected = roc_auc_score(np.r_[np.zeros(200), np.ones(150)], np.r_[s_in, s_out])
    assert metrics.auroc(s_in, s_out) == pytest.approx(expected, rel=1e-12)
    assert metrics.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert metrics.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0


def test_class_coverage():
    one_class = np.tile(np.eye(10)[3], (50, 1))
    uniform = np.tile(np.eye(10), (5, 1))
    two_classes = np.eye(10)[[1, 7] * 20]
    assert metrics.class_coverage(one_class) == 0
    assert metrics.class_coverage(uniform) == pytest.approx(1)
    assert metrics.class_coverage(two_classes) == pytest.approx(np.log(2) / np.log(10))


def test_gaussian_kl_to_prior_matches_torch_distributions():
    rng = np.random.default_rng(2)
    z = rng.normal(loc=[1.0, -2.0, 0.5], scale=[0.5, 2.0, 1.0], size=(500, 3))
    mean, cov = torch.tensor(z.mean(0)), torch.tensor(np.cov(z, rowvar=False))
    fitted = torch.distributions.MultivariateNormal(mean, cov)
    prior = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64),
                                                   torch.eye(3, dtype=torch.float64))
    expected = torch.distributions.kl_divergence(fitted, prior).item()
    assert metrics.gaussian_kl_to_prior(z) == pytest.approx(expected, rel=1e-9)


def test_judge_classifies_test_digits():
    data = load_data("digits")
    judge = metrics.train_classifier(data.train, data.train_labels, epochs=15)
    accuracy = (judge.probs(data.test).argmax(1) == data.test_labels).float().mean().item()
    assert accuracy > 0.9
    assert judge.features(data.test[:4]).shape == (4, 64)
