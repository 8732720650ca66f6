"""Dataset builders for the task demonstrations, from data a machine without network has.

  python -m ldm_jax.data.demo_sets cifar --archive=cifar10-train-jpeg.tar.gz --out=data/cifar
      [--per_class=N]
  python -m ldm_jax.data.demo_sets semantic|layout|captions --out=data/digits_layout
      [--mnist=<folder of IDX files>] [--split=t10k] [--start=0] [--count=8000] [--seed=0]
      [--canvas=64]

cifar: a CIFAR-10 archive of `<split>/<class>/NNNN.jpg` (the layout the CIFAR JPEG tarballs
use) unpacked into an image folder with one sub-folder per class, which ImageFolderSource
reads: the training data of the super-resolution and inpainting recipes, and their held-out
test images. `per_class` keeps the first N files of each class by sorted name. An existing
complete folder is reused (its `.complete` marker records what was extracted).

semantic, layout, captions: MNIST digits (the ones shipped in the package unless --mnist names
a folder of IDX files) as the semantic-synthesis, layout-to-image and text-to-image
demonstrations; what each writes is in ldm_jax/data/digit_sets.py. `start`/`count` slice the
split (layout draws its digits from that slice and writes `count` canvases), so a training set
and a held-out set are disjoint slices; a folder built with the same arguments is reused.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tarfile

from ldm_jax.data import digit_sets
from ldm_jax.errors import DataError

DIGIT_SETS = ("semantic", "layout", "captions")


def extract_cifar(archive: str, out: str, per_class: int = 0) -> str:
  """Unpacks a CIFAR-10 image archive into `out`/<class>/*.jpg; returns `out`."""
  want = {"archive": os.path.basename(archive), "per_class": per_class}
  if _marker_matches(out, want):
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
  with open(os.path.join(out, ".complete"), "w", encoding="utf-8") as f:
    json.dump(want, f)
  return out


def _marker_matches(out: str, want: dict) -> bool:
  marker = os.path.join(out, ".complete")
  if not os.path.exists(marker):
    return False
  with open(marker, encoding="utf-8") as f:
    return json.load(f) == want


def build_digits(kind: str, out: str, *, start: int = 0, count: int = 8000, seed: int = 0,
                 mnist: str = "", split: str = "t10k", canvas: int = 64) -> str:
  """Writes the `kind` digit set (see digit_sets) from MNIST digits [start, start + count)
  into `out`; returns `out`."""
  # pylint: disable=g-import-not-at-top
  from ldm_jax.data.sources import mnist_source, packaged_mnist_dir
  if kind not in DIGIT_SETS:
    raise DataError(f"dataset: expected one of {', '.join(DIGIT_SETS)}, got '{kind}'")
  want = {"kind": kind, "mnist": mnist, "split": split, "start": start, "count": count,
          "seed": seed, **({"canvas": canvas} if kind == "layout" else {})}
  if _marker_matches(out, want):
    return out
  source = mnist_source(mnist or packaged_mnist_dir(), split)
  if not (0 <= start and count > 0):
    raise DataError(f"--start/--count: need start >= 0 and count > 0, got {start}, {count}")
  stop = start + count
  images, labels = source.images[start:stop, ..., 0], source.labels[start:stop]
  if stop > len(source.images) or not len(images):
    raise DataError(f"--start/--count: MNIST {split} has {len(source.images)} digits; "
                    f"[{start}, {stop}) does not fit")
  if kind == "semantic":
    digit_sets.build_semantic(images, labels, out, start=start)
  elif kind == "captions":
    digit_sets.build_captions(images, labels, out, start=start, seed=seed)
  else:
    if canvas < 32:
      raise DataError(f"--canvas: layouts need a canvas of at least 32 px, got {canvas}")
    digit_sets.build_layout(images, labels, out, count=count, seed=seed, canvas=canvas)
  with open(os.path.join(out, ".complete"), "w", encoding="utf-8") as f:
    json.dump(want, f)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m ldm_jax.data.demo_sets",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=["cifar", *DIGIT_SETS])
  parser.add_argument("--archive", help="cifar: the CIFAR-10 JPEG tarball")
  parser.add_argument("--out", required=True)
  parser.add_argument("--per_class", type=int, default=0)
  parser.add_argument("--mnist", default="", help="digit sets: folder of MNIST IDX .gz files "
                      "(default: the test digits shipped in the package)")
  parser.add_argument("--split", default="t10k")
  parser.add_argument("--start", type=int, default=0)
  parser.add_argument("--count", type=int, default=8000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--canvas", type=int, default=64, help="layout: canvas side in pixels")
  args = parser.parse_args(argv)
  try:
    if args.dataset == "cifar":
      if not args.archive:
        raise DataError("--archive: cifar needs the CIFAR-10 JPEG tarball")
      out = extract_cifar(args.archive, args.out, args.per_class)
    else:
      out = build_digits(args.dataset, args.out, start=args.start, count=args.count,
                         seed=args.seed, mnist=args.mnist, split=args.split,
                         canvas=args.canvas)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{sum(len(f) for _, _, f in os.walk(out)) - 1} files in {out}")


if __name__ == "__main__":
  main()
