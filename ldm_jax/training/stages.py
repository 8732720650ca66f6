"""What the shared training loop needs from a stage, and the gradient accumulation and optimiser
step skeleton all stages share."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ldm_jax.training.state import ema_decay_at, ema_update


class Stage:
  """A trainable stage. The loop jits these methods with explicit shardings:

    init(rng, batch) -> TrainState
    train_step(state, batch, frozen) -> (state, metrics)       (state donated)
    eval_step(state, batch, frozen) -> metrics
    summaries(state, batch, frozen) -> {name: images (N, H, W, C) in [-1, 1]}
    generate(state, batch, frozen) -> (the batch's images, generated ones), in [-1, 1]
                                     (reconstructions or samples: for (r)FID)

  `frozen` holds arrays the stage uses but never trains or checkpoints (LPIPS weights, the
  frozen autoencoder of stage 2); it is passed as an argument rather than closed over so it is
  not baked into the compiled program as a constant.
  """
  name = "stage"

  def __init__(self, config, mesh, workdir: str | None = None, facts: dict | None = None):
    """`facts`: what the checkpoint being resumed recorded about the model (see describe)."""
    self.config = config
    self.mesh = mesh
    self.workdir = workdir
    self.facts = dict(facts or {})
    self.frozen: Any = {}

  def example_fn(self, train: bool):
    raise NotImplementedError

  def adapt_source(self, source, train: bool):
    """Sees the opened data source before init (class count, caches); returns the source to
    iterate."""
    del train
    return source

  def describe(self) -> dict:
    """What the model is beyond its config (class count, tokenizer, first stage...): saved in
    every checkpoint and handed back as `facts` on resume."""
    return {}

  def pretrained(self, abstract_params):
    """Host weights that replace a fresh init's parameters (and EMA), e.g. a model to fine-
    tune; None keeps the random init. Loaded outside jit, so they are never compile-time
    constants."""
    del abstract_params
    return None

  def prepare(self, state, batch, frozen):
    """A one-off transformation of a freshly initialised state (e.g. scale_by_std)."""
    return state

  def inference_params(self, state) -> dict:
    """The parameters an inference export keeps (EMA weights when there are any)."""
    raise NotImplementedError


def split_microbatches(batch, k: int):
  """(B, ...) -> (k, B // k, ...), where micro-batch j takes examples j, j + k, j + 2k, ...

  Taking every k-th example keeps each micro-batch spread evenly over all devices (with the batch
  sharded in contiguous blocks), so the split needs no communication.
  """
  def one(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(one, batch)


def accumulate_gradients(grad_fn: Callable, params, model_state, batch, rng, k: int):
  """Averages grad_fn's gradients and metrics over k micro-batches (lax.scan when k > 1).

  grad_fn(params, model_state, microbatch, rng) -> (grads, model_state, metrics); model_state
  (batch statistics, codebook statistics) is threaded through the micro-batches in order.
  """
  if k == 1:
    return grad_fn(params, model_state, batch, rng)
  micro = split_microbatches(batch, k)

  def body(carry, xs):
    grads_sum, state, metrics_sum = carry
    mb, i = xs
    grads, state, metrics = grad_fn(params, state, mb, jax.random.fold_in(rng, i))
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
    return (add(grads_sum, grads), state, add(metrics_sum, metrics)), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, params, model_state, first, rng)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[2]))
  (grads, model_state, metrics), _ = jax.lax.scan(
      body, (zeros[0], model_state, zeros[1]), (micro, jnp.arange(k)))
  scale = lambda t: jax.tree_util.tree_map(lambda x: x / k, t)  # noqa: E731
  return scale(grads), model_state, scale(metrics)


def all_finite(tree) -> jax.Array:
  """1.0 when every floating-point element of `tree` is finite, else 0.0 (a float32 scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.float32(1.0)


def apply_step(state, batch, *, grad_fn: Callable, tx, train_config,
               ema_of: Callable = lambda params: params, post_update: Callable | None = None,
               grad_norm_of: Callable = lambda grads: grads):
  """One training step of any stage: accumulate -> optimiser update -> EMA -> step + 1.

  grad_fn is accumulate_gradients' (over train_config.grad_accum micro-batches, with the
  step's rng). post_update(params, model_state) -> params runs right after the update (e.g. VQ
  codebook restarts); the EMA, when state.ema_params is not None, tracks ema_of(params) (the
  exported part); metrics['grad_norm'] is the global norm of grad_norm_of(grads).
  Returns (new state, metrics).
  """
  t = train_config
  grads, model_state, metrics = accumulate_gradients(
      grad_fn, state.params, state.model_state, batch, state.step_rng(), t.grad_accum)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if post_update is not None:
    params = post_update(params, model_state)
  ema = state.ema_params
  if ema is not None:
    ema = ema_update(ema, ema_of(params), ema_decay_at(state.step, t.ema_decay, t.ema_warmup))
  metrics["grad_norm"] = optax.global_norm(grad_norm_of(grads))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema, model_state=model_state)
  return new_state, metrics
