"""Stage 2: the latent diffusion model (UNet + conditioning encoder) on a frozen autoencoder.

The autoencoder's variables ride in `frozen`: never in the optimizer, never in the checkpoint,
never changed. Conditioning is routed per `config.cond.type`:

  none     eps(z_t, t)
  class    eps(z_t, t, context = ClassEmbedder(y))            (cross-attention)
  adm      eps(z_t, t, y)                                    (added to the time embedding)
  text     eps(z_t, t, context = TextTransformer(tokens))     (cross-attention, padding masked)
  concat   eps([z_t, c], t)                                  (c on the latent grid)
  hybrid   eps([z_t, c], t, context)                          (both)

Condition dropout (cond.p_uncond) swaps an example's condition for the null condition, so one
model serves classifier-free guidance.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.config import ConfigError
from ldm_jax.data import masks as masks_lib
from ldm_jax.data.latent_cache import build_latent_cache
from ldm_jax.data.preprocess import image_example_fn, to_float, to_uint8
from ldm_jax.data.text import TextTokenizer, train_wordpiece
from ldm_jax.diffusion import process, samplers
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.first_stage import FirstStage, load_first_stage
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler, TextTransformer
from ldm_jax.models.build import build_unet, dtype_of
from ldm_jax.training import optim
from ldm_jax.training.stages import Stage, accumulate_gradients, register
from ldm_jax.training.state import TrainState, ema_decay_at, ema_update

logger = logging.getLogger("ldm_jax")


def context_kind(cond_config) -> str:
  """'class', 'text' or '' : what feeds the cross-attention."""
  if cond_config.type in ("class", "text"):
    return cond_config.type
  if cond_config.type == "hybrid":
    return cond_config.context
  return ""


def concat_kind(cond_config) -> str:
  return cond_config.concat if cond_config.type in ("concat", "hybrid") else ""


class Conditioner:
  """Builds the conditioning encoders of a config and turns batches into UNet inputs."""

  def __init__(self, config, first: FirstStage, tokenizer: TextTokenizer | None,
               num_classes: int, dtype=jnp.float32):
    c = config.cond
    self.config, self.first, self.num_classes = config, first, num_classes
    self.context, self.concat = context_kind(c), concat_kind(c)
    self.adm = c.type == "adm"
    self.p_uncond, self.null = c.p_uncond, c.null
    self.class_embedder = self.text = self.rescaler = None
    if self.context == "class":
      self.class_embedder = ClassEmbedder(num_classes, c.embed_dim, c.null)
    elif self.context == "text":
      self.text = TextTransformer(tokenizer.vocab_size, c.text_max_length, c.embed_dim,
                                  c.text_depth, c.text_heads, null=c.null,
                                  dropout=config.unet.dropout, dtype=dtype)
    if self.concat == "segmentation":
      self.rescaler = SpatialRescaler(c.rescaler_stages, 0.5, out_channels=0)
    # adm with a learned null uses one extra label row, like the class embedder.
    self.adm_classes = num_classes + (1 if c.null == "learned" else 0) if self.adm else 0

  @property
  def concat_channels(self) -> int:
    if self.concat == "lowres":
      return self.first.channels
    if self.concat == "inpaint":
      return self.first.latent_channels + 1
    if self.concat == "segmentation":
      return self.config.cond.seg_classes
    return 0

  def init(self, rng, batch):
    params = {}
    b = batch_size(batch)
    drop = jnp.zeros((b,), bool)
    if self.class_embedder is not None:
      params["class"] = self.class_embedder.init(rng, batch["label"], drop)["params"]
    if self.text is not None:
      params["text"] = self.text.init(rng, batch["tokens"], drop)["params"]
    return params

  def __call__(self, params, batch, frozen_ae, drop, scale, train: bool = False, rng=None):
    """-> dict(context, context_mask, y, concat) for the UNet; `drop` (B,) selects the null
    condition. Latent-space concat conditions are built here (inpainting encodes the masked
    image with the frozen autoencoder)."""
    out = {"context": None, "context_mask": None, "y": None, "concat": None}
    if self.class_embedder is not None:
      out["context"] = self.class_embedder.apply({"params": params["class"]}, batch["label"],
                                                 drop)
    if self.text is not None:
      rngs = {"dropout": rng} if train and rng is not None else None
      out["context"], out["context_mask"] = self.text.apply(
          {"params": params["text"]}, batch["tokens"], drop, train, rngs=rngs)
    if self.adm:
      null_label = self.num_classes if self.null == "learned" else 0
      out["y"] = jnp.where(drop, null_label, batch["label"])
    if self.concat:
      c = self.concat_input(batch, frozen_ae, scale)
      out["concat"] = jnp.where(drop[:, None, None, None], 0.0, c)
    return out

  def concat_input(self, batch, frozen_ae, scale):
    f = self.first.downsample_factor
    if self.concat == "lowres":
      return batch["lowres"].astype(jnp.float32)
    if self.concat == "inpaint":
      mask = batch["mask"].astype(jnp.float32)
      masked = batch["image"] * (1.0 - mask)
      z = latent_of(self.first, frozen_ae, masked, None) * scale
      b, h, w, _ = mask.shape
      small = jax.image.resize(mask, (b, h // f, w // f, 1), "nearest")
      return jnp.concatenate([z, small], axis=-1)
    if self.concat == "segmentation":
      onehot = jax.nn.one_hot(batch["segmentation"], self.config.cond.seg_classes)
      return self.rescaler.apply({}, onehot)
    raise ValueError(self.concat)


def batch_size(batch) -> int:
  return int(next(iter(jax.tree_util.tree_leaves(batch))).shape[0])


def latent_of(first: FirstStage, frozen_ae, x, rng):
  """Unscaled latents of images: a posterior sample (rng given) or mode, or the VQ
  pre-quantisation latent. No gradient flows into the frozen autoencoder."""
  encoded = first.encode(jax.lax.stop_gradient(frozen_ae), x)
  if first.is_vq:
    return jax.lax.stop_gradient(encoded)
  z = encoded.sample(rng) if rng is not None else encoded.mode()
  return jax.lax.stop_gradient(z)


def latent_from_moments(moments, rng, is_vq: bool):
  """Latents from a latent-cache entry: VQ latents as stored, KL posteriors sampled."""
  if is_vq:
    return moments
  mean, logvar = jnp.split(moments, 2, axis=-1)
  if rng is None:
    return mean
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)


@register("ldm")
class LatentDiffusionStage(Stage):
  """Trains the UNet and the conditioning encoder on latents of the frozen autoencoder."""
  name = "ldm"

  def __init__(self, config, mesh, workdir: str | None = None, first: FirstStage | None = None,
               tokenizer_path: str | None = None):
    """`first` and `tokenizer_path` override what the config names (inference exports carry
    their own autoencoder and tokenizer)."""
    super().__init__(config, mesh, workdir)
    c = config
    self.dtype = dtype_of(c.train.compute_dtype)
    self._tokenizer_override = tokenizer_path
    self.first = first or load_first_stage(c.first_stage.checkpoint, c.first_stage.use_ema,
                                           self.dtype)
    logger.info("first stage: %s (%s, f=%d, %d latent channels)", self.first.source,
                self.first.config.model.type, self.first.downsample_factor,
                self.first.latent_channels)
    self._check_first_stage()
    self.frozen = {"autoencoder": self.first.variables}
    self.schedule = make_schedule(c.diffusion)
    self.latent_size = c.data.image_size // self.first.downsample_factor
    self.tokenizer = self._tokenizer()
    self.num_classes = c.cond.num_classes
    self.cond = None  # built once the data's class count is known (set_num_classes)
    self.tx = optim.optimizer(c.train)
    if not self.needs_labels():
      self._build_models(0)

  # -- construction ----------------------------------------------------------------------------
  def needs_labels(self) -> bool:
    return context_kind(self.config.cond) == "class" or self.config.cond.type == "adm"

  def set_num_classes(self, data_classes: int):
    """Called by the loop with the training source's class count before init."""
    if self.cond is not None:
      return
    n = self.config.cond.num_classes or data_classes
    if self.needs_labels() and n <= 0:
      raise ConfigError(f"cond.num_classes: cond.type='{self.config.cond.type}' needs class "
                        f"labels, but the training data has none; set cond.num_classes or use "
                        f"labelled data")
    self._build_models(n)

  def _build_models(self, num_classes: int):
    self.num_classes = num_classes
    self.cond = Conditioner(self.config, self.first, self.tokenizer, num_classes, self.dtype)
    self.unet = build_unet(self.config.unet,
                           in_channels=self.first.latent_channels + self.cond.concat_channels,
                           out_channels=self.first.latent_channels,
                           context=bool(self.cond.context),
                           adm_classes=self.cond.adm_classes, dtype=self.dtype)

  def _check_first_stage(self):
    c, first = self.config, self.first
    if c.data.channels != first.channels:
      raise ConfigError(f"data.channels ({c.data.channels}) differs from the first stage's "
                        f"({first.channels}, {first.source})")
    f = first.downsample_factor * 2 ** (len(c.unet.channel_mult) - 1)
    if c.data.image_size % f:
      raise ConfigError(f"data.image_size ({c.data.image_size}) must be divisible by {f}: the "
                        f"first stage's f={first.downsample_factor} times the UNet's "
                        f"{len(c.unet.channel_mult) - 1} downsamplings")

  def _tokenizer(self):
    c = self.config.cond
    if context_kind(c) != "text":
      return None
    if c.text_tokenizer == "vocab" or self._tokenizer_override:
      return TextTokenizer(self.tokenizer_path, c.text_max_length)
    path = self.tokenizer_path
    if path is None:
      raise ConfigError("cond.text_tokenizer='train' needs a workdir to keep the tokenizer in")
    if not os.path.exists(path):
      if jax.process_index() == 0:
        from ldm_jax.data.sources import open_source  # pylint: disable=g-import-not-at-top
        source = open_source(self.config.data, self.config.data.split)
        limit = min(len(source), 200_000)
        logger.info("training a %d-token WordPiece tokenizer on %d captions", c.text_vocab_size,
                    limit)
        train_wordpiece((source[i].get("caption", "") for i in range(limit)), c.text_vocab_size,
                        path)
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("ldm_jax tokenizer")
    return TextTokenizer(path, c.text_max_length)

  @property
  def tokenizer_path(self) -> str | None:
    if self._tokenizer_override:
      return self._tokenizer_override
    if self.config.cond.text_tokenizer == "vocab":
      return self.config.cond.text_vocab
    return os.path.join(self.workdir, "tokenizer.json") if self.workdir else None

  # -- data ------------------------------------------------------------------------------------
  def adapt_source(self, source, train: bool):
    """Learns the class count from the training data; swaps in the latent cache if asked."""
    if train:
      self.set_num_classes(source.num_classes)
    if not (train and self.config.first_stage.precompute_latents):
      return source
    c = self.config
    directory = c.first_stage.latent_cache or os.path.join(self.workdir, "latents")
    fingerprint = {"first_stage": self.first.source, "data": source.description,
                   "image_size": c.data.image_size, "resize_mode": c.data.resize_mode}
    data_fn = image_example_fn(c.data, train=False)   # centre crops, no flips
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    variables = jax.device_put(self.first.variables, replicated)

    def moments(v, x):
      encoded = self.first.encode(v, x)
      if self.first.is_vq:
        return encoded
      return jnp.concatenate([encoded.mean, encoded.logvar], axis=-1)

    encode = jax.jit(moments, in_shardings=(replicated, batch), out_shardings=batch)
    logger.info("latent cache: %s", directory)
    return build_latent_cache(directory, source, data_fn, lambda x: encode(variables, x),
                              fingerprint=fingerprint, global_batch=c.train.batch_size,
                              batch_sharding=batch, num_classes=self.num_classes)

  def example_fn(self, train: bool):
    """Image (or cached latent) examples plus what the conditioning needs, per config."""
    c = self.config
    image_fn = image_example_fn(c.data, train)
    concat = concat_kind(c.cond)
    size = self.latent_size

    def fn(example, rng):
      if "latent" in example:   # a latent-cache entry
        out = {"latent": np.asarray(example["latent"], np.float32)}
        if train and c.data.random_flip and rng.random() < 0.5:
          out["latent"] = out["latent"][:, ::-1]
        if "label" in example:
          out["label"] = np.int32(example["label"])
      else:
        out = image_fn(example, rng)
      if self.tokenizer is not None:
        out["tokens"] = self.tokenizer.encode([example.get("caption", "")])[0]
      if concat == "lowres":
        out["lowres"] = downsample_image(out["image"], size)
      elif concat == "inpaint":
        out["mask"] = masks_lib.random_mask(rng, c.data.image_size, c.data.image_size)
      elif concat == "segmentation":
        seg = np.asarray(example["segmentation"])
        out["segmentation"] = resize_nearest(seg, c.data.image_size).astype(np.int32)
      return out

    return fn

  # -- state -----------------------------------------------------------------------------------
  def init(self, rng, batch) -> TrainState:
    r_unet, r_cond = jax.random.split(jax.random.fold_in(rng, 0))
    cond_params = self.cond.init(r_cond, jax.tree_util.tree_map(lambda x: x[:1], batch))
    z = jnp.zeros((1, self.latent_size, self.latent_size, self.first.latent_channels))
    unet_params = self.unet.init(r_unet, *self._unet_args(z, jnp.zeros((1,), jnp.int32),
                                                          self._dummy_inputs()))["params"]
    params = {"unet": unet_params, "cond": cond_params}
    ema = params if self.config.train.ema_decay > 0 else None
    scale = jnp.asarray(self.config.diffusion.scale_factor, jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), ema_params=ema,
                      model_state={"scale_factor": scale}, rng=rng)

  def dummy_batch(self, b: int = 1) -> dict:
    """A zero batch with every key init reads (for abstract inits when loading weights)."""
    size, ch = self.config.data.image_size, self.first.channels
    batch = {"image": jnp.zeros((b, size, size, ch)), "label": jnp.zeros((b,), jnp.int32)}
    if self.tokenizer is not None:
      batch["tokens"] = jnp.zeros((b, self.config.cond.text_max_length), jnp.int32)
    return batch

  def _dummy_inputs(self, b: int = 1):
    """Zero UNet inputs of the right shapes (for init)."""
    out = {"context": None, "context_mask": None, "y": None, "concat": None}
    if self.cond.context:
      length = 1 if self.cond.context == "class" else self.config.cond.text_max_length
      out["context"] = jnp.zeros((b, length, self.config.cond.embed_dim))
    if self.cond.adm:
      out["y"] = jnp.zeros((b,), jnp.int32)
    if self.cond.concat:
      out["concat"] = jnp.zeros((b, self.latent_size, self.latent_size,
                                 self.cond.concat_channels))
    return out

  def _unet_args(self, z, t, inputs):
    x = z if inputs["concat"] is None else jnp.concatenate([z, inputs["concat"]], axis=-1)
    return x, t, inputs["context"], inputs["y"], inputs["context_mask"]

  def prepare(self, state, batch, frozen):
    """scale_by_std: 1 / std of the first global batch's latents (the reference's recipe)."""
    if not self.config.diffusion.scale_by_std:
      return state
    z = self._latents(frozen, batch, jax.random.PRNGKey(0), 1.0)
    scale = 1.0 / jnp.std(z)
    return state.replace(model_state={**state.model_state, "scale_factor": scale})

  # -- the model -------------------------------------------------------------------------------
  def _latents(self, frozen, batch, rng, scale):
    if "latent" in batch:
      z = latent_from_moments(batch["latent"], rng if self.config.first_stage.sample_posterior
                              else None, self.first.is_vq)
    else:
      sample = rng if self.config.first_stage.sample_posterior else None
      z = latent_of(self.first, frozen["autoencoder"], batch["image"], sample)
    return z * scale

  def denoiser(self, params, inputs, train: bool = False, rng=None):
    """model_fn(z_t, t, inputs) for the samplers and the loss."""
    def fn(z_t, t, inp):
      rngs = {"dropout": rng} if train and rng is not None else None
      return self.unet.apply({"params": params["unet"]}, *self._unet_args(z_t, t, inp),
                             train=train, rngs=rngs)
    return fn

  def _grads(self, params, model_state, batch, rng, frozen):
    d = self.config.diffusion
    r_latent, r_drop, r_loss, r_dropout = jax.random.split(rng, 4)
    scale = model_state["scale_factor"]
    z = self._latents(frozen, batch, r_latent, scale)
    b = z.shape[0]
    drop = jax.random.bernoulli(r_drop, self.config.cond.p_uncond, (b,))

    def loss_fn(p):
      inputs = self.cond(p["cond"], batch, frozen["autoencoder"], drop, scale, True, r_dropout)
      model = lambda x, t: self.denoiser(p, inputs, True, r_dropout)(x, t, inputs)  # noqa
      loss, per_example, t = process.diffusion_loss(
          model, self.schedule, z, r_loss, parameterization=d.parameterization,
          loss_type=d.loss_type, weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma)
      return loss, (per_example, t)

    (loss, (per_example, t)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # Loss by timestep quarter: the early-t (fine detail) and late-t (layout) errors move
    # differently, and a falling total can hide either.
    quarter = t * 4 // self.schedule.num_timesteps
    metrics = {"loss": loss, "latent_std": jnp.std(z)}
    for q in range(4):
      sel = quarter == q
      metrics[f"loss_q{q}"] = jnp.sum(jnp.where(sel, per_example, 0.0)) / jnp.maximum(
          jnp.sum(sel), 1)
    return grads, model_state, metrics

  def train_step(self, state: TrainState, batch, frozen):
    t = self.config.train
    grad_fn = lambda p, ms, bt, r: self._grads(p, ms, bt, r, frozen)  # noqa: E731
    grads, model_state, metrics = accumulate_gradients(
        grad_fn, state.params, state.model_state, batch, state.step_rng(), t.grad_accum)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, ema_decay_at(state.step, t.ema_decay, t.ema_warmup))
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["scale_factor"] = model_state["scale_factor"]
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema, model_state=model_state), metrics

  # -- evaluation and sampling -----------------------------------------------------------------
  def eval_params(self, state):
    return state.ema_params if state.ema_params is not None else state.params

  def eval_step(self, state, batch, frozen):
    """Held-out denoising loss with fixed noise and timesteps (comparable across evals)."""
    d = self.config.diffusion
    params = self.eval_params(state)
    scale = state.model_state["scale_factor"]
    z = self._latents(frozen, batch, None, scale)
    drop = jnp.zeros((z.shape[0],), bool)
    inputs = self.cond(params["cond"], batch, frozen["autoencoder"], drop, scale)
    model = lambda x, t: self.denoiser(params, inputs)(x, t, inputs)  # noqa: E731
    loss, _, _ = process.diffusion_loss(model, self.schedule, z, jax.random.PRNGKey(1234),
                                        parameterization=d.parameterization,
                                        loss_type=d.loss_type)
    return {"loss": loss}

  def sample_latents(self, params, inputs, null_inputs, rng, shape, scale_value=None, *,
                     sampler=None, steps=None, eta=None, guidance_scale=None, mask=None):
    """Latents sampled with the configured (or given) sampler and guidance."""
    s = self.config.sample
    guidance = None
    scale = s.guidance_scale if guidance_scale is None else guidance_scale
    if null_inputs is not None and scale != 1.0:
      guidance = samplers.Guidance(scale, null_inputs)
    r_noise, r_sample = jax.random.split(rng)
    x_T = jax.random.normal(r_noise, shape)
    name = sampler or s.sampler
    kwargs = dict(parameterization=self.config.diffusion.parameterization, guidance=guidance,
                  mask=mask, eta=s.eta if eta is None else eta, spacing=s.spacing)
    if name != "ddpm":
      kwargs["steps"] = steps or s.steps
    return samplers.sample(name, self.denoiser(params, inputs), self.schedule, x_T, inputs,
                           r_sample, **kwargs)

  def decode(self, frozen, z, scale):
    return self.first.decode(frozen["autoencoder"], z / scale)

  def summaries(self, state, batch, frozen):
    """A grid of samples with the training batch's conditions (guided if configured)."""
    n = self.config.train.num_summary_images
    params = self.eval_params(state)
    scale = state.model_state["scale_factor"]
    one = jax.tree_util.tree_map(lambda x: x[:n], batch)
    keep = jnp.zeros((n,), bool)
    inputs = self.cond(params["cond"], one, frozen["autoencoder"], keep, scale)
    null = self.cond(params["cond"], one, frozen["autoencoder"], ~keep, scale) \
        if self.cond.context or self.cond.adm or self.cond.concat else None
    shape = (n, self.latent_size, self.latent_size, self.first.latent_channels)
    z = self.sample_latents(params, inputs, null, jax.random.PRNGKey(0), shape)
    images = jnp.clip(self.decode(frozen, z, scale), -1, 1)
    out = {"samples": images}
    if "image" in batch:
      out["samples"] = jnp.concatenate([one["image"], images], axis=0)
    return out

  def inference_params(self, state) -> dict:
    return {"unet": {"params": self.eval_params(state)["unet"]},
            "cond": {"params": self.eval_params(state)["cond"]}}


def downsample_image(image: np.ndarray, size: int) -> np.ndarray:
  """A float [-1, 1] image -> (size, size) with PIL's antialiased bicubic filter."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  u8 = to_uint8(image)
  pil = Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)
  small = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
  return to_float(small[..., None] if small.ndim == 2 else small)


def resize_nearest(seg: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  seg = np.asarray(seg)
  if seg.ndim == 3:
    seg = seg[..., 0]
  return np.asarray(Image.fromarray(seg.astype(np.int32)).resize((size, size),
                                                                 Image.Resampling.NEAREST))

