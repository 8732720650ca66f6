"""Dataset builders that turn MNIST digits into the paper's conditional tasks, as image folders
with sidecar conditions that ImageFolderSource reads (ldm_jax/data/sidecars.py):

  semantic  <out>/images/<digit>/NNNNN.png (32x32, the 28 px digit padded) and
            <out>/maps/<digit>/NNNNN.png: the label map, 0 = background and 1 + d on the
            digit's binarised shape (ink >= 128), so SEMANTIC_CLASSES = 11 classes.
  layout    <out>/NNNNN.png canvases (64x64 by default) holding 1-3 digits, each scaled to a
            square cell of 3/8 to 5/8 of the canvas side (24-40 px on 64) at a random place
            (cells overlap by at most a quarter),
            with <out>/NNNNN.json listing {"boxes": [{"class": d, "box": [x0, y0, x1, y1]}]}:
            the cells in pixels, (x1, y1) exclusive.
  captions  <out>/<digit>/NNNNN.png (32x32) and NNNNN.txt: a sentence naming the digit, drawn
            from CAPTION_TEMPLATES with the digit as a word or a numeral and its stroke
            described as thick or thin (ink coverage above or below the split's median).

Digits come from an MNIST IDX split (the packaged test digits by default); `start`/`count`
pick a slice of it, so a training set and a held-out set are two slices. Every builder is a
function of (digits, seed): rerunning writes the same files. Outputs are PNG, lossless.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

SEMANTIC_CLASSES = 11
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: the digit's name; {d}: its numeral; {thick}/{thickly}: its stroke.
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the number {d} written {thickly}",
    "a {thick} {word}",
    "the digit {word}",
    "a picture of the number {word}",
    "handwritten digit {d}",
    "the numeral {d}, drawn with a {thick} stroke",
    "{word}",
    "a {thick} handwritten {d}",
    "an image of a {word}",
)
PROMPT_TEMPLATE = "a handwritten {word}"   # the recipes' evaluation prompt per digit


def pad_digit(image: np.ndarray, size: int = 32) -> np.ndarray:
  """(28, 28) uint8 -> (size, size) with the digit centred (padding, no resampling)."""
  h, w = image.shape
  top, left = (size - h) // 2, (size - w) // 2
  out = np.zeros((size, size), np.uint8)
  out[top:top + h, left:left + w] = image
  return out


def label_map(digit: np.ndarray, label: int) -> np.ndarray:
  """The semantic map of a digit image: 1 + label on its ink (>= 128), 0 elsewhere."""
  return np.where(digit >= 128, 1 + label, 0).astype(np.uint8)


def _save(array: np.ndarray, path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def build_semantic(images: np.ndarray, labels: np.ndarray, out: str, *, start: int = 0) -> int:
  """Writes images/<d>/NNNNN.png and maps/<d>/NNNNN.png (N = start + i); returns the count."""
  for i, (image, label) in enumerate(zip(images, labels)):
    rel = f"{int(label)}/{start + i:05d}.png"
    digit = pad_digit(image)
    _save(digit, os.path.join(out, "images", rel))
    _save(label_map(digit, int(label)), os.path.join(out, "maps", rel))
  return len(images)


def _overlap(a, b) -> float:
  """Intersection area over the smaller box's area, boxes [x0, y0, x1, y1]."""
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  if w <= 0 or h <= 0:
    return 0.0
  return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def place_digits(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                 canvas: int = 64, max_objects: int = 3) -> tuple[np.ndarray, list[dict]]:
  """One canvas: 1..max_objects digits drawn from (images, labels), each resized (bilinear)
  to a square cell; overlapping ink takes the maximum. -> (canvas uint8, box entries)."""
  cell = (canvas * 3 // 8, canvas * 5 // 8)
  out = np.zeros((canvas, canvas), np.uint8)
  boxes: list[dict] = []
  for _ in range(int(rng.integers(1, max_objects + 1))):
    for _attempt in range(20):
      side = int(rng.integers(cell[0], cell[1] + 1))
      x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
      box = [x0, y0, x0 + side, y0 + side]
      if all(_overlap(box, b["box"]) <= 0.25 for b in boxes):
        break
    else:
      continue
    k = int(rng.integers(len(images)))
    digit = np.asarray(Image.fromarray(images[k]).resize((side, side), Image.BILINEAR))
    out[y0:y0 + side, x0:x0 + side] = np.maximum(out[y0:y0 + side, x0:x0 + side], digit)
    boxes.append({"class": int(labels[k]), "box": box})
  return out, boxes


def build_layout(images: np.ndarray, labels: np.ndarray, out: str, *, count: int,
                 seed: int = 0, canvas: int = 64) -> int:
  """Writes `count` canvases NNNNN.png with their NNNNN.json box files; returns count."""
  rng = np.random.default_rng(seed)
  os.makedirs(out, exist_ok=True)
  for i in range(count):
    image, boxes = place_digits(rng, images, labels, canvas)
    Image.fromarray(image).save(os.path.join(out, f"{i:05d}.png"))
    with open(os.path.join(out, f"{i:05d}.json"), "w", encoding="utf-8") as f:
      json.dump({"boxes": boxes}, f)
  return count


def caption(rng: np.random.Generator, label: int, thick: bool) -> str:
  """A sentence naming digit `label` (a template of CAPTION_TEMPLATES drawn from rng)."""
  template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
  return template.format(word=NUMBER_WORDS[label], d=label,
                         thick="thick" if thick else "thin",
                         thickly="thickly" if thick else "thinly")


def build_captions(images: np.ndarray, labels: np.ndarray, out: str, *, start: int = 0,
                   seed: int = 0) -> int:
  """Writes <d>/NNNNN.png with NNNNN.txt captions; returns the count."""
  rng = np.random.default_rng(seed)
  ink = (images >= 128).reshape(len(images), -1).mean(axis=1)
  median = float(np.median(ink))
  for i, (image, label) in enumerate(zip(images, labels)):
    stem = os.path.join(out, str(int(label)), f"{start + i:05d}")
    _save(pad_digit(image), stem + ".png")
    with open(stem + ".txt", "w", encoding="utf-8") as f:
      f.write(caption(rng, int(label), bool(ink[i] > median)) + "\n")
  return len(images)
