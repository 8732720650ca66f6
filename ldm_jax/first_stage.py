"""The frozen first stage of an LDM: a trained autoencoder loaded from a stage-1 training workdir
(a pinned or the latest checkpoint step, EMA weights when there are any) or from an inference
export, plus the latent maths stage 2 needs (encode, decode, posterior sampling)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.checkpoint import (Checkpointer, CheckpointError, is_inference_export,
                                load_inference)
from ldm_jax.models.build import build_autoencoder


@dataclasses.dataclass
class FirstStage:
  """An autoencoder module, its variables and the facts stage 2 needs about it."""
  module: object
  variables: dict
  config: ml_collections.ConfigDict   # the stage-1 config it was trained with
  source: str
  identity: dict = dataclasses.field(default_factory=dict)  # {'path', 'step', 'ema'} to pin

  @property
  def is_vq(self) -> bool:
    return self.config.model.type == "vq"

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.config.model.ch_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return int(self.config.model.embed_dim)

  @property
  def channels(self) -> int:
    return int(self.config.data.channels)

  def encode(self, variables, x):
    """Images in [-1, 1] -> the latent the diffusion model sees (unscaled): a posterior
    (KL; sample or take its mode) or the pre-quantisation latent (VQ)."""
    return self.module.apply(variables, x, method="encode")

  def decode(self, variables, z):
    """Unscaled latents -> images (the VQ decoder quantises first)."""
    return self.module.apply(variables, z, method="decode")

  def latent(self, variables, x, rng):
    """Unscaled latents of images: a posterior sample (rng given) or mode, or the VQ
    pre-quantisation latent. No gradient flows into the frozen autoencoder."""
    encoded = self.encode(jax.lax.stop_gradient(variables), x)
    if self.is_vq:
      return jax.lax.stop_gradient(encoded)
    z = encoded.sample(rng) if rng is not None else encoded.mode()
    return jax.lax.stop_gradient(z)

  def moments(self, variables, x):
    """What a latent cache stores: [mean | logvar] of a KL posterior, or the VQ latent."""
    encoded = self.encode(variables, x)
    if self.is_vq:
      return encoded
    return jnp.concatenate([encoded.mean, encoded.logvar], axis=-1)

  def latent_from_moments(self, moments, rng):
    """Latents from a latent-cache entry: VQ latents as stored, KL posteriors sampled."""
    if self.is_vq:
      return moments
    mean, logvar = jnp.split(moments, 2, axis=-1)
    if rng is None:
      return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)


def _module(config, dtype):
  return build_autoencoder(config.model, image_size=config.data.image_size,
                           channels=config.data.channels, dtype=dtype)


def abstract_variables(module, config):
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels))
  rngs = {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(0)}
  return jax.eval_shape(lambda: module.init(rngs, x))


def load_first_stage(path: str, use_ema: bool = True, dtype=jnp.float32,
                     step: int | None = None) -> FirstStage:
  """Loads the autoencoder of a stage-1 workdir (checkpoint `step`, default the latest) or an
  export folder at `path`."""
  if not path or not os.path.isdir(path):
    raise CheckpointError(f"first_stage.checkpoint: '{path}' is not a folder (expected a "
                          f"stage-1 workdir or an inference export)")
  if is_inference_export(path):
    variables, meta, config = load_inference(path, components=["autoencoder"])
    ae_config = ml_collections.ConfigDict(meta.get("autoencoder_config") or config)
    return FirstStage(_module(ae_config, dtype), variables["autoencoder"], ae_config,
                      f"export {path}", {"path": os.path.abspath(path), "step": None,
                                         "ema": None, "export": meta.get("source", "")})
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"first_stage.checkpoint: '{path}' has no config.json (is it a "
                          f"stage-1 workdir?)")
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("stage") != "autoencoder":
    raise CheckpointError(f"first_stage.checkpoint: '{path}' is a '{config.get('stage')}' run, "
                          f"not a stage-1 autoencoder run")
  module = _module(config, dtype)
  abstract = abstract_variables(module, config)
  checkpointer = Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
  if step is None:
    step = checkpointer.latest_step()
    if step is None:
      raise CheckpointError(f"first_stage.checkpoint: '{path}/checkpoints' holds no checkpoint")
  elif step not in checkpointer.all_steps():
    raise CheckpointError(f"first_stage.checkpoint: this run was trained on step {step} of "
                          f"'{path}', which no longer exists (it holds "
                          f"{checkpointer.all_steps()}); restore that checkpoint or start the "
                          f"stage-2 run in a new workdir")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  placed = lambda tree: jax.tree_util.tree_map(  # noqa: E731
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
  ema = use_ema and config.train.ema_decay > 0
  target = {"ema_params": placed(abstract["params"])} if ema else {
      "params": {"ae": placed(abstract["params"])}}
  if "vq" in abstract:
    target["model_state"] = {"vq": placed(abstract["vq"])}
  restored = checkpointer.restore_subtree(target, step)
  variables = {"params": restored["ema_params"] if ema else restored["params"]["ae"]}
  if "vq" in abstract:
    variables["vq"] = restored["model_state"]["vq"]
  return FirstStage(module, variables, config,
                    f"{path} step {step}" + (" (EMA)" if ema else ""),
                    {"path": os.path.abspath(path), "step": int(step), "ema": bool(ema)})
