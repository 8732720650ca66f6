"""A latent dataset: the training split encoded once by the frozen autoencoder, in shards.

Stage 2 then trains without an autoencoder forward pass per step. KL posteriors are stored as
moments [mean | logvar] so every step still samples a fresh latent; VQ models store the
pre-quantisation latent. Images are centre-cropped (no random crops); data.random_flip flips
the latents. Latents are stored as first_stage.latent_dtype: bfloat16 (the default, half the
disk and host memory; kept as its raw 16-bit pattern so numpy can memory-map it, and turned
into float32 inside the jitted step by preprocess.model_inputs) or float32.

Layout of <dir>:
  manifest.json          written before the first shard: fingerprint, count, shape, dtype,
                         shard_size, num_classes, the condition names
  shards/00000/ ...      shard k holds examples [k*S, min((k+1)*S, N)) of the source, S =
                         first_stage.latent_shard_size: latents.npy, labels.npy (if labelled),
                         <name>.npy per spatial condition (e.g. lowres.npy, segmentation.npy,
                         aligned with the cached crop), captions.json (if captioned)
  complete.json          written last; a cache without it is refused

Shards are addressed by global example index, not by host: any host reads any example, so a
run may resume on a different number of hosts. Every host takes part in the encoding (each
feeds its slice of every global batch); the results are gathered and host 0 writes, so <dir>
must be visible to every host. A shard is written into a temporary folder and renamed into
place whole (ldm_jax.fileio), so an interrupted build leaves finished shards and no half-written
one: rerunning with the same fingerprint encodes only the missing shards, and the result equals
an uninterrupted build (batches start at multiples of the global batch either way, so every
example is encoded in the same batch).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import threading
import time

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import fileio
from ldm_jax.data import preprocess
from ldm_jax.data.pipeline import InputPipeline, to_global
from ldm_jax.data.sources import DataError, Source
from ldm_jax.errors import ConfigError

logger = logging.getLogger("ldm_jax")

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
LOG_EVERY_SHARDS = 10     # progress line every this many shards written
_OPEN_SHARDS = 256        # memory-mapped shards a LatentCacheSource keeps open
_TEMPORARY = re.compile(r"^\.\d+\..*\.tmp$")   # fileio.temporary_name of a shard folder


def _shard_dir(directory: str, k: int) -> str:
  return os.path.join(directory, "shards", f"{k:05d}")


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class LatentCacheSource(Source):
  """Random access to a finished cache; shards are memory-mapped on first use.

  Pickles cheaply (open shards are dropped), so it can be sent to data-loading workers.
  """

  def __init__(self, directory: str):
    if not os.path.exists(os.path.join(directory, "complete.json")):
      raise DataError(f"first_stage.latent_cache: '{directory}' is not a finished latent cache; "
                      f"rerun the build (it resumes) or point first_stage.latent_cache elsewhere")
    manifest = os.path.join(directory, "manifest.json")
    if not os.path.exists(manifest):
      raise DataError(f"first_stage.latent_cache: '{directory}' has no manifest.json (an older "
                      f"cache format); delete it to rebuild it")
    self.directory = directory
    self.info = _read_json(manifest)
    self.count = int(self.info["count"])
    self.shard_size = int(self.info["shard_size"])
    self.dtype = DTYPES[self.info["dtype"]]
    self.conditions = list(self.info.get("conditions", []))
    self.num_classes = int(self.info.get("num_classes", 0))
    self.description = (f"latent cache {directory}: {self.count} latents "
                        f"{tuple(self.info['shape'])} {self.info['dtype']}")
    self._reset()

  def _reset(self):
    self._open: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_open"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def __len__(self):
    return self.count

  def _shard(self, k: int) -> dict:
    with self._lock:
      if k in self._open:
        self._open.move_to_end(k)
        return self._open[k]
    folder = _shard_dir(self.directory, k)
    if not os.path.isdir(folder):
      raise DataError(f"first_stage.latent_cache: shard '{folder}' is missing; delete "
                      f"'{self.directory}' to rebuild the cache")
    latents = np.load(os.path.join(folder, "latents.npy"), mmap_mode="r")
    shard = {"latent": latents.view(self.dtype) if self.dtype != np.float32 else latents}
    if self.info.get("labelled"):
      shard["label"] = np.load(os.path.join(folder, "labels.npy"))
    for name in self.conditions:
      shard[name] = np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
      if name == "context" and self.dtype != np.float32:   # stored like the latents
        shard[name] = shard[name].view(self.dtype)
    if self.info.get("captioned"):
      shard["caption"] = _read_json(os.path.join(folder, "captions.json"))
    with self._lock:
      self._open[k] = shard
      while len(self._open) > _OPEN_SHARDS:
        self._open.popitem(last=False)
    return shard

  def _locate(self, index: int) -> tuple[dict, int]:
    index = int(index)
    if index < 0:
      index += self.count
    if not 0 <= index < self.count:
      raise IndexError(f"latent cache index {index} out of range ({self.count} examples)")
    return self._shard(index // self.shard_size), index % self.shard_size

  def __getitem__(self, index):
    shard, i = self._locate(index)
    example = {}
    for key, values in shard.items():
      if key == "label":
        example[key] = int(values[i])
      elif key == "caption":
        example[key] = values[i]
      else:
        example[key] = np.asarray(values[i])
    return example

  def caption(self, index: int) -> str:
    """The cached caption of example `index` ('' if the cache has none); reads no latents."""
    if not self.info.get("captioned"):
      return ""
    shard, i = self._locate(index)
    return shard["caption"][i]


def _check_manifest(directory: str, info: dict, fingerprint: dict, layout: dict):
  if info.get("fingerprint") != fingerprint:
    raise DataError(f"first_stage.latent_cache: '{directory}' was built from "
                    f"{info.get('fingerprint')}, not {fingerprint}; delete it or point "
                    f"first_stage.latent_cache elsewhere")
  found = {k: info.get(k) for k in layout}
  if found != layout:
    raise DataError(f"first_stage.latent_cache: '{directory}' holds {found}, not {layout}; "
                    f"delete it or point first_stage.latent_cache elsewhere")


def _write_shard(directory: str, k: int, arrays: dict[str, np.ndarray], captions):
  """Writes one shard into a temporary folder and renames it into place."""
  final = _shard_dir(directory, k)
  tmp = fileio.temporary_name(final)
  os.makedirs(tmp)
  try:
    for name, values in arrays.items():
      if values.dtype == ml_dtypes.bfloat16:
        values = values.view(np.uint16)   # numpy cannot save bfloat16 itself
      np.save(os.path.join(tmp, f"{name}.npy"), values)
    if captions is not None:
      with open(os.path.join(tmp, "captions.json"), "w", encoding="utf-8") as f:
        json.dump(captions, f)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def build_latent_cache(directory: str, source: Source, example_fn, encode_fn, *,
                       fingerprint: dict, global_batch: int, batch_sharding, num_classes: int,
                       shard_size: int = 4096, dtype: str = "bfloat16", workers: int = 0,
                       prefetch: int = 2, on_bad_image: str = "error",
                       context_fn=None) -> LatentCacheSource:
  """Encodes every example of `source` (in order) into shards, unless a finished matching
  cache exists; resumes an interrupted build of the same fingerprint.

  encode_fn(images) -> latents, traced inside a jit over the mesh; it gets float32 images in
  [-1, 1] whether example_fn returns uint8 or float images. Every array example_fn returns
  besides 'image' and 'label' (a spatial condition) is stored too, as <name>.npy. Images are
  read ahead by `prefetch` threads or `workers` processes (data.workers, data.prefetch).
  context_fn(tokens) -> contexts (a frozen text encoder, traced like encode_fn) stores each
  example's 'context' too, from the 'tokens' example_fn returns.
  """
  if dtype not in DTYPES:
    raise ConfigError(f"first_stage.latent_dtype: '{dtype}' is not one of {sorted(DTYPES)}")
  if shard_size < 1:
    raise ConfigError(f"first_stage.latent_shard_size: {shard_size} must be at least 1")
  n = len(source)
  layout = {"count": n, "shard_size": shard_size, "dtype": dtype}
  manifest_path = os.path.join(directory, "manifest.json")
  marker = os.path.join(directory, "complete.json")
  shards = os.path.join(directory, "shards")
  manifest = None
  if os.path.exists(manifest_path):
    manifest = _read_json(manifest_path)
  elif os.path.exists(marker):   # an older single-file cache: its fingerprint tells
    manifest = _read_json(marker)
  if manifest is not None:
    _check_manifest(directory, manifest, fingerprint, layout)
    if os.path.exists(marker):
      return LatentCacheSource(directory)
  elif os.path.isdir(shards) and any(not e.startswith(".") for e in os.listdir(shards)):
    raise DataError(f"first_stage.latent_cache: '{directory}' holds shards but no "
                    f"manifest.json; delete it or point first_stage.latent_cache elsewhere")

  lead = jax.process_index() == 0
  num_shards = -(-n // shard_size)
  if lead:
    os.makedirs(shards, exist_ok=True)
    for entry in os.listdir(shards):   # shards a killed build left half-written
      if _TEMPORARY.match(entry):
        shutil.rmtree(os.path.join(shards, entry), ignore_errors=True)
  done = np.array([os.path.isdir(_shard_dir(directory, k)) for k in range(num_shards)])
  if jax.process_count() > 1:   # host 0's view decides, so every host encodes the same batches
    done = np.asarray(multihost_utils.broadcast_one_to_all(done)).astype(bool)
  missing = [k for k in range(num_shards) if not done[k]]
  if missing:
    logger.info("latent cache: %d of %d shards to encode into %s", len(missing), num_shards,
                directory)

  store = DTYPES[dtype]
  encode = jax.jit(lambda x: encode_fn(preprocess.model_inputs({"image": x})["image"])
                   .astype(store))
  contexts = None if context_fn is None else jax.jit(lambda t: context_fn(t).astype(store))
  captioned = "caption" in source[0]
  # Batches start at multiples of global_batch whatever is missing, so a resumed build encodes
  # every example in the same batch as an uninterrupted one; a batch that straddles two
  # shards feeds both.
  def span(k):
    return k * shard_size, min((k + 1) * shard_size, n)

  plan = sorted({j for k in missing for j in range(span(k)[0] // global_batch,
                                                   -(-span(k)[1] // global_batch))})
  pipe = InputPipeline(source, example_fn, global_batch=global_batch, seed=0, shuffle=False,
                       workers=workers, prefetch=prefetch, on_bad_image=on_bad_image)
  reader = pipe.read(plan)   # read ahead (threads or worker processes) while the device encodes
  t0, written, encoded_examples = time.time(), 0, 0
  buffers: dict[int, dict[str, np.ndarray]] = {}   # host 0's shards being filled
  filled: dict[int, int] = {}
  try:
    for j, local in zip(plan, reader):
      encoded = encode(to_global({"image": local["image"]}, batch_sharding)["image"])
      batch = {"latents": encoded}
      if contexts is not None:
        batch["context"] = contexts(to_global({"t": local["tokens"]}, batch_sharding)["t"])
      if "label" in local:
        batch["labels"] = local["label"]
      batch.update({key: v for key, v in local.items() if key not in ("image", "label")
                    and np.asarray(v).dtype.kind in "biuf"})
      batch = {key: np.asarray(v) for key, v in
               multihost_utils.process_allgather(batch, tiled=True).items()}
      if not lead:
        continue
      if manifest is None:
        manifest = {"fingerprint": fingerprint, **layout,
                    "shape": list(batch["latents"].shape[1:]), "num_classes": num_classes,
                    "labelled": "labels" in batch, "captioned": captioned,
                    "conditions": sorted(set(batch) - {"latents", "labels"})}
        fileio.atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
      start = j * global_batch
      stop = min(start + global_batch, n)
      for k in range(start // shard_size, (stop - 1) // shard_size + 1):
        if done[k]:
          continue
        first, end = span(k)
        if k not in buffers:
          buffers[k] = {key: np.zeros((end - first,) + v.shape[1:], v.dtype)
                        for key, v in batch.items()}
          filled[k] = 0
        lo, hi = max(first, start), min(end, stop)
        for key, v in batch.items():
          buffers[k][key][lo - first:hi - first] = v[lo - start:hi - start]
        filled[k] += hi - lo
        if filled[k] < end - first:
          continue
        # Captions are strings, which do not travel through device arrays: host 0 reads them.
        captions = [source.caption(e) for e in range(first, end)] if captioned else None
        _write_shard(directory, k, buffers.pop(k), captions)
        written, encoded_examples = written + 1, encoded_examples + end - first
        if written % LOG_EVERY_SHARDS == 0 or written == len(missing):
          logger.info("latent cache: %d/%d shards written (%.0f examples/s)", written,
                      len(missing), encoded_examples / max(time.time() - t0, 1e-9))
  finally:
    reader.close()
    pipe.close()
  if lead:
    fileio.atomic_write_text(marker, json.dumps({"count": n, "num_shards": num_shards,
                                                 "fingerprint": fingerprint}))
    logger.info("latent cache: %d latents in %d shards at %s (%.0f s)", n, num_shards,
                directory, time.time() - t0)
  multihost_utils.sync_global_devices("ldm_jax latent cache")
  return LatentCacheSource(directory)
