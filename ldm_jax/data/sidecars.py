"""Files beside a user's images: captions, box lists, inpainting masks and segmentation maps.

Conventions (README: "Your own image folder: index and sidecar conditions"):
- caption: `name.txt` beside `name.jpg` (UTF-8, surrounding whitespace stripped), or one
  `captions.jsonl` at the folder root with lines {"file": "<relative path>", "caption": "..."};
  a .txt file wins over a captions.jsonl line for the same image.
- boxes: `name.json` beside `name.jpg` holding {"boxes": [{"class": 3, "box": [x0, y0, x1, y1]}]}
  in pixels of the original image, (x1, y1) exclusive. A .json without a "boxes" key is someone
  else's metadata (img2dataset writes such files) and is ignored.
- mask: `<mask_dir>/<relative path with .png>`, single channel, nonzero = the region to fill.
- segmentation: `<segmentation_dir>/<relative path with .png>`, one integer class per pixel.

Paths may be local or anything etils.epath opens (gs://...): files are read as bytes and decoded
from memory, so nothing here keeps a file open.
"""
from __future__ import annotations

import io
import json
import os
import posixpath

import numpy as np
from PIL import Image

from ldm_jax.errors import BadImageError, DataError

CAPTIONS_FILE = "captions.jsonl"


def is_remote(path: str) -> bool:
  """True for URLs (gs://bucket/...), which go through etils.epath instead of the os module."""
  return "://" in path


def join(root: str, relative: str) -> str:
  """`root`/`relative` for a local folder or a URL (`relative` uses '/')."""
  if is_remote(root):
    return root.rstrip("/") + "/" + relative
  return os.path.join(root, *relative.split("/"))


def is_dir(path: str) -> bool:
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).is_dir()
  return os.path.isdir(path)


def read_bytes(path: str) -> bytes:
  """The content of a local file or a URL; OSError (FileNotFoundError included) if unreadable."""
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def _text(path: str, what: str) -> str:
  try:
    return read_bytes(path).decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"data: {what} '{path}' is not UTF-8 text ({e.reason} at byte "
                    f"{e.start})") from e
  except OSError as e:
    raise DataError(f"data: cannot read {what} '{path}': {e}") from e


def read_caption(path: str) -> str:
  """The caption in a `name.txt` file, whitespace stripped."""
  return _text(path, "caption file").strip()


def normalise_relative(path: str) -> str:
  """'./cat//1.jpg' -> 'cat/1.jpg': the form the index stores relative paths in."""
  return posixpath.normpath(path.replace("\\", "/")).lstrip("/")


def read_captions_jsonl(path: str) -> dict[str, str]:
  """{relative path: caption} from a captions.jsonl file."""
  out = {}
  for number, line in enumerate(_text(path, "captions file").splitlines(), 1):
    if not line.strip():
      continue
    hint = 'expected one JSON object per line like {"file": "cat/1.jpg", "caption": "a cat"}'
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"data: '{path}' line {number} is not JSON ({e.msg}); {hint}") from e
    if (not isinstance(entry, dict) or not isinstance(entry.get("file"), str)
        or not isinstance(entry.get("caption"), str)):
      raise DataError(f"data: '{path}' line {number} needs string fields 'file' and "
                      f"'caption'; {hint}")
    out[normalise_relative(entry["file"])] = entry["caption"]
  return out


def read_boxes(path: str) -> list[list[float]] | None:
  """[[class, x0, y0, x1, y1], ...] from a `name.json` box file; None when the JSON has no
  "boxes" key (metadata of another tool, not a box file)."""
  text = _text(path, "box file")
  hint = 'expected {"boxes": [{"class": 0, "box": [x0, y0, x1, y1]}, ...]} in pixels'
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"data: box file '{path}' is not JSON ({e.msg} at line {e.lineno}); "
                    f"{hint}") from e
  if not isinstance(data, dict) or "boxes" not in data:
    return None
  if not isinstance(data["boxes"], list):
    raise DataError(f"data: box file '{path}': 'boxes' is not a list; {hint}")
  out = []
  for i, entry in enumerate(data["boxes"]):
    box = entry.get("box") if isinstance(entry, dict) else None
    cls = entry.get("class") if isinstance(entry, dict) else None
    if (not isinstance(cls, int) or isinstance(cls, bool) or cls < 0 or not isinstance(box, list)
        or len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in box)):
      raise DataError(f"data: box file '{path}': box {i} needs a 'class' (integer >= 0) and a "
                      f"'box' of 4 numbers; {hint}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
      raise DataError(f"data: box file '{path}': box {i} {box} needs x0 < x1 and y0 < y1")
    out.append([cls, x0, y0, x1, y1])
  return out


def _decode_png(path: str, what: str, field: str) -> Image.Image:
  try:
    data = read_bytes(path)
  except FileNotFoundError as e:
    raise DataError(f"data.{field}: no {what} '{path}' (every image needs one: the same "
                    f"relative path with .png)") from e
  except OSError as e:
    raise DataError(f"data.{field}: cannot read {what} '{path}': {e}") from e
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
  except Exception as e:  # PIL raises many types for bad files
    # A damaged file, like a damaged image: data.on_bad_image skips its example or stops.
    raise BadImageError(f"data.{field}: cannot decode {what} '{path}': {e}", path) from e


def _check_size(array: np.ndarray, path: str, image_path: str, shape, what: str, field: str):
  if array.shape[:2] != tuple(shape):
    raise DataError(f"data.{field}: {what} '{path}' is {array.shape[1]}x{array.shape[0]} but "
                    f"image '{image_path}' is {shape[1]}x{shape[0]}; they must be the same size")


def read_mask(path: str, image_path: str, shape) -> np.ndarray:
  """uint8 (H, W) mask, 1 = region to fill (any nonzero pixel), 0 = keep; `shape` is the
  image's (H, W)."""
  im = _decode_png(path, "mask", "mask_dir")
  array = np.asarray(im)
  if array.ndim == 3:   # tolerated: colour masks count any nonzero colour channel
    array = array[..., :1] if im.mode == "LA" else array[..., :3]
    array = array.max(axis=-1)
  _check_size(array, path, image_path, shape, "mask", "mask_dir")
  return (array != 0).astype(np.uint8)


def read_segmentation(path: str, image_path: str, shape) -> np.ndarray:
  """int32 (H, W) class map from a single-channel label PNG (mode L, P, I;16 or I)."""
  im = _decode_png(path, "segmentation map", "segmentation_dir")
  if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
    raise DataError(f"data.segmentation_dir: segmentation map '{path}' is a {im.mode} image; "
                    f"save one class index per pixel as a single-channel PNG (mode L, P or I;16)")
  array = np.asarray(im).astype(np.int32)
  _check_size(array, path, image_path, shape, "segmentation map", "segmentation_dir")
  return array
