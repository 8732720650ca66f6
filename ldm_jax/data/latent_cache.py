"""A latent dataset: the training split encoded once by the frozen autoencoder.

Stage 2 then trains without an autoencoder forward pass per step. KL posteriors are stored as
moments [mean | logvar] so every step still samples a fresh latent; VQ models store the
pre-quantisation latent. Images are centre-cropped (no random crops); data.random_flip flips
the latents. Files: latents.npy (N, h, w, C), labels.npy, captions.json, one <name>.npy per
spatial condition the route needs (e.g. lowres.npy, segmentation.npy, aligned with the cached
crop), and complete.json, written last, which records what was encoded so a stale cache is
refused. Every file is written under a temporary name and renamed into place (ldm_jax.fileio), so
an interrupted build leaves no half-written file under a final name.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import fileio
from ldm_jax.data.pipeline import InputPipeline, to_global
from ldm_jax.data.sources import DataError, Source

logger = logging.getLogger("ldm_jax")


class LatentCacheSource(Source):
  """Random access to a finished cache (memory-mapped)."""

  def __init__(self, directory: str):
    marker = os.path.join(directory, "complete.json")
    if not os.path.exists(marker):
      raise DataError(f"first_stage.latent_cache: '{directory}' is not a finished latent cache")
    with open(marker, encoding="utf-8") as f:
      self.info = json.load(f)
    self.latents = np.load(os.path.join(directory, "latents.npy"), mmap_mode="r")
    labels = os.path.join(directory, "labels.npy")
    self.labels = np.load(labels) if os.path.exists(labels) else None
    captions = os.path.join(directory, "captions.json")
    self.captions = None
    if os.path.exists(captions):
      with open(captions, encoding="utf-8") as f:
        self.captions = json.load(f)
    self.num_classes = int(self.info.get("num_classes", 0))
    self.conditions = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
                       for name in self.info.get("conditions", [])}
    self.description = f"latent cache {directory}: {len(self.latents)} latents " \
                       f"{tuple(self.latents.shape[1:])}"

  def __len__(self):
    return len(self.latents)

  def __getitem__(self, index):
    example = {"latent": np.asarray(self.latents[index])}
    if self.labels is not None:
      example["label"] = int(self.labels[index])
    if self.captions is not None:
      example["caption"] = self.captions[index]
    for name, values in self.conditions.items():
      example[name] = np.asarray(values[index])
    return example


def build_latent_cache(directory: str, source: Source, example_fn, encode_fn, *,
                       fingerprint: dict, global_batch: int, batch_sharding,
                       num_classes: int) -> LatentCacheSource:
  """Encodes every example of `source` (in order) unless a matching cache exists.

  encode_fn(images) -> latents, jitted over the mesh. Host 0 writes; all hosts wait for it.
  Every array example_fn returns besides 'image' and 'label' (a spatial condition) is stored
  too, as <name>.npy.
  """
  marker = os.path.join(directory, "complete.json")
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      info = json.load(f)
    if info.get("fingerprint") != fingerprint:
      raise DataError(f"first_stage.latent_cache: '{directory}' was built from "
                      f"{info.get('fingerprint')}, not {fingerprint}; delete it or point "
                      f"first_stage.latent_cache elsewhere")
    return LatentCacheSource(directory)
  n = len(source)
  os.makedirs(directory, exist_ok=True)
  pipe = InputPipeline(source, example_fn, global_batch=global_batch, seed=0, shuffle=False)
  lead = jax.process_index() == 0
  latents = labels = None
  conditions: dict[str, np.ndarray] = {}
  captions = [] if "caption" in source[0] else None
  partial: dict[str, str] = {}   # final path -> its temporary, renamed into place at the end

  def temporary(name: str) -> str:
    final = os.path.join(directory, name)
    partial[final] = fileio.temporary_name(final)
    return partial[final]

  t0 = time.time()
  try:
    for start in range(0, n, global_batch):
      local = pipe.batch_at(start)
      encoded = encode_fn(to_global({"image": local["image"]}, batch_sharding)["image"])
      out = np.asarray(multihost_utils.process_allgather(encoded, tiled=True))
      count = min(global_batch, n - start)
      if "label" in local:
        batch_labels = np.asarray(multihost_utils.process_allgather(local["label"], tiled=True))
      extra = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
               for k, v in local.items() if k not in ("image", "label")}
      if lead:
        if latents is None:
          latents = np.lib.format.open_memmap(temporary("latents.npy"), "w+", np.float32,
                                              (n,) + out.shape[1:])
          labels = np.zeros((n,), np.int32) if "label" in local else None
          conditions = {k: np.lib.format.open_memmap(temporary(f"{k}.npy"), "w+", v.dtype,
                                                     (n,) + v.shape[1:])
                        for k, v in extra.items()}
        latents[start:start + count] = out[:count]
        if labels is not None:
          labels[start:start + count] = batch_labels[:count]
        for k, v in extra.items():
          conditions[k][start:start + count] = v[:count]
        if captions is not None:
          # Captions are strings, which do not travel through device arrays: host 0 reads them.
          captions += [source[i]["caption"] for i in range(start, start + count)]
      if (start // global_batch) % 50 == 0:
        logger.info("latent cache: %d/%d encoded (%.0f images/s)", start + count, n,
                    (start + count) / max(time.time() - t0, 1e-9))
  except BaseException:
    for tmp in partial.values():
      if os.path.exists(tmp):
        os.remove(tmp)
    raise
  finally:
    pipe.close()
  if lead:
    latents.flush()
    for values in conditions.values():
      values.flush()
    for final, tmp in partial.items():
      os.replace(tmp, final)
    if labels is not None:
      with fileio.atomic_path(os.path.join(directory, "labels.npy")) as tmp:
        np.save(tmp, labels)
    if captions is not None:
      fileio.atomic_write_text(os.path.join(directory, "captions.json"), json.dumps(captions))
    fileio.atomic_write_text(marker, json.dumps({
        "count": n, "shape": list(latents.shape[1:]), "fingerprint": fingerprint,
        "num_classes": num_classes, "conditions": sorted(conditions)}))
    logger.info("latent cache: %d latents written to %s in %.0f s", n, directory,
                time.time() - t0)
  multihost_utils.sync_global_devices("ldm_jax latent cache")
  return LatentCacheSource(directory)
