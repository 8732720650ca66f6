"""Inference: a trained LDM (from a training workdir or an export) with its weights, and one
jittable function from sample indices and conditions to images.

No optimizer, no mesh, no training stage: a Pipeline is a LatentDiffusion (ldm_jax/ldm.py)
plus the weights and facts its checkpoint or export recorded.
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
from ldm_jax.data import conditions
from ldm_jax.data.preprocess import to_float
from ldm_jax.data.text import ClipTokenizer, TextTokenizer, tokenizer_for
from ldm_jax.errors import JobError
from ldm_jax.first_stage import FirstStage, load_first_stage
from ldm_jax.ldm import LatentDiffusion, SampleSettings, tiled_decode  # noqa: F401 (re-export)
from ldm_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from ldm_jax.models.build import DTYPES, build_autoencoder, dtype_of, resolve_dtype


@dataclasses.dataclass
class Pipeline:
  """A loaded latent diffusion model: the model, its UNet and conditioning weights, the frozen
  autoencoder and the latent scale."""
  ldm: LatentDiffusion
  params: dict           # {'unet': ..., 'cond': ...}
  frozen: dict           # {'autoencoder': variables}
  scale_factor: float
  source: str
  # The compute dtype the model's config names ('auto' too); load_pipeline(dtype=...) may
  # sample in another.
  trained_dtype: str | None = None

  @property
  def config(self):
    return self.ldm.config

  @property
  def num_classes(self) -> int:
    return self.ldm.num_classes

  def latent_shape(self, batch: int, image_size: int | None = None):
    return self.ldm.latent_shape(batch, image_size)

  def condition_batch(self, n: int, labels=None, prompts=None, images=None, masks=None,
                      layouts=None, negative_prompts=None):
    """The batch dict the conditioner reads, for n samples. `layouts`: (boxes (n, N, 4) in
    [0, 1] of the canvas, classes (n, N), -1 = no box) for a layout model.
    `negative_prompts` replace a CLIP model's empty prompt as the guidance's null condition."""
    batch: dict[str, Any] = {}
    cond = self.ldm.cond
    if cond.context == "layout":
      if layouts is None:
        raise JobError("this model is layout-conditional: give box layouts (sample.py "
                       "--task=layout --inputs=<folder of .json box files>)")
      batch["boxes"] = np.asarray(layouts[0], np.float32).reshape(n, -1, 4)
      batch["box_classes"] = np.asarray(layouts[1], np.int32).reshape(n, -1)
    if cond.context == "class" or cond.adm:
      if labels is None:
        raise JobError(f"this model is class-conditional ({self.num_classes} classes): give "
                       f"class labels")
      batch["label"] = np.asarray(labels, np.int32).reshape(n)
    if cond.context == "text":
      if prompts is None:
        raise JobError("this model is text-conditional: give prompts")
      batch["tokens"] = self.ldm.tokenizer.encode(list(prompts))
      if negative_prompts is not None and self.ldm.cond.clip is not None:
        batch["null_tokens"] = self.ldm.tokenizer.encode(list(negative_prompts))
    if cond.concat:
      if images is None:
        raise JobError(f"this model concatenates a '{cond.concat}' condition: give images")
      example_fn = conditions.route_example_fn(self.config, train=False,
                                               latent_size=self.ldm.latent_size)
      seg = cond.concat == "segmentation"
      examples = [example_fn({"image": img, **({"segmentation": m} if seg else {})},
                             np.random.default_rng(i)) for i, (img, m) in enumerate(
                                 zip(images, masks if masks is not None else [None] * n))]
      for key in ("image", "lowres", "segmentation"):
        if key in examples[0]:
          batch[key] = np.stack([e[key] for e in examples])
      if "image" in batch and batch["image"].dtype == np.uint8:
        batch["image"] = to_float(batch["image"])
      if cond.concat == "inpaint":
        if masks is None:
          raise JobError("an inpainting model needs masks (1 = region to fill)")
        batch["mask"] = np.stack([np.asarray(m, np.float32).reshape(
            examples[0]["image"].shape[:2] + (1,)) for m in masks])
    return batch

  def make_generate(self, *, sampler=None, steps=None, eta=None, guidance_scale=None,
                    spacing=None, image_size=None, tile: int = 0, inpaint: bool = False,
                    tile_denoising: bool = False):
    """generate(params, frozen, seed_key, indices (B,), cond_batch) -> images (B, H, W, C).

    One compiled program serves every batch of a job. `image_size` larger than the training
    size samples larger latents (the UNet is convolutional); a spatial condition (a
    super-resolution input) sets the size itself. `tile` > 0 decodes in overlapping tiles of
    that many latent pixels, bounding the decoder's memory (and, with `tile_denoising`, the
    UNet's too). `inpaint` keeps cond_batch's 'image' outside its 'mask' (mask-blend).
    """
    settings = SampleSettings(sampler, steps, eta, guidance_scale, spacing)
    ldm, scale = self.ldm, self.scale_factor

    def generate(params, frozen, key, indices, cond_batch):
      return ldm.generate(params, frozen["autoencoder"], scale, key, indices, cond_batch,
                          settings, image_size, tile, inpaint, tile_denoising)

    return generate


def _single_device(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def _from_export(path: str, runtime: dict) -> Pipeline:
  variables, meta, config = load_inference(path)
  if meta.get("stage") != "ldm":
    raise CheckpointError(f"'{path}' exports a '{meta.get('stage')}' model; sampling needs an "
                          f"LDM export")
  config, trained_dtype = _with_runtime(ml_collections.ConfigDict(config), **runtime)
  ae_config = ml_collections.ConfigDict(meta["autoencoder_config"])
  module = build_autoencoder(ae_config.model, image_size=ae_config.data.image_size,
                             channels=ae_config.data.channels,
                             dtype=dtype_of(config.train.compute_dtype),
                             attention_impl=runtime["attention"] or "auto")
  first = FirstStage(module, variables["autoencoder"], ae_config, "export",
                     meta.get("first_stage") or {})
  tokenizer = None
  if meta.get("tokenizer"):
    kind = ClipTokenizer if config.cond.get("text_tokenizer") == "clip" else TextTokenizer
    tokenizer = kind(os.path.join(path, meta["tokenizer"]), config.cond.text_max_length)
  ldm = LatentDiffusion(config, first, num_classes=int(meta.get("num_classes", 0)),
                        tokenizer=tokenizer, clip_fields=meta.get("text_encoder"))
  params = {"unet": variables["unet"]["params"], "cond": variables["cond"]["params"]}
  return Pipeline(ldm, params, {"autoencoder": first.variables}, float(meta["scale_factor"]),
                  f"export {path}", trained_dtype)


def _from_stable_diffusion(path: str, runtime: dict, options: dict) -> Pipeline:
  """A Pipeline of an SD checkpoint converted in memory (interop/stable_diffusion.py)."""
  from ldm_jax.interop.stable_diffusion import load_stable_diffusion  # pylint: disable=g-import-not-at-top
  model = load_stable_diffusion(path, **options)
  config, trained_dtype = _with_runtime(ml_collections.ConfigDict(model.config.to_dict()),
                                        **runtime)
  ae_config = model.autoencoder_config
  module = build_autoencoder(ae_config.model, image_size=ae_config.data.image_size,
                             channels=ae_config.data.channels,
                             dtype=dtype_of(config.train.compute_dtype),
                             attention_impl=runtime["attention"] or "auto")
  first = FirstStage(module, model.autoencoder[1], ae_config, model.source)
  tokenizer = ClipTokenizer(config.cond.text_vocab, config.cond.text_max_length)
  ldm = LatentDiffusion(config, first, tokenizer=tokenizer, clip_fields=model.text_encoder)
  params = {"unet": model.unet[1]["params"], "cond": {"clip": model.cond[1]["params"]}}
  source = f"{model.source} ({', '.join(model.notes)})" if model.notes else model.source
  return Pipeline(ldm, params, {"autoencoder": first.variables}, float(model.scale_factor),
                  source, trained_dtype)


def _workdir_facts(path: str, checkpointer: Checkpointer):
  """(config, facts) of a stage-2 workdir: read from its latest checkpoint's metadata; runs
  from before checkpoints recorded them fall back to config.json and the weight shapes."""
  meta = checkpointer.read_meta()
  if meta.get("config") and meta.get("model") is not None:
    return ml_collections.ConfigDict(meta["config"]), meta["model"]
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"'{path}' has neither checkpoint metadata nor a config.json; it was "
                          f"not written by ldm_jax")
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  return config, {"num_classes": classes_in_weights(checkpointer.saved_shapes(), config)}


def _from_workdir(path: str, runtime: dict) -> Pipeline:
  checkpointer = Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
  if checkpointer.latest_step() is None:
    raise CheckpointError(f"'{path}/checkpoints' holds no checkpoint")
  config, facts = _workdir_facts(path, checkpointer)
  if config.get("stage") != "ldm":
    raise CheckpointError(f"'{path}' is a '{config.get('stage')}' run; sampling needs an LDM")
  config, trained_dtype = _with_runtime(config, **runtime)
  pinned = (facts.get("first_stage") or {}).get("step")
  first = load_first_stage(config.first_stage.checkpoint, config.first_stage.use_ema,
                           dtype_of(config.train.compute_dtype), step=pinned)
  if runtime["attention"] is not None:
    first = dataclasses.replace(first, module=first.module.clone(
        attention_impl=runtime["attention"]))
  recorded = facts.get("tokenizer")
  if recorded and os.path.isfile(recorded):
    tokenizer = TextTokenizer(recorded, config.cond.text_max_length)
  else:
    tokenizer = tokenizer_for(config.cond, path)
  clip_fields, frozen_clip = None, None
  if config.cond.get("text_encoder") == "clip":   # frozen in training: not in the checkpoint
    from ldm_jax.interop.stable_diffusion import load_text_encoder  # pylint: disable=g-import-not-at-top
    clip_fields, frozen_clip = load_text_encoder(config.cond.clip_weights,
                                                 config.cond.clip_layer)
  ldm = LatentDiffusion(config, first, num_classes=int(facts.get("num_classes") or 0),
                        tokenizer=tokenizer, clip_fields=clip_fields)
  abstract = ldm.abstract_params()
  key = "ema_params" if config.train.ema_decay > 0 else "params"
  restored = checkpointer.restore_subtree({
      key: _single_device(abstract),
      "model_state": _single_device({"scale_factor": jax.ShapeDtypeStruct((), jnp.float32)})})
  params = restored[key]
  if frozen_clip is not None:
    params = LatentDiffusion.with_frozen(params, {"text_encoder": frozen_clip["params"]})
  return Pipeline(ldm, params, {"autoencoder": first.variables},
                  float(restored["model_state"]["scale_factor"]),
                  f"{path} step {checkpointer.latest_step()}", trained_dtype)


def load_pipeline(path: str, *, dtype: str | None = None, attention: str | None = None,
                  sd_options: dict | None = None) -> Pipeline:
  """A Pipeline from an inference export, a stage-2 training workdir (EMA weights), or a
  Stable Diffusion checkpoint (a diffusers pipeline folder or a single file; `sd_options`:
  prediction, scale_factor, tokenizer, yaml, as interop.stable_diffusion takes them).

  `dtype` ('auto', 'float32', 'bfloat16') is the compute dtype of the UNet, the conditioning
  encoder and the autoencoder (the weights stay as stored); `attention` ('auto', 'xla',
  'cudnn') the attention kernel of the UNet and the autoencoder. None keeps the config's.
  """
  if dtype is not None and dtype not in COMPUTE_DTYPES:
    raise JobError(f"--dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
  if attention is not None and attention not in ATTENTION_IMPLS:
    raise JobError(f"--attention: expected one of {', '.join(ATTENTION_IMPLS)}, got "
                   f"{attention!r}")
  runtime = {"dtype": dtype, "attention": attention}
  if is_inference_export(path):
    return _from_export(path, runtime)
  from ldm_jax.interop import stable_diffusion  # pylint: disable=g-import-not-at-top
  if stable_diffusion.is_stable_diffusion(path):
    return _from_stable_diffusion(path, runtime, sd_options or {})
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise CheckpointError(f"'{path}' is neither an ldm_jax export nor a training workdir (no "
                          f"meta.json or checkpoints/)")
  return _from_workdir(path, runtime)


COMPUTE_DTYPES = ("auto", *DTYPES)


def _with_runtime(config, *, dtype: str | None, attention: str | None):
  """(config, its own compute dtype): the config set to sample with another compute dtype and
  attention kernel (None keeps the config's). Modules are built from the config, so this
  changes what they compute in, never the stored weights. 'auto' is resolved here (to bfloat16
  on GPU/TPU, float32 on CPU), so the config names the dtype the samples are computed in."""
  trained = config.train.compute_dtype
  if dtype is not None:
    config.train.compute_dtype = resolve_dtype(dtype)
  if attention is not None:
    config.unet.attention_impl = attention
  return config, trained


def classes_in_weights(shapes: dict[str, tuple], config) -> int:
  """The class count of a checkpoint written before checkpoints recorded it, read off its label
  embedding's rows."""
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
  if isinstance(pipeline.ldm.tokenizer, ClipTokenizer):   # a folder of files
    tokenizer, folder = "tokenizer", pipeline.ldm.tokenizer.path
    extra = {f"{tokenizer}/{f}": os.path.join(folder, f) for f in sorted(os.listdir(folder))
             if os.path.isfile(os.path.join(folder, f))}
  elif pipeline.ldm.tokenizer is not None:
    tokenizer = "tokenizer" + (".json" if pipeline.ldm.tokenizer.path.endswith(".json")
                               else ".txt")
    extra[tokenizer] = pipeline.ldm.tokenizer.path
  first = pipeline.ldm.first
  meta = {"stage": "ldm", "scale_factor": pipeline.scale_factor,
          "num_classes": pipeline.num_classes, "dtype": dtype, "tokenizer": tokenizer,
          "text_encoder": pipeline.ldm.clip_fields,
          "autoencoder_config": json.loads(first.config.to_json_best_effort()),
          "first_stage": dict(first.identity, source=first.source),
          "source": pipeline.source}
  return save_inference(out, variables, config=pipeline.config, meta=meta, extra_files=extra)
