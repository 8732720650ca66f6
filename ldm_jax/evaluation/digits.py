"""A small digit classifier trained by the project, to evaluate class-conditional digit samples:
does a sample of class k look like a k (accuracy), and how far are the samples' classifier
features from real digits' (a Frechet distance on these features, reported next to the same
distance between two real splits as its floor). It is not FID: no Inception network is
involved, and the numbers compare only with each other."""
from __future__ import annotations

import logging
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.evaluation.metrics import frechet_distance, gaussian_stats

logger = logging.getLogger("ldm_jax")


class DigitClassifier(nn.Module):
  """Inputs average-pooled to half size (digits need no more), two conv blocks, a 64-unit
  feature layer; the features feed the Frechet distance."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    for width in (32, 64):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    features = nn.relu(nn.Dense(64, name="features")(x))
    return nn.Dense(self.num_classes, name="logits")(features), features


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 500,
                     batch_size: int = 64, seed: int = 0, num_classes: int = 10):
  """Trains on float images in [-1, 1] (N, H, W, C) with random +-2 pixel shifts; returns
  variables."""
  model = DigitClassifier(num_classes)
  rng = np.random.default_rng(seed)
  variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(images[:1]))
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))
  opt_state = tx.init(variables["params"])

  @jax.jit
  def step(params, opt_state, x, y, key):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x, True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = variables["params"]
  for i in range(steps):
    idx = rng.integers(0, len(images), batch_size)
    shifted = np.stack([np.roll(img, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
                        for img in images[idx]])
    params, opt_state, loss = step(params, opt_state, jnp.asarray(shifted),
                                   jnp.asarray(labels[idx]), jax.random.PRNGKey(i))
    if (i + 1) % 200 == 0:
      logger.info("digit classifier: step %d/%d, loss %.4f", i + 1, steps, float(loss))
  return {"params": params}


def classify(variables, images: np.ndarray, batch_size: int = 500, num_classes: int = 10):
  """(predicted labels, 64-d features) of images in [-1, 1]."""
  model = DigitClassifier(num_classes)
  apply = jax.jit(lambda v, x: model.apply(v, x))
  preds, feats = [], []
  for start in range(0, len(images), batch_size):
    logits, f = apply(variables, jnp.asarray(images[start:start + batch_size]))
    preds.append(np.asarray(jnp.argmax(logits, -1)))
    feats.append(np.asarray(f))
  return np.concatenate(preds), np.concatenate(feats)


def save_classifier(variables, path: str):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(flax.serialization.to_bytes(variables))


def load_classifier(path: str, image_shape, num_classes: int = 10):
  template = DigitClassifier(num_classes).init(jax.random.PRNGKey(0),
                                               jnp.zeros((1,) + tuple(image_shape)))
  with open(path, "rb") as f:
    return flax.serialization.from_bytes(template, f.read())


def frechet_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
  return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def evaluate_samples(variables, samples, sample_labels, reference, floor_images):
  """Accuracy of the classifier on class-conditional samples (does a k look like a k?), the
  Frechet distance of the samples' features to `reference` real digits, and the same distance
  between two real splits (`floor_images` vs `reference`) as its floor."""
  preds, feats = classify(variables, samples)
  _, ref_feats = classify(variables, reference)
  _, floor_feats = classify(variables, floor_images)
  return {"sample_accuracy": float(np.mean(preds == np.asarray(sample_labels))),
          "frechet_samples_vs_real": frechet_between(feats, ref_feats),
          "frechet_real_vs_real": frechet_between(floor_feats, ref_feats),
          "num_samples": int(len(samples))}
