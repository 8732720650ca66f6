"""Stage 2: trains the UNet and the conditioning encoder of a LatentDiffusion on a frozen
autoencoder.

The model itself (conditioning routes, loss, sampling) is ldm_jax/ldm.py; this file holds what
training adds: building it for a run, the data it reads, init, the jitted step, evaluation and
image summaries. The autoencoder's variables ride in `frozen`: never in the optimizer, never in
the checkpoint, never changed.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import conditions
from ldm_jax.errors import ConfigError
from ldm_jax.data.latent_cache import build_latent_cache
from ldm_jax.data.pipeline import default_workers
from ldm_jax.data.text import tokenizer_for
from ldm_jax.first_stage import load_first_stage
from ldm_jax.ldm import LatentDiffusion
from ldm_jax.models.build import dtype_of
from ldm_jax.parallel.mesh import batch_sharding
from ldm_jax.training import optim
from ldm_jax.training.stages import Stage, apply_step
from ldm_jax.training.state import TrainState

logger = logging.getLogger("ldm_jax")


class LatentDiffusionStage(Stage):
  """Trains a LatentDiffusion's {'unet', 'cond'} parameters on latents of the frozen first stage.

  `facts` (what a checkpoint recorded about the model, see LatentDiffusion.describe) pins the
  first-stage step and the class count of a resumed run.
  """
  name = "ldm"

  def __init__(self, config, mesh, workdir: str | None = None, facts: dict | None = None):
    super().__init__(config, mesh, workdir, facts)
    c = config
    pinned = (self.facts.get("first_stage") or {}).get("step")
    self.first = load_first_stage(c.first_stage.checkpoint, c.first_stage.use_ema,
                                  dtype_of(c.train.compute_dtype), step=pinned)
    logger.info("first stage: %s (%s, f=%d, %d latent channels)", self.first.source,
                self.first.config.model.type, self.first.downsample_factor,
                self.first.latent_channels)
    self.frozen = {"autoencoder": self.first.variables}
    self.clip_fields = None
    if c.cond.get("text_encoder", "transformer") == "clip":   # Stable Diffusion's, frozen
      from ldm_jax.interop.stable_diffusion import load_text_encoder  # pylint: disable=g-import-not-at-top
      self.clip_fields, clip_vars = load_text_encoder(c.cond.clip_weights, c.cond.clip_layer)
      self.frozen["text_encoder"] = clip_vars["params"]
      logger.info("text encoder: frozen CLIP from %s (%d layers, %d heads, width %d)",
                  c.cond.clip_weights, self.clip_fields["layers"], self.clip_fields["heads"],
                  self.clip_fields["width"])
    self.latent_size = c.data.image_size // self.first.downsample_factor
    self.tokenizer = None
    self.ldm: LatentDiffusion | None = None   # built once the class count is known
    self.tx = optim.optimizer(c.train)

  # -- construction and data -------------------------------------------------------------------
  def adapt_source(self, source, train: bool):
    """Builds the model once the training data's class count is known; swaps in the latent
    cache if asked."""
    if not train:
      return source
    c = self.config
    if self.ldm is None:
      self.tokenizer = tokenizer_for(c.cond, self.workdir, lambda: (
          source.caption(i) for i in range(min(len(source), 200_000))))
      classes = self.facts.get("num_classes")   # what a resumed checkpoint recorded
      if classes is None:
        labelled = conditions.needs_labels(c.cond)
        classes = c.cond.num_classes or (source.num_classes if labelled else 0)
      self.ldm = LatentDiffusion(c, self.first, num_classes=classes, tokenizer=self.tokenizer,
                                 activation_sharding=batch_sharding(self.mesh),
                                 clip_fields=self.clip_fields)
    if not c.first_stage.precompute_latents:
      return source
    conditions.check_cacheable(c.cond)
    return self._latent_cache(source)

  def _latent_cache(self, source):
    c = self.config
    directory = c.first_stage.latent_cache or os.path.join(self.workdir, "latents")
    fingerprint = {"first_stage": self.first.source, "data": source.description,
                   "image_size": c.data.image_size, "resize_mode": c.data.resize_mode,
                   "conditions": conditions.cached_conditions(c.cond),
                   "latent_dtype": c.first_stage.latent_dtype,
                   "latent_shard_size": c.first_stage.latent_shard_size}
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    variables = jax.device_put(self.first.variables, replicated)
    encode = jax.jit(self.first.moments, in_shardings=(replicated, batch), out_shardings=batch)
    logger.info("latent cache: %s", directory)
    context_fn = None
    if conditions.caches_context(c.cond):   # the frozen CLIP's contexts, stored per example
      clip_params = jax.device_put(self.frozen["text_encoder"], replicated)
      clip = jax.jit(lambda v, t: self.ldm.cond.clip.apply({"params": v}, t),
                     in_shardings=(replicated, batch), out_shardings=batch)
      context_fn = lambda t: clip(clip_params, t)  # noqa: E731
    return build_latent_cache(
        directory, source, conditions.cache_example_fn(c, latent_size=self.latent_size,
                                                       tokenizer=self.tokenizer),
        lambda x: encode(variables, x), fingerprint=fingerprint, context_fn=context_fn,
        global_batch=c.train.batch_size, batch_sharding=batch,
        num_classes=self.ldm.num_classes, shard_size=c.first_stage.latent_shard_size,
        dtype=c.first_stage.latent_dtype, prefetch=c.data.prefetch,
        on_bad_image=c.data.on_bad_image,
        workers=default_workers() if c.data.workers < 0 else c.data.workers)

  def example_fn(self, train: bool):
    return conditions.route_example_fn(self.config, train=train, latent_size=self.latent_size,
                                       tokenizer=self.tokenizer)

  def describe(self) -> dict:
    return self.ldm.describe() if self.ldm is not None else {}

  # -- state -----------------------------------------------------------------------------------
  def init(self, rng, batch) -> TrainState:
    params = self.ldm.init_params(jax.random.fold_in(rng, 0), batch)
    ema = params if self.config.train.ema_decay > 0 else None
    scale = jnp.asarray(self.config.diffusion.scale_factor, jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), ema_params=ema,
                      model_state={"scale_factor": scale}, rng=rng)

  def pretrained(self, abstract_params):
    """unet.init_from's weights (host arrays) in place of the random init, or None."""
    path = self.config.unet.get("init_from", "")
    return pretrained_params(path, abstract_params, self.config) if path else None

  def prepare(self, state, batch, frozen):
    """scale_by_std: 1 / std of the first global batch's latents (the reference's recipe)."""
    if not self.config.diffusion.scale_by_std:
      return state
    z = self.ldm.latents(frozen["autoencoder"], batch, jax.random.PRNGKey(0), 1.0)
    scale = 1.0 / jnp.std(z)
    return state.replace(model_state={**state.model_state, "scale_factor": scale})

  # -- training --------------------------------------------------------------------------------
  def _grads(self, params, model_state, batch, rng, frozen):
    scale = model_state["scale_factor"]

    def loss_fn(p):   # frozen conditioning weights join p here: no gradient reaches them
      loss, per_example, t, z = self.ldm.loss(self.ldm.with_frozen(p, frozen), batch,
                                              frozen["autoencoder"], scale, rng)
      return loss, (per_example, t, z)

    (loss, (per_example, t, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # Loss by timestep quarter: the early-t (fine detail) and late-t (layout) errors move
    # differently, and a falling total can hide either.
    quarter = t * 4 // self.ldm.schedule.num_timesteps
    metrics = {"loss": loss, "latent_std": jnp.std(z)}
    for q in range(4):
      sel = quarter == q
      metrics[f"loss_q{q}"] = jnp.sum(jnp.where(sel, per_example, 0.0)) / jnp.maximum(
          jnp.sum(sel), 1)
    return grads, model_state, metrics

  def train_step(self, state: TrainState, batch, frozen):
    grad_fn = lambda p, ms, bt, r: self._grads(p, ms, bt, r, frozen)  # noqa: E731
    state, metrics = apply_step(state, batch, grad_fn=grad_fn, tx=self.tx,
                                train_config=self.config.train)
    metrics["scale_factor"] = state.model_state["scale_factor"]
    return state, metrics

  # -- evaluation and summaries ----------------------------------------------------------------
  def eval_params(self, state):
    return state.ema_params if state.ema_params is not None else state.params

  def eval_step(self, state, batch, frozen):
    """Held-out denoising loss with fixed noise and timesteps (comparable across evals)."""
    loss, _, _, _ = self.ldm.loss(self.ldm.with_frozen(self.eval_params(state), frozen),
                                  batch, frozen["autoencoder"],
                                  state.model_state["scale_factor"], jax.random.PRNGKey(1234),
                                  train=False, p_uncond=0.0)
    return {"loss": loss}

  fid_name = "fid"

  def generate(self, state, batch, frozen):
    """(the batch's images or None, samples with its conditions and fixed noise (guided if
    configured)): for FID (training/fid.py) and the image summaries."""
    scale = state.model_state["scale_factor"]
    r_noise, r_sample = jax.random.split(jax.random.PRNGKey(0))
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    x_T = jax.random.normal(r_noise, self.ldm.latent_shape(n))
    z = self.ldm.sample(self.ldm.with_frozen(self.eval_params(state), frozen),
                        frozen["autoencoder"], scale, batch, x_T, r_sample)
    return batch.get("image"), jnp.clip(self.ldm.decode(frozen["autoencoder"], z, scale),
                                        -1.0, 1.0)

  def summaries(self, state, batch, frozen):
    """A grid of samples with the batch's conditions, below the batch's own images when it has
    them."""
    n = self.config.train.num_summary_images
    real, images = self.generate(state, jax.tree_util.tree_map(lambda x: x[:n], batch), frozen)
    return {"samples": images if real is None else jnp.concatenate([real, images], axis=0)}

  def inference_params(self, state) -> dict:
    params = self.eval_params(state)
    return {"unet": {"params": params["unet"]}, "cond": {"params": params["cond"]}}


def pretrained_params(path: str, params: dict, config) -> dict:
  """The {'unet', 'cond'} weights of the model at `path` (unet.init_from: an export, a stage-2
  workdir or a diffusers SD folder), checked against `params` (the config's, abstract); a
  model of another shape stops with one line naming the field."""
  from ldm_jax.inference import load_pipeline  # pylint: disable=g-import-not-at-top
  options = {}
  if config.cond.get("text_tokenizer") == "clip":
    options["tokenizer"] = config.cond.text_vocab
  source = load_pipeline(path, sd_options=options)
  loaded = {"unet": source.params["unet"],
            "cond": {k: v for k, v in source.params["cond"].items() if k != "clip"}}
  want = jax.tree_util.tree_map(lambda a: str(tuple(a.shape)), params)
  got = jax.tree_util.tree_map(lambda a: str(tuple(np.shape(a))), loaded)
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    diff = sorted({jax.tree_util.keystr(k) for k in set(flat_want) ^ set(flat_got)} |
                  {f"{jax.tree_util.keystr(k)} {flat_got[k]} vs {v}"
                   for k, v in flat_want.items() if k in flat_got and flat_got[k] != v})
    raise ConfigError(f"unet.init_from: '{path}' ({source.source}) is not this config's model "
                      f"({len(diff)} difference(s), e.g. {diff[0]}); the unet, cond and data "
                      f"fields must describe the pretrained model")
  logger.info("unet.init_from: started from %s", source.source)
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), jax.device_get(loaded))
