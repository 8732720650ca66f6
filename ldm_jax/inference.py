"""Inference: a trained LDM (from a training workdir or an export) as one jittable function from
sample indices and conditions to images, plus tiled decoding of large latents.

Each sample's starting noise is drawn from fold_in(seed key, global sample index), so a sample
does not depend on the batch it lands in, the number of devices, or whether the job resumed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.checkpoint import (Checkpointer, CheckpointError, is_inference_export,
                                load_inference)
from ldm_jax.diffusion import samplers
from ldm_jax.first_stage import FirstStage
from ldm_jax.models.build import build_autoencoder, dtype_of
from ldm_jax.training.stage2 import LatentDiffusionStage


@dataclasses.dataclass
class Pipeline:
  """A loaded latent diffusion model: its stage (modules, conditioner, schedule), the UNet and
  conditioning weights, the frozen autoencoder and the latent scale."""
  stage: LatentDiffusionStage
  params: dict           # {'unet': ..., 'cond': ...}
  frozen: dict           # {'autoencoder': variables}
  scale_factor: float
  source: str

  @property
  def config(self):
    return self.stage.config

  @property
  def num_classes(self) -> int:
    return self.stage.num_classes

  def latent_shape(self, batch: int, image_size: int | None = None):
    f = self.stage.first.downsample_factor
    size = (image_size or self.config.data.image_size) // f
    return (batch, size, size, self.stage.first.latent_channels)

  def condition_batch(self, n: int, labels=None, prompts=None, images=None, masks=None):
    """The batch dict the conditioner reads, for n samples."""
    batch: dict[str, Any] = {}
    cond = self.stage.cond
    if cond.context == "class" or cond.adm:
      if labels is None:
        raise ValueError(f"this model is class-conditional ({self.num_classes} classes): give "
                         f"class labels")
      batch["label"] = np.asarray(labels, np.int32).reshape(n)
    if cond.context == "text":
      if prompts is None:
        raise ValueError("this model is text-conditional: give prompts")
      batch["tokens"] = self.stage.tokenizer.encode(list(prompts))
    if cond.concat:
      if images is None:
        raise ValueError(f"this model concatenates a '{cond.concat}' condition: give images")
      example_fn = self.stage.example_fn(train=False)
      examples = [example_fn({"image": img, **({"segmentation": m} if cond.concat ==
                                               "segmentation" else {})},
                             np.random.default_rng(i)) for i, (img, m) in enumerate(
                                 zip(images, masks if masks is not None else [None] * n))]
      for key in ("image", "lowres", "segmentation"):
        if key in examples[0]:
          batch[key] = np.stack([e[key] for e in examples])
      if cond.concat == "inpaint":
        if masks is None:
          raise ValueError("an inpainting model needs masks (1 = region to fill)")
        batch["mask"] = np.stack([np.asarray(m, np.float32).reshape(
            examples[0]["image"].shape[:2] + (1,)) for m in masks])
    return batch

  def make_generate(self, *, sampler=None, steps=None, eta=None, guidance_scale=None,
                    spacing=None, image_size=None, tile: int = 0):
    """generate(params, frozen, seed_key, indices (B,), cond_batch) -> images (B, H, W, C).

    One compiled program serves every batch of a job. `image_size` larger than the training
    size samples larger latents (the UNet is convolutional); `tile` > 0 decodes them in
    overlapping tiles of that many latent pixels, bounding the decoder's memory.
    """
    stage, scale = self.stage, self.scale_factor
    s = self.config.sample
    guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
    has_null = bool(stage.cond.context or stage.cond.adm or stage.cond.concat)
    kwargs = dict(parameterization=self.config.diffusion.parameterization,
                  eta=s.eta if eta is None else eta, spacing=spacing or s.spacing)
    name = sampler or s.sampler
    if name != "ddpm":
      kwargs["steps"] = steps or s.steps

    def generate(params, frozen, key, indices, cond_batch):
      n = indices.shape[0]
      shape = self.latent_shape(n, image_size)[1:]
      sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
      x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(sample_keys)
      noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(sample_keys)
      keep = jnp.zeros((n,), bool)
      inputs = stage.cond(params["cond"], cond_batch, frozen["autoencoder"], keep, scale)
      guidance = None
      if has_null and guidance_scale != 1.0:
        null = stage.cond(params["cond"], cond_batch, frozen["autoencoder"], ~keep, scale)
        guidance = samplers.Guidance(guidance_scale, null)
      z = samplers.sample(name, stage.denoiser(params, inputs), stage.schedule, x_T, inputs,
                          noise_keys, guidance=guidance, **kwargs)
      decode = lambda lat: stage.first.decode(frozen["autoencoder"], lat / scale)  # noqa: E731
      images = tiled_decode(decode, z, tile, stage.first.downsample_factor) if tile else \
          decode(z)
      return jnp.clip(images, -1.0, 1.0)

    return generate


def tiled_decode(decode_fn, z, tile: int, factor: int, overlap: float = 0.25):
  """Decodes latents (B, h, w, C) in overlapping `tile` x `tile` latent tiles, blending the
  decoded tiles with linear ramps, so memory grows with the tile, not the image.

  Tiles are decoded one after another (lax.map) through the same compiled decoder.
  """
  b, h, w, _ = z.shape
  if tile >= h and tile >= w:
    return decode_fn(z)
  stride = max(1, int(tile * (1 - overlap)))
  tile_h, tile_w = min(tile, h), min(tile, w)

  def starts(size, t):
    s = list(range(0, max(size - t, 0) + 1, stride))
    if s[-1] != size - t:
      s.append(size - t)
    return s

  origins = [(y, x) for y in starts(h, tile_h) for x in starts(w, tile_w)]
  tiles = jnp.stack([z[:, y:y + tile_h, x:x + tile_w] for y, x in origins])
  decoded = jax.lax.map(decode_fn, tiles)               # (T, B, th*f, tw*f, C)
  ramp = lambda n: np.minimum(np.arange(1, n + 1), np.arange(n, 0, -1)).astype(  # noqa: E731
      np.float32)
  weight = np.outer(ramp(tile_h * factor), ramp(tile_w * factor))[None, :, :, None]
  out = jnp.zeros((b, h * factor, w * factor, decoded.shape[-1]), decoded.dtype)
  norm = jnp.zeros((1, h * factor, w * factor, 1), decoded.dtype)
  for k, (y, x) in enumerate(origins):
    ys, xs = slice(y * factor, (y + tile_h) * factor), slice(x * factor, (x + tile_w) * factor)
    out = out.at[:, ys, xs].add(decoded[k] * weight)
    norm = norm.at[:, ys, xs].add(weight)
  return out / norm


def _first_stage_from_export(variables, meta, dtype) -> FirstStage:
  ae_config = ml_collections.ConfigDict(meta["autoencoder_config"])
  module = build_autoencoder(ae_config.model, image_size=ae_config.data.image_size,
                             channels=ae_config.data.channels, dtype=dtype)
  return FirstStage(module, variables["autoencoder"], ae_config, "export")


def load_pipeline(path: str, mesh=None) -> Pipeline:
  """A Pipeline from an inference export or a stage-2 training workdir (EMA weights)."""
  if mesh is None:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  if is_inference_export(path):
    variables, meta, config = load_inference(path)
    config = ml_collections.ConfigDict(config)
    if meta.get("stage") != "ldm":
      raise CheckpointError(f"'{path}' exports a '{meta.get('stage')}' model; sampling needs an "
                            f"LDM export")
    first = _first_stage_from_export(variables, meta, dtype_of(config.train.compute_dtype))
    tokenizer = os.path.join(path, meta["tokenizer"]) if meta.get("tokenizer") else None
    stage = LatentDiffusionStage(config, mesh, first=first, tokenizer_path=tokenizer)
    stage.set_num_classes(int(meta.get("num_classes", 0)))
    params = {"unet": variables["unet"]["params"], "cond": variables["cond"]["params"]}
    return Pipeline(stage, params, {"autoencoder": first.variables},
                    float(meta["scale_factor"]), f"export {path}")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"'{path}' is neither an ldm_jax export nor a training workdir (no "
                          f"meta.json or config.json)")
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("stage") != "ldm":
    raise CheckpointError(f"'{path}' is a '{config.get('stage')}' run; sampling needs an LDM")
  checkpointer = Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
  stage = LatentDiffusionStage(config, mesh, workdir=path)
  stage.set_num_classes(classes_in_weights(checkpointer.saved_shapes(), config))
  abstract = jax.eval_shape(stage.init, jax.random.PRNGKey(0), stage.dummy_batch())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda tree: jax.tree_util.tree_map(  # noqa: E731
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
  key = "ema_params" if abstract.ema_params is not None else "params"
  restored = checkpointer.restore_subtree({key: place(abstract.params),
                                           "model_state": place(abstract.model_state)})
  return Pipeline(stage, restored[key], {"autoencoder": stage.first.variables},
                  float(restored["model_state"]["scale_factor"]),
                  f"{path} step {checkpointer.latest_step()}")


def classes_in_weights(shapes: dict[str, tuple], config) -> int:
  """The class count a checkpoint was trained with, read off its label embedding's rows."""
  for path in ("params/cond/class/embedding/embedding", "params/unet/label_emb/embedding"):
    if path in shapes:
      return shapes[path][0] - (1 if config.cond.null == "learned" else 0)
  return 0


def export_pipeline(pipeline: Pipeline, out: str, dtype: str = "float32"):
  """Writes a standalone inference export of a pipeline (optionally cast to bfloat16)."""
  from ldm_jax.checkpoint import save_inference  # pylint: disable=g-import-not-at-top
  cast = (lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x) \
      if dtype == "bfloat16" else (lambda x: x)
  variables = jax.tree_util.tree_map(cast, {
      "unet": {"params": pipeline.params["unet"]}, "cond": {"params": pipeline.params["cond"]},
      "autoencoder": pipeline.frozen["autoencoder"]})
  extra, tokenizer = {}, None
  if pipeline.stage.tokenizer is not None:
    tokenizer = "tokenizer" + (".json" if pipeline.stage.tokenizer.path.endswith(".json")
                               else ".txt")
    extra[tokenizer] = pipeline.stage.tokenizer.path
  meta = {"stage": "ldm", "scale_factor": pipeline.scale_factor,
          "num_classes": pipeline.num_classes, "dtype": dtype, "tokenizer": tokenizer,
          "autoencoder_config": json.loads(pipeline.stage.first.config.to_json_best_effort()),
          "source": pipeline.source}
  return save_inference(out, variables, config=pipeline.config, meta=meta, extra_files=extra)

