"""FID, KID, IS and precision/recall against independent computations and known answers."""
import numpy as np
import pytest
import scipy.linalg

from ldm_jax.evaluation import metrics


def _scipy_fid(mu1, s1, mu2, s2):
  """The standard formula with scipy's sqrtm of the (non-symmetric) product, real part."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2.0 * np.trace(np.real(covmean)))


def test_frechet_distance_known_answer_and_scipy():
  rng = np.random.default_rng(0)
  # Diagonal covariances: sum (mu diff)^2 + sum (a + b - 2 sqrt(ab)).
  a, b = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want,
                                                                                       rel=1e-10)
  # Full-rank and nearly singular (fewer samples than dimensions) covariances.
  for n in (400, 40):
    x, y = rng.normal(size=(n, 64)), rng.normal(size=(n, 64)) * 1.3 + 0.2
    (m1, c1), (m2, c2) = metrics.gaussian_stats(x), metrics.gaussian_stats(y)
    assert metrics.frechet_distance(m1, c1, m2, c2) == pytest.approx(
        _scipy_fid(m1, c1, m2, c2), rel=1e-6)


def _kid_direct(x, y):
  """Unbiased MMD^2, cubic kernel, written element by element."""
  d, m = x.shape[1], len(x)
  k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_equals_the_direct_sum_and_vanishes_for_one_distribution():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 0.5
  mean, std = metrics.kid(x, y, subsets=1, subset_size=30)
  assert mean == pytest.approx(_kid_direct(x, y), rel=1e-10) and std == 0.0
  same = metrics.kid(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)), subsets=20,
                     subset_size=500)
  shifted = metrics.kid(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)) + 0.5,
                        subsets=20, subset_size=500)
  assert abs(same[0]) < 3 * same[1] + 1e-3 and shifted[0] > 10 * abs(same[0])


def test_inception_score_known_answers():
  classes = 10
  confident = np.full((1000, classes), -30.0)
  confident[np.arange(1000), np.arange(1000) % classes] = 30.0   # one-hot, classes balanced
  assert metrics.inception_score(confident)[0] == pytest.approx(classes, rel=1e-6)
  assert metrics.inception_score(np.zeros((1000, classes)))[0] == pytest.approx(1.0)
  # Against a direct computation on random logits, one split.
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(50, 7))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = np.exp(np.mean([np.sum(p[i] * np.log(p[i] / p.mean(0))) for i in range(50)]))
  assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(want, rel=1e-10)


def test_precision_recall_on_toy_manifolds():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(300, 4))
  b = rng.normal(size=(300, 4)) + 50.0            # a second, far cluster
  assert metrics.precision_recall(a, a.copy()) == (1.0, 1.0)
  assert metrics.precision_recall(a, b) == (0.0, 0.0)
  real = np.concatenate([a, b])
  fake = rng.normal(size=(300, 4))                  # covers only the first cluster
  precision, recall = metrics.precision_recall(real, fake)
  assert precision > 0.9 and 0.45 < recall < 0.55   # k-NN balls miss a few tail points
