"""The input files of sample.py's file tasks, read and checked: images, inpainting masks,
semantic label maps and layout (box) files. Each reader raises a JobError of one line that
names the file and what was expected, so a job stops before any compute.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ldm_jax.data import sidecars
from ldm_jax.data.folder_index import IMAGE_EXTENSIONS
from ldm_jax.data.sources import decode_image
from ldm_jax.errors import BadImageError, DataError, JobError


def list_files(folder: str, flag: str, extensions: tuple[str, ...], what: str) -> list[str]:
  """Relative paths of the files under `folder` (nested folders too) with `extensions`,
  sorted."""
  if not os.path.isdir(folder):
    raise JobError(f"--{flag}: no such folder '{folder}'")
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.relpath(os.path.join(root, f), folder) for f in files
              if f.lower().endswith(extensions) and not f.startswith(".")]
  if not found:
    raise JobError(f"--{flag}: no {what} in '{folder}' (extensions {', '.join(extensions)})")
  return sorted(found)


def list_images(folder: str, flag: str) -> list[str]:
  return list_files(folder, flag, IMAGE_EXTENSIONS, "images")


def read_image(path: str, channels: int, flag: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise JobError(f"--{flag}: '{path}' is gone (was the folder changed while the job ran?)")
  try:
    return decode_image(path, channels)
  except BadImageError as e:
    raise JobError(f"--{flag}: {str(e).removeprefix('data: ')}") from None


def read_mask(path: str, shape: tuple[int, int], image_path: str) -> np.ndarray:
  """(H, W, 1) float mask, 1 where the PNG is white (>= 128): the region to fill."""
  mask = read_image(path, 1, "masks")
  if mask.shape[:2] != shape:
    raise JobError(f"--masks: '{path}' is {mask.shape[1]}x{mask.shape[0]}, but its image "
                   f"'{image_path}' is {shape[1]}x{shape[0]}; masks must match their images")
  return (mask >= 128).astype(np.float32)


def read_label_map(path: str, num_classes: int) -> np.ndarray:
  """int32 (H, W) semantic map from a single-channel PNG; every value a class of the model."""
  try:
    with Image.open(path) as im:
      im.load()
      mode, array = im.mode, np.asarray(im)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise JobError(f"--inputs: cannot read label map '{path}': {e}") from None
  if mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
    raise JobError(f"--inputs: label map '{path}' is a {mode} image; save one class index per "
                   f"pixel as a single-channel PNG (mode L, P or I;16)")
  array = array.astype(np.int32)
  if array.min() < 0 or array.max() >= num_classes:
    bad = int(array.max() if array.max() >= num_classes else array.min())
    raise JobError(f"--inputs: label map '{path}' holds class {bad}, but the model knows "
                   f"{num_classes} classes (0..{num_classes - 1})")
  return array


def read_layout(path: str, canvas: tuple[int, int], num_classes: int,
                max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
  """A box file {"boxes": [{"class": c, "box": [x0, y0, x1, y1]}]} in pixels of the canvas
  (H, W) -> (boxes (max_boxes, 4) in [0, 1] of the canvas, classes (max_boxes,), -1 = none)."""
  try:
    entries = sidecars.read_boxes(path)
  except DataError as e:
    raise JobError(f"--inputs: {str(e).removeprefix('data: ')}") from None
  if entries is None:
    raise JobError(f"--inputs: '{path}' has no \"boxes\" list; expected "
                   f"{{\"boxes\": [{{\"class\": 0, \"box\": [x0, y0, x1, y1]}}]}} in pixels")
  if len(entries) > max_boxes:
    raise JobError(f"--inputs: '{path}' has {len(entries)} boxes; the model takes at most "
                   f"{max_boxes} (data.max_boxes)")
  h, w = canvas
  boxes = np.zeros((max_boxes, 4), np.float32)
  classes = np.full((max_boxes,), -1, np.int32)
  for i, (cls, x0, y0, x1, y1) in enumerate(entries):
    if cls >= num_classes:
      raise JobError(f"--inputs: '{path}' box {i} has class {cls}; the model knows "
                     f"{num_classes} object classes (0..{num_classes - 1})")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
      raise JobError(f"--inputs: '{path}' box {i} [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies "
                     f"outside the {w}x{h} canvas (set --image_size for a larger one)")
    boxes[i] = (x0 / w, y0 / h, x1 / w, y1 / h)
    classes[i] = cls
  return boxes, classes
