"""What the demo measures: a judge classifier and the statistics built on it.

- ``train_classifier``: a small MLP trained on real training digits; its
  penultimate layer gives the features for the Fréchet distance, its softmax
  the class probabilities for sample confidence and coverage.
- ``frechet_distance``: ||m1 - m2||² + Tr(S1 + S2 - 2 (S1 S2)^½) between the
  Gaussians fitted to two feature sets (the FID formula, with our classifier's
  features instead of Inception's).
- ``auroc``: the probability that an out-of-distribution input scores higher
  than an in-distribution one (ties count ½): the area under the ROC curve.
- ``class_coverage``: entropy of the predicted-class histogram / log(classes),
  1 when every class is generated equally often, 0 when only one is.
- ``gaussian_kl_to_prior``: KL(N(m, S) || N(0, I)) for the Gaussian fitted to codes.
"""

import numpy as np
import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, input_dim, n_classes, hidden=128, feature_dim=64):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(input_dim, hidden), nn.ReLU(),
                                      nn.Linear(hidden, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x):
        return self.head(self.features(x))

    @torch.no_grad()
    def probs(self, x):
        return torch.softmax(self(x), dim=1)


def train_classifier(x, y, *, epochs=60, batch_size=64, lr=2e-3, seed=0):
    """Train the judge on images ``x`` (N, ...) with integer labels ``y``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier(x[0].numel(), int(y.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _sqrt_psd(matrix):
    vals, vecs = np.linalg.eigh(matrix)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two (N, d) feature arrays."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr (S_a S_b)^½ = Tr (S_a^½ S_b S_a^½)^½, whose argument is symmetric PSD
    root_a = _sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def auroc(scores_in, scores_out):
    """P(score_out > score_in) + ½ P(equal), over all pairs (Mann–Whitney U / n_in n_out)."""
    s_in, s_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    sorted_in = np.sort(s_in)
    below = np.searchsorted(sorted_in, s_out, side="left")
    not_above = np.searchsorted(sorted_in, s_out, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(s_in) * len(s_out)))


def class_coverage(probs):
    """Normalised entropy of the histogram of predicted classes, in [0, 1]."""
    probs = np.asarray(probs)
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(probs.shape[1]))


def gaussian_kl_to_prior(codes):
    """KL(N(m, S) || N(0, I)) = ½ (tr S + m·m - d - log det S), with m, S fitted to ``codes``."""
    z = np.asarray(codes, np.float64)
    mean, cov = z.mean(0), np.atleast_2d(np.cov(z, rowvar=False))
    _, logdet = np.linalg.slogdet(cov)
    return float(0.5 * (np.trace(cov) + mean @ mean - z.shape[1] - logdet))
