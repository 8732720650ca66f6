"""Sample quality against a reference set: FID, KID, Inception Score, precision/recall.

  # samples (a folder of images or an .npz of uint8 NHWC images) against a reference
  python -m ldm_jax.evaluate --samples=runs/job/images --reference=data/val_images \\
      --weights=inception_fid.npz --out=runs/eval
  # a checkpoint: sample first (the resumable sampling job, in <out>/samples), then evaluate
  python -m ldm_jax.evaluate --checkpoint=runs/ldm --num_samples=10000 --steps=50 \\
      --reference=tfds:imagenet2012:validation --weights=inception_fid.npz --out=runs/eval

--reference is an image folder, an .npz of images, `tfds:NAME:SPLIT` (a prepared tfds
dataset), or a statistics .npz (mu, sigma: the files other FID tools publish; FID only).
Statistics of a reference image set are cached in --cache_dir keyed by its path, split, count
and the preprocessing, and reused. Features: the FID Inception (ldm_jax.evaluation.inception),
images resized to 299 as pytorch-fid does. Prints one JSON line and writes <out>/metrics.json.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from ldm_jax import fileio
from ldm_jax.cli import ArgumentParser, friendly_errors, setup_logging
from ldm_jax.data.sources import ArraySource, ImageFolderSource, Source, TfdsSource, Subset
from ldm_jax.errors import DataError
from ldm_jax.evaluation import features as features_lib
from ldm_jax.evaluation import metrics

logger = logging.getLogger("ldm_jax")
METRICS = ("fid", "kid", "is", "pr")


def open_images(spec: str, what: str) -> Source:
  """An image set: a folder (any depth), an .npz of images ('images' or its only array), or
  'tfds:NAME:SPLIT'."""
  if spec.startswith("tfds:"):
    parts = spec.split(":")
    if len(parts) != 3:
      raise DataError(f"{what}: expected tfds:NAME:SPLIT, got '{spec}'")
    return TfdsSource(parts[1], parts[2], prepare=False, label_key="", channels=3)
  if os.path.isdir(spec):
    return ImageFolderSource(spec, 3)
  if spec.endswith(".npz") and os.path.isfile(spec):
    with np.load(spec) as data:
      key = "images" if "images" in data.files else (data.files[0] if len(data.files) == 1
                                                      else None)
      if key is None:
        raise DataError(f"{what}: '{spec}' has no 'images' array (found {data.files})")
      images = np.asarray(data[key])
    if images.dtype != np.uint8 or images.ndim != 4:
      raise DataError(f"{what}: '{spec}' holds {images.dtype} {images.shape}; expected uint8 "
                      f"images (N, H, W, C)")
    return ArraySource(images, description=spec)
  raise DataError(f"{what}: '{spec}' is not an image folder, an .npz or tfds:NAME:SPLIT")


def _is_statistics(spec: str) -> bool:
  if not (spec.endswith(".npz") and os.path.isfile(spec)):
    return False
  with np.load(spec) as data:
    return "mu" in data.files and "sigma" in data.files


def _limit(source: Source, count: int) -> Source:
  return source if not count or count >= len(source) else Subset(source, 0, count)


def evaluate(samples: Source, reference: dict, extractor, *, which=METRICS,
             batch_size: int = 64, workers: int = 0, kid_subset: int = 1000) -> dict:
  """The metrics of `samples` against reference statistics (mu, sigma[, features])."""
  fake = features_lib.extract(samples, extractor, batch_size=batch_size, workers=workers,
                              description="of the samples")
  mu, sigma = metrics.gaussian_stats(fake["pool"])
  out = {"num_samples": len(fake["pool"])}
  if "fid" in which:
    out["fid"] = metrics.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
  real = reference.get("features")
  if real is not None and "kid" in which:
    out["kid"], out["kid_std"] = metrics.kid(real, fake["pool"], subset_size=kid_subset)
  if real is not None and "pr" in which:
    out["precision"], out["recall"] = metrics.precision_recall(real, fake["pool"])
  if "is" in which and "logits" in fake:
    out["inception_score"], out["inception_score_std"] = metrics.inception_score(
        fake["logits"])
  return out


def reference_statistics(spec: str, count: int, extractor, cache_dir: str, *,
                         batch_size: int, workers: int) -> dict:
  if _is_statistics(spec):
    return features_lib.read_statistics(spec)
  source = _limit(open_images(spec, "--reference"), count)
  key = {"reference": os.path.abspath(spec) if not spec.startswith("tfds:") else spec,
         "count": len(source)}
  return features_lib.cached_statistics(cache_dir, key, lambda: features_lib.statistics(
      features_lib.extract(source, extractor, batch_size=batch_size, workers=workers,
                           description="of the reference")))


def _sample(args) -> str:
  """Runs (or resumes) the sampling job of --checkpoint into <out>/samples; its images."""
  # pylint: disable=g-import-not-at-top
  from ldm_jax import sampling_job
  from ldm_jax.inference import load_pipeline
  pipeline = load_pipeline(args.checkpoint)
  job = sampling_job.job_for(pipeline, num_samples=args.num_samples, per_class=args.per_class,
                             seed=args.seed, batch_size=args.sample_batch_size,
                             sampler=args.sampler, steps=args.steps,
                             guidance_scale=args.guidance_scale)
  out = os.path.join(args.out, "samples")
  sampling_job.run(pipeline, job, out)
  return os.path.join(out, "images")


def main(argv=None):
  parser = ArgumentParser(prog="python -m ldm_jax.evaluate", description=__doc__)
  parser.add_argument("--samples", default="", help="Image folder or .npz of samples.")
  parser.add_argument("--checkpoint", default="",
                      help="Instead of --samples: a training workdir or export to sample from.")
  parser.add_argument("--num_samples", type=int, default=0)
  parser.add_argument("--per_class", type=int, default=0)
  parser.add_argument("--sampler", default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--guidance_scale", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sample_batch_size", type=int, default=16)
  parser.add_argument("--reference", required=True,
                      help="Image folder, .npz of images, tfds:NAME:SPLIT, or statistics .npz.")
  parser.add_argument("--reference_count", type=int, default=0,
                      help="Use the first N reference images (0 = all).")
  parser.add_argument("--weights", default="inception_fid.npz",
                      help="Converted FID Inception weights (ldm_jax.interop.convert inception).")
  parser.add_argument("--metrics", default=",".join(METRICS), help="Any of fid,kid,is,pr.")
  parser.add_argument("--batch_size", type=int, default=64, help="Global extraction batch.")
  parser.add_argument("--workers", type=int, default=0, help="Image-decoding processes.")
  parser.add_argument("--cache_dir", default=os.path.join("~", ".cache", "ldm_jax", "fid"),
                      help="Where reference statistics are cached.")
  parser.add_argument("--out", required=True, help="Folder for metrics.json (and samples).")
  args = parser.parse_args(argv)
  setup_logging()
  with friendly_errors():
    which = tuple(m for m in args.metrics.split(",") if m)
    unknown = sorted(set(which) - set(METRICS))
    if unknown:
      raise DataError(f"--metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    if bool(args.samples) == bool(args.checkpoint):
      raise DataError("give exactly one of --samples and --checkpoint")
    # pylint: disable=g-import-not-at-top
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ldm_jax.evaluation.inception import FeatureExtractor
    from ldm_jax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    extractor = FeatureExtractor(args.weights, NamedSharding(mesh, P("batch")))
    reference = reference_statistics(args.reference, args.reference_count, extractor,
                                     os.path.expanduser(args.cache_dir),
                                     batch_size=args.batch_size, workers=args.workers)
    samples = args.samples or _sample(args)
    result = evaluate(open_images(samples, "--samples"), reference, extractor, which=which,
                      batch_size=args.batch_size, workers=args.workers)
    result.update(samples=samples, reference=args.reference, weights=args.weights)
    line = json.dumps(result, sort_keys=True)
    if jax.process_index() == 0:
      fileio.atomic_write_text(os.path.join(args.out, "metrics.json"), line + "\n")
    print(line)


if __name__ == "__main__":
  main()
