"""Input pipeline throughput: the grain pipeline against the thread pool it replaced, the latent
cache against the stage-2 step it feeds, and a real training step fed by the pipeline against
the same step fed one batch already in memory.

  python benchmarks/input_pipeline.py [--images=512] [--out=results.json]

1. images/s of decode + random crop + flip to 256x256 uint8 batches of 64, from a folder of
   JPEGs of 288-320 px made here by upscaling CIFAR-10 test images (../shared/data): the old
   thread pool (benchmarks/legacy_thread_pipeline.py) and grain with 0, 1 and 2 workers;
2. latents/s read from a latent cache of ImageNet KL-f8 shape (32x32x4 moments, i.e. 32x32x8),
   bf16 and f32, through the same pipeline, and the shard sizes;
3. steps/s of the quickstart's LDM (ldm_jax.quickstart.ldm_config, on a 1-step autoencoder)
   fed by its real pipeline (digits, device prefetch) vs by one batch kept on the device, and
   the ratio of (2)'s latents/s to the samples/s this stage-2 step consumes.

Prints one JSON object (and writes it to --out); rows go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.legacy_thread_pipeline import ThreadPoolPipeline  # noqa: E402
from ldm_jax import config as config_lib  # noqa: E402
from ldm_jax.data import conditions  # noqa: E402
from ldm_jax.data.latent_cache import build_latent_cache  # noqa: E402
from ldm_jax.data.pipeline import DevicePrefetch, InputPipeline  # noqa: E402
from ldm_jax.data.preprocess import image_example_fn  # noqa: E402
from ldm_jax.data.sources import ArraySource, ImageFolderSource  # noqa: E402

CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                     "cifar10", "cifar10-test-jpeg.tar.gz")


def make_jpeg_folder(folder: str, count: int) -> str:
  """`count` CIFAR-10 test images upscaled (bicubic) to 288-320 px JPEGs (quality 90)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  made = 0
  with tarfile.open(CIFAR) as tar:
    for member in tar:
      if made == count:
        break
      if not member.isfile():
        continue
      image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
      h, w = (int(v) for v in rng.integers(288, 321, 2))
      image.resize((w, h), Image.Resampling.BICUBIC).save(
          os.path.join(folder, f"{made:05d}.jpg"), quality=90)
      made += 1
  return folder


def rate(pipe, batch: int, batches: int, warmup: int = 2) -> float:
  """Examples/s over `batches` batches after `warmup` (start-up and worker spawn excluded)."""
  for _ in range(warmup):
    next(pipe)
  t = time.perf_counter()
  for _ in range(batches):
    next(pipe)
  return batch * batches / (time.perf_counter() - t)


def images_per_second(folder: str, batches: int) -> dict:
  c = config_lib.defaults("autoencoder")
  c.data.image_size, c.data.random_crop, c.data.random_flip = 256, True, True
  source = ImageFolderSource(folder)
  fn = image_example_fn(c.data, train=True)
  out = {}
  old = ThreadPoolPipeline(source, fn, global_batch=64, seed=0, num_threads=16, prefetch=2)
  out["thread_pool (16 threads, old default)"] = rate(old, 64, batches)
  old.close()
  for workers in (0, 1, 2):
    pipe = InputPipeline(source, fn, global_batch=64, seed=0, workers=workers, prefetch=2)
    out[f"grain, {workers} workers"] = rate(pipe, 64, batches)
    pipe.close()
  return {k: round(v, 1) for k, v in out.items()}


def latent_cache_rates(directory: str, count: int) -> dict:
  """Builds caches of `count` 32x32x8 moments (a stand-in encoder) and reads them back."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images = np.random.default_rng(0).integers(0, 256, (count, 8, 8, 2), np.uint8)
  source = ArraySource(images, labels=np.arange(count) % 1000)

  def encode(x):   # (B, 8, 8, 2) -> (B, 32, 32, 8): any function of the image will do
    return jax.numpy.tile(x, (1, 4, 4, 4))

  out = {}
  for dtype in ("bfloat16", "float32"):
    cache = build_latent_cache(os.path.join(directory, dtype), source,
                               lambda e, rng: {"image": e["image"],
                                               "label": np.int32(e["label"])},
                               encode, fingerprint={"bench": dtype}, global_batch=64,
                               batch_sharding=sharding, num_classes=1000, shard_size=1024,
                               dtype=dtype)
    shard = os.path.join(directory, dtype, "shards", "00000", "latents.npy")
    out[f"{dtype} shard bytes"] = os.path.getsize(shard)
    pipe = InputPipeline(cache, lambda e, rng: conditions.cached_example(e, rng, flip=True),
                         global_batch=64, seed=0, workers=0, prefetch=2)
    out[f"{dtype} latents/s"] = round(rate(pipe, 64, count // 64), 1)
    pipe.close()
  out["bf16 / f32 size"] = round(out["bfloat16 shard bytes"] / out["float32 shard bytes"], 3)
  return out


def training_steps(workdir: str, steps: int) -> dict:
  """The quickstart LDM's steps/s fed by its pipeline vs by one batch kept on the device."""
  from ldm_jax import quickstart  # pylint: disable=g-import-not-at-top
  from ldm_jax.training.loop import Trainer, train_and_evaluate  # pylint: disable=g-import-not-at-top
  ae_dir = os.path.join(workdir, "autoencoder")
  train_and_evaluate(quickstart.autoencoder_config(steps=1), ae_dir,
                     devices=jax.devices()[:1])
  config = quickstart.ldm_config(ae_dir, steps=10_000)
  trainer = Trainer(config, os.path.join(workdir, "ldm"), devices=jax.devices()[:1])
  try:
    real = DevicePrefetch(trainer.pipeline, trainer.batch_sharding)
    fixed = next(real)
    state = trainer.state

    def run(feed) -> float:
      nonlocal state
      state, metrics = trainer.train_step(state, feed(), trainer.frozen)   # compiled already
      jax.block_until_ready(metrics)
      t = time.perf_counter()
      for _ in range(steps):
        state, metrics = trainer.train_step(state, feed(), trainer.frozen)
      jax.block_until_ready(metrics)
      return steps / (time.perf_counter() - t)

    run(lambda: fixed)   # compile
    rounds = {"real": [], "in_memory": []}
    for _ in range(3):   # interleaved, so drifts in the machine's speed hit both alike
      rounds["real"].append(run(lambda: next(real)))
      rounds["in_memory"].append(run(lambda: fixed))
    real_rate, memory_rate = (float(np.median(v)) for v in rounds.values())
    trainer.state = state
  finally:
    trainer.close()
  return {"batch": config.train.batch_size, "steps/s real pipeline": round(real_rate, 3),
          "steps/s in-memory batch": round(memory_rate, 3),
          "real / in-memory": round(real_rate / memory_rate, 3),
          "samples/s consumed": round(real_rate * config.train.batch_size, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=512, help="JPEGs in the benchmark folder")
  parser.add_argument("--batches", type=int, default=6, help="timed batches of 64 per variant")
  parser.add_argument("--latents", type=int, default=4096, help="latents in the cache")
  parser.add_argument("--steps", type=int, default=20, help="timed training steps per round")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args()
  results = {"cores": os.cpu_count(), "jax_devices": len(jax.devices())}
  with tempfile.TemporaryDirectory() as tmp:
    folder = make_jpeg_folder(os.path.join(tmp, "jpegs"), args.images)
    results["images/s (256 px, batch 64)"] = images_per_second(folder, args.batches)
    results["latent cache (32x32x8, batch 64)"] = latent_cache_rates(
        os.path.join(tmp, "latents"), args.latents)
    results["quickstart LDM step"] = training_steps(os.path.join(tmp, "train"), args.steps)
  step = results["quickstart LDM step"]
  results["latent reads / stage-2 consumption"] = round(
      results["latent cache (32x32x8, batch 64)"]["bfloat16 latents/s"]
      / step["samples/s consumed"], 1)
  text = json.dumps(results, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
