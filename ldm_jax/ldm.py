"""The latent diffusion model as one object: frozen first stage + conditioner + UNet + schedule.

Training (ldm_jax/training/stage2.py) and inference (ldm_jax/inference.py) both use it, so the
loss, the denoiser and the sampler see the model the same way. It holds modules and facts, no
weights: parameters ({'unet', 'cond'}), the frozen autoencoder's variables and the latent scale
factor are arguments of every method, which keeps them jittable with any sharding.

The denoiser has one calling convention everywhere: model_fn(x_t, t, cond) with `cond` the
dict the conditioner returns (context, context_mask, y, concat).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax.conditioner import Conditioner, check_conditioning
from ldm_jax.diffusion import process, samplers, tiling
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.errors import ConfigError
from ldm_jax.first_stage import FirstStage
from ldm_jax.models.build import build_unet, dtype_of
from ldm_jax.models.layers import checkpoint_full


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How to sample; None fields take the config's `sample` section."""
  sampler: str | None = None
  steps: int | None = None
  eta: float | None = None
  guidance_scale: float | None = None
  spacing: str | None = None

  def resolve(self, sample_config) -> "SampleSettings":
    s = sample_config
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return SampleSettings(pick(self.sampler, s.sampler), pick(self.steps, s.steps),
                          pick(self.eta, s.eta), pick(self.guidance_scale, s.guidance_scale),
                          self.spacing or s.spacing)


class LatentDiffusion:
  """An LDM built from a stage-2 config, its first stage, class count and tokenizer;
  `activation_sharding` (training on a mesh) pins the UNet's batch activations (see UNet)."""

  def __init__(self, config, first: FirstStage, *, num_classes: int = 0, tokenizer=None,
               activation_sharding=None, clip_fields: dict | None = None):
    c = config
    self.config, self.first, self.tokenizer = config, first, tokenizer
    self.num_classes, self.clip_fields = num_classes, clip_fields
    self.dtype = dtype_of(c.train.compute_dtype)
    _check_first_stage(c, first)
    check_conditioning(c, first, num_classes)
    self.schedule = make_schedule(c.diffusion)
    self.latent_size = c.data.image_size // first.downsample_factor
    vocab = tokenizer.vocab_size if tokenizer is not None else 0
    null_tokens = tokenizer.encode([""])[0] if clip_fields and tokenizer is not None else None
    self.cond = Conditioner(c, first, vocab, num_classes, self.dtype, clip_fields, null_tokens)
    self.coord_channels = 2 if c.unet.get("coord_channels", False) else 0
    self.unet = build_unet(c.unet, in_channels=first.latent_channels + self.cond.concat_channels
                           + self.coord_channels,
                           out_channels=first.latent_channels, context=bool(self.cond.context),
                           adm_classes=self.cond.adm_classes, dtype=self.dtype,
                           activation_sharding=activation_sharding)

  # -- parameters ------------------------------------------------------------------------------
  def init_params(self, rng, batch) -> dict:
    """{'unet', 'cond'} parameters; `batch` needs the keys the conditioner reads."""
    r_unet, r_cond = jax.random.split(rng)
    cond_params = self.cond.init(r_cond, jax.tree_util.tree_map(lambda x: x[:1], batch))
    z = jnp.zeros((1, self.latent_size, self.latent_size, self.first.latent_channels))
    inputs = self._with_coords(self.cond.dummy_inputs(1, self.latent_size), z.shape)
    unet_params = self.unet.init(r_unet, *self._unet_args(z, jnp.zeros((1,), jnp.int32),
                                                          inputs))["params"]
    return {"unet": unet_params, "cond": cond_params}

  def dummy_batch(self, b: int = 1) -> dict:
    """A zero batch with every key init reads (for abstract inits when loading weights)."""
    size, ch = self.config.data.image_size, self.first.channels
    batch = {"image": jnp.zeros((b, size, size, ch)), "label": jnp.zeros((b,), jnp.int32)}
    if self.tokenizer is not None:
      batch["tokens"] = jnp.zeros((b, self.config.cond.text_max_length), jnp.int32)
    if self.cond.context == "layout":
      n = self.config.data.max_boxes
      batch["boxes"] = jnp.zeros((b, n, 4))
      batch["box_classes"] = jnp.full((b, n), -1, jnp.int32)
    return batch

  @staticmethod
  def with_frozen(params: dict, frozen: dict) -> dict:
    """`params` with the frozen conditioning weights a stage keeps outside the optimizer (a
    CLIP text encoder, frozen['text_encoder']) where the conditioner reads them."""
    if "text_encoder" not in frozen:
      return params
    return {**params, "cond": {**params["cond"], "clip": frozen["text_encoder"]}}

  def abstract_params(self):
    """ShapeDtypeStructs of the parameters (no compute, no memory)."""
    return jax.eval_shape(self.init_params, jax.random.PRNGKey(0), self.dummy_batch())

  # -- the model -------------------------------------------------------------------------------
  def latents(self, frozen_ae, batch, rng, scale):
    """Scaled latents of a batch of images or latent-cache entries (a posterior sample when
    first_stage.sample_posterior and rng is given, else the mode)."""
    sample = rng if self.config.first_stage.sample_posterior else None
    if "latent" in batch:
      z = self.first.latent_from_moments(batch["latent"], sample)
    else:
      z = self.first.latent(frozen_ae, batch["image"], sample)
    return z * scale

  def conditions(self, params, batch, frozen_ae, drop, scale, train=False, rng=None,
                 latent_shape=None) -> dict:
    """The UNet's conditioning inputs; with unet.coord_channels, the latent grid's coordinates
    join the concat input (never dropped: they are not a condition)."""
    cond = self.cond(params["cond"], batch, frozen_ae, drop, scale, train, rng)
    return self._with_coords(cond, latent_shape)

  def _with_coords(self, cond, latent_shape):
    if not self.coord_channels:
      return cond
    b, h, w = latent_shape[:3]
    yx = jnp.stack(jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w),
                                indexing="ij"), axis=-1)
    coords = jnp.broadcast_to(yx, (b, h, w, 2))
    concat = cond["concat"]
    return dict(cond, concat=coords if concat is None else jnp.concatenate([concat, coords], -1))

  def _unet_args(self, z, t, cond):
    x = z if cond["concat"] is None else jnp.concatenate([z, cond["concat"]], axis=-1)
    return x, t, cond["context"], cond["y"], cond["context_mask"]

  def model_fn(self, params, train: bool = False, rng=None):
    """The denoiser model_fn(x_t, t, cond) for the loss and the samplers."""
    rngs = {"dropout": rng} if train and rng is not None else None

    def apply(unet_params, x, t, context, y, context_mask, rngs):
      return self.unet.apply({"params": unet_params}, x, t, context, y, context_mask,
                             train=train, rngs=rngs)
    # unet.remat='full': the backward pass keeps only the UNet's inputs (training only).
    apply = checkpoint_full(apply, self.unet.remat if train else "none")

    def fn(x_t, t, cond):
      return apply(params["unet"], *self._unet_args(x_t, t, cond), rngs)
    return fn

  def loss(self, params, batch, frozen_ae, scale, rng, *, train: bool = True, p_uncond=None):
    """(mean loss, per-example losses, timesteps, latents) of one batch; conditions are
    dropped with probability cond.p_uncond (training) for classifier-free guidance."""
    d = self.config.diffusion
    r_latent, r_drop, r_loss, r_dropout = jax.random.split(rng, 4)
    z = self.latents(frozen_ae, batch, r_latent if train else None, scale)
    p = self.config.cond.p_uncond if p_uncond is None else p_uncond
    drop = jax.random.bernoulli(r_drop, p, (z.shape[0],))
    cond = self.conditions(params, batch, frozen_ae, drop, scale, train, r_dropout, z.shape)
    model = lambda x, t: self.model_fn(params, train, r_dropout)(x, t, cond)  # noqa: E731
    weighting = d.loss_weighting if train else "none"
    loss, per_example, t = process.diffusion_loss(
        model, self.schedule, z, r_loss, parameterization=d.parameterization,
        loss_type=d.loss_type, weighting=weighting, min_snr_gamma=d.min_snr_gamma)
    return loss, per_example, t, z

  # -- sampling --------------------------------------------------------------------------------
  def sample(self, params, frozen_ae, scale, cond_batch, x_T, noise_keys,
             settings: SampleSettings = SampleSettings(), mask=None, tile: int = 0):
    """Latents from noise x_T, conditioned on cond_batch (guided when the model is conditional
    and guidance_scale != 1); `mask` (a samplers.Mask) keeps known latents; `tile` > 0 runs
    the UNet on overlapping tiles of that many latent pixels (diffusion/tiling.py)."""
    s = settings.resolve(self.config.sample)
    keep = jnp.zeros((x_T.shape[0],), bool)
    cond = self.conditions(params, cond_batch, frozen_ae, keep, scale, latent_shape=x_T.shape)
    guidance = None
    if self.cond.conditional and s.guidance_scale != 1.0:
      null = self.conditions(params, cond_batch, frozen_ae, ~keep, scale,
                             latent_shape=x_T.shape)
      guidance = samplers.Guidance(s.guidance_scale, null)
    kwargs = dict(parameterization=self.config.diffusion.parameterization, guidance=guidance,
                  mask=mask, eta=s.eta, spacing=s.spacing)
    if s.sampler != "ddpm":
      kwargs["steps"] = s.steps
    model = tiling.tiled_model(self.model_fn(params), tile, multiple=self.unet_multiple)
    return samplers.sample(s.sampler, model, self.schedule, x_T, cond, noise_keys, **kwargs)

  def decode(self, frozen_ae, z, scale, tile: int = 0):
    """Scaled latents -> images (unclipped); `tile` > 0 decodes in overlapping tiles."""
    decode = lambda lat: self.first.decode(frozen_ae, lat / scale)  # noqa: E731
    return tiled_decode(decode, z, tile, self.first.downsample_factor) if tile else decode(z)

  @property
  def unet_multiple(self) -> int:
    """Latent sides must be multiples of this (the UNet's downsamplings)."""
    return 2 ** (len(self.config.unet.channel_mult) - 1)

  def latent_shape(self, batch: int, image_size=None):
    """(batch, h, w, C) latents of images of `image_size` (an int, (H, W), or None for the
    config's data.image_size)."""
    size = image_size or self.config.data.image_size
    h, w = (size, size) if isinstance(size, int) else size
    f = self.first.downsample_factor
    return (batch, h // f, w // f, self.first.latent_channels)

  def image_size_of(self, cond_batch) -> tuple[int, int] | None:
    """The (H, W) a spatial condition fixes: a low-resolution input's size times f, or the
    size of the image to inpaint or of the semantic map; None without one."""
    f = self.first.downsample_factor
    if "lowres" in cond_batch:
      return cond_batch["lowres"].shape[1] * f, cond_batch["lowres"].shape[2] * f
    for key in ("image", "segmentation"):
      if key in cond_batch:
        return tuple(cond_batch[key].shape[1:3])
    return None

  def known_region(self, frozen_ae, scale, image, fill_mask):
    """samplers.Mask keeping the latents of `image` outside `fill_mask` (B, H, W, 1; 1 = region
    to generate): a latent pixel is regenerated when any of its f x f pixels is to be filled."""
    f = self.first.downsample_factor
    b, h, w, _ = fill_mask.shape
    fill = fill_mask.reshape(b, h // f, f, w // f, f, 1).max(axis=(2, 4))
    known = self.first.latent(frozen_ae, image, None) * scale
    return samplers.Mask(mask=1.0 - fill, known=known)

  def generate(self, params, frozen_ae, scale, key, indices, cond_batch,
               settings: SampleSettings = SampleSettings(), image_size=None, tile: int = 0,
               inpaint: bool = False, tile_denoising: bool = False):
    """Images of samples `indices` (B,): sample i's noise is drawn from fold_in(key, i), so it
    does not depend on the batch it lands in, the device count, or a resume.

    The image size is `image_size`, else the one a spatial condition in cond_batch fixes (a
    super-resolution input of any size), else the config's. `inpaint` keeps cond_batch's
    'image' outside its 'mask' (1 = fill): mask-blend sampling, for a model of any route.
    `tile` > 0 decodes in overlapping tiles of that many latent pixels, and with
    `tile_denoising` the UNet runs on such tiles at every step too.
    """
    size = image_size or self.image_size_of(cond_batch)
    shape = self.latent_shape(indices.shape[0], size)[1:]
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(sample_keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(sample_keys)
    mask = (self.known_region(frozen_ae, scale, cond_batch["image"], cond_batch["mask"])
            if inpaint else None)
    z = self.sample(params, frozen_ae, scale, cond_batch, x_T, noise_keys, settings, mask,
                    tile if tile_denoising else 0)
    return jnp.clip(self.decode(frozen_ae, z, scale, tile), -1.0, 1.0)

  def describe(self) -> dict:
    """What the model is, beyond its config: recorded in checkpoints and exports."""
    return {"num_classes": int(self.num_classes), "text_encoder": self.clip_fields,
            "tokenizer": None if self.tokenizer is None else self.tokenizer.path,
            "first_stage": dict(self.first.identity, source=self.first.source)}


def _check_first_stage(config, first: FirstStage):
  if config.data.channels != first.channels:
    raise ConfigError(f"data.channels ({config.data.channels}) differs from the first stage's "
                      f"({first.channels}, {first.source})")
  f = first.downsample_factor * 2 ** (len(config.unet.channel_mult) - 1)
  if config.data.image_size % f:
    raise ConfigError(f"data.image_size ({config.data.image_size}) must be divisible by {f}: "
                      f"the first stage's f={first.downsample_factor} times the UNet's "
                      f"{len(config.unet.channel_mult) - 1} downsamplings")


def tiled_decode(decode_fn, z, tile: int, factor: int, overlap: float = 0.25):
  """Decodes latents (B, h, w, C) in overlapping `tile` x `tile` latent tiles blended with
  linear ramps (diffusion/tiling.py), so memory grows with the tile, not the image."""
  return tiling.tiled_apply(decode_fn, [z], tile, factor, overlap)
