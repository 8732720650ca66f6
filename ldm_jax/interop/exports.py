"""ldm_jax inference exports of converted models, with the layout and metadata that
ldm_jax.inference.export_pipeline and `python -m ldm_jax.export` write, so sample.py,
load_pipeline and load_first_stage read them like exports of trained models."""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp

from ldm_jax.checkpoint import save_inference
from ldm_jax.interop.weights import UnsupportedError
from ldm_jax.data.text import clip_tokenizer_dir
from ldm_jax.models.clip import CLIPTextEncoder
from ldm_jax.models.conditioning import ClassEmbedder


def export_ldm(out: str, model, dtype: str = "float32") -> str:
  """Writes an LDM export (components unet, cond, autoencoder) of a converted model (a
  CompVisModel, or a Stable Diffusion one: interop/stable_diffusion.py); `dtype` 'bfloat16'
  halves its size as export_pipeline does. A CLIP text encoder rides in cond/clip with its
  tokenizer files in tokenizer/."""
  if model.config is None:
    why = "; ".join(model.unsupported.values()) or "it is not a LatentDiffusion checkpoint"
    raise UnsupportedError(f"{model.source}: no LDM export ({why})")
  config = copy.deepcopy(model.config)
  config.first_stage.checkpoint = os.path.abspath(out)   # the export holds its autoencoder
  cond, extra, tokenizer = {}, {}, None
  if model.cond:   # the Conditioner's names: 'class' (ClassEmbedder), 'clip', 'rescaler'
    name = ("class" if isinstance(model.cond[0], ClassEmbedder) else
            "clip" if isinstance(model.cond[0], CLIPTextEncoder) else "rescaler")
    cond = {name: model.cond[1]["params"]}
  if config.cond.get("text_encoder") == "clip":
    config.cond.clip_weights = os.path.abspath(out)      # the export holds its text encoder
    folder = clip_tokenizer_dir(config.cond.text_vocab)
    tokenizer = "tokenizer"
    extra = {f"{tokenizer}/{f}": os.path.join(folder, f) for f in sorted(os.listdir(folder))
             if os.path.isfile(os.path.join(folder, f))}
    config.cond.text_vocab = os.path.join(os.path.abspath(out), tokenizer)
  cast = (lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x) \
      if dtype == "bfloat16" else (lambda x: x)
  variables = jax.tree_util.tree_map(cast, {
      "unet": model.unet[1], "cond": {"params": cond}, "autoencoder": model.autoencoder[1]})
  source = f"{model.source} ({', '.join(model.notes)})" if model.notes else model.source
  meta = {"stage": "ldm", "scale_factor": float(model.scale_factor),
          "num_classes": int(model.num_classes), "dtype": dtype, "tokenizer": tokenizer,
          "text_encoder": model.text_encoder,
          "autoencoder_config": json.loads(model.autoencoder_config.to_json_best_effort()),
          "first_stage": {"path": None, "step": None, "ema": None, "source": model.source},
          "source": source}
  return save_inference(out, variables, config=config, meta=meta, extra_files=extra)


def export_autoencoder(out: str, variables, config, source: str) -> str:
  """Writes a stage-1 export {'autoencoder': variables} (meta stage 'autoencoder')."""
  return save_inference(out, {"autoencoder": variables}, config=config,
                        meta={"stage": "autoencoder", "source": source})
