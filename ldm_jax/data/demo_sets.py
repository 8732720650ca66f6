"""Dataset builders for the task demonstrations, from data a machine without network has.

  python -m ldm_jax.data.demo_sets cifar --archive=cifar10-train-jpeg.tar.gz --out=data/cifar
      [--per_class=N]

cifar: a CIFAR-10 archive of `<split>/<class>/NNNN.jpg` (the layout the CIFAR JPEG tarballs
use) unpacked into an image folder with one sub-folder per class, which ImageFolderSource
reads: the training data of the super-resolution and inpainting recipes, and their held-out
test images. `per_class` keeps the first N files of each class by sorted name. An existing
complete folder is reused (its `.complete` marker records what was extracted).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tarfile

from ldm_jax.errors import DataError


def extract_cifar(archive: str, out: str, per_class: int = 0) -> str:
  """Unpacks a CIFAR-10 image archive into `out`/<class>/*.jpg; returns `out`."""
  marker = os.path.join(out, ".complete")
  want = {"archive": os.path.basename(archive), "per_class": per_class}
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      if json.load(f) == want:
        return out
  if not os.path.isfile(archive):
    raise DataError(f"--archive: no such file '{archive}' (a CIFAR-10 JPEG tarball)")
  try:
    with tarfile.open(archive) as tar:
      members = sorted((m for m in tar.getmembers() if m.isfile()
                        and m.name.lower().endswith((".jpg", ".jpeg", ".png"))),
                       key=lambda m: m.name)
      kept, counts = [], {}
      for m in members:
        cls = pathlib.PurePosixPath(m.name).parts[-2]
        if per_class and counts.get(cls, 0) >= per_class:
          continue
        counts[cls] = counts.get(cls, 0) + 1
        kept.append(m)
      if not kept:
        raise DataError(f"--archive: '{archive}' holds no <class>/<image> files")
      for m in kept:
        cls, name = pathlib.PurePosixPath(m.name).parts[-2:]
        os.makedirs(os.path.join(out, cls), exist_ok=True)
        with tar.extractfile(m) as src, open(os.path.join(out, cls, name), "wb") as dst:
          dst.write(src.read())
  except (tarfile.TarError, EOFError, OSError) as e:
    raise DataError(f"--archive: cannot read '{archive}': {e}") from e
  with open(marker, "w", encoding="utf-8") as f:
    json.dump(want, f)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m ldm_jax.data.demo_sets",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=["cifar"])
  parser.add_argument("--archive", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--per_class", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    out = extract_cifar(args.archive, args.out, args.per_class)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{sum(len(f) for _, _, f in os.walk(out)) - 1} images in {out}")


if __name__ == "__main__":
  main()
