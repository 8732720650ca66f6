"""Optimizers and learning-rate schedules from `config.train`."""
from __future__ import annotations

import optax

from ldm_jax.errors import ConfigError


def peak_lr(train_config, lr: float | None = None) -> float:
  """The learning rate after warm-up: lr, or lr x global batch with `scale_lr` (the reference)."""
  t = train_config
  lr = t.lr if lr is None or lr < 0 else lr
  return lr * t.batch_size if t.scale_lr else lr


def schedule(train_config, lr: float | None = None) -> optax.Schedule:
  """Linear warm-up to the peak rate, then constant, cosine or linear decay to min_lr_ratio."""
  t = train_config
  peak = peak_lr(t, lr)
  warmup = int(t.warmup_steps)
  decay_steps = max(1, int(t.num_steps) - warmup)
  if t.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif t.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.min_lr_ratio)
  elif t.schedule == "linear":
    after = optax.linear_schedule(peak, peak * t.min_lr_ratio, decay_steps)
  else:
    raise ConfigError(f"train.schedule: unknown schedule '{t.schedule}'")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def optimizer(train_config, lr: float | None = None, b1: float | None = None,
              b2: float | None = None) -> optax.GradientTransformation:
  """Clipping (optional) followed by Adam/AdamW on the configured schedule."""
  t = train_config
  sched = schedule(t, lr)
  b1 = t.b1 if b1 is None else b1
  b2 = t.b2 if b2 is None else b2
  if t.optimizer == "adam":
    opt = optax.adam(sched, b1=b1, b2=b2, eps=t.eps)
  elif t.optimizer == "adamw":
    opt = optax.adamw(sched, b1=b1, b2=b2, eps=t.eps, weight_decay=t.weight_decay)
  else:
    raise ConfigError(f"train.optimizer: unknown optimizer '{t.optimizer}'")
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt
