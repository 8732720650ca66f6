"""Image preprocessing: resize, crop, flip and scale to [-1, 1], deterministic given an RNG."""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from ldm_jax.errors import ConfigError, DataError


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  mode = "L" if image.shape[-1] == 1 else "RGB"
  pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
  # PIL's bicubic filter widens with the downscale factor, so shrinking is antialiased.
  out = np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC))
  return out[..., None] if out.ndim == 2 else out


def _pad_or_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  out = np.zeros((size, size, image.shape[-1]), image.dtype)
  sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)   # crop offsets
  dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)   # pad offsets
  ch, cw = min(h, size), min(w, size)
  out[dy:dy + ch, dx:dx + cw] = image[sy:sy + ch, sx:sx + cw]
  return out


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the range every model in ldm_jax works in."""
  return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(image) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (clipped)."""
  return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def model_inputs(batch: dict) -> dict:
  """A batch as the host sends it -> what models take: uint8 images become float32 in
  [-1, 1] and 16-bit latents float32. Runs inside the jitted steps, so transfers stay small."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def one(key, x):
    if key == "image" and x.dtype == jnp.uint8:
      return x.astype(jnp.float32) / 127.5 - 1.0
    if key == "latent" and x.dtype != jnp.float32:
      return x.astype(jnp.float32)
    return x
  return {k: one(k, v) for k, v in batch.items()}


def _resize_nearest(seg: np.ndarray, height: int, width: int) -> np.ndarray:
  if seg.shape[:2] == (height, width):
    return seg
  return np.asarray(Image.fromarray(seg.astype(np.int32)).resize(
      (width, height), Image.Resampling.NEAREST)).astype(seg.dtype)


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Where the output square comes from: the image is resized to (nh, nw) (None: not
  resampled), then the window at (top, left) is taken, zero-padded where it leaves the image;
  finally flipped left-right. Input pixel x lands on output x * scale_x - left."""
  mode: str
  size: int
  h: int
  w: int
  nh: int
  nw: int
  top: int
  left: int
  flip: bool = False

  def image(self, image):
    if self.mode == "pad":
      out = _pad_or_crop(image, self.size)
    else:
      out = _resize(image, self.nh, self.nw)[self.top:self.top + self.size,
                                             self.left:self.left + self.size]
    return out[:, ::-1] if self.flip else out

  def map(self, aligned):
    if self.mode == "pad":
      out = _pad_or_crop(aligned[..., None], self.size)[..., 0]
    else:
      out = _resize_nearest(aligned, self.nh, self.nw)[self.top:self.top + self.size,
                                                       self.left:self.left + self.size]
    return np.ascontiguousarray(out[:, ::-1] if self.flip else out)

  def boxes(self, boxes):
    """(N, 4) [x0, y0, x1, y1] in input pixels -> (boxes in [0, 1] of the output, kept): boxes
    clipped to the output, those left without area dropped."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if self.mode == "pad":
      sx, sy = 1.0, 1.0
      shift_x = max(0, (self.size - self.w) // 2) - max(0, (self.w - self.size) // 2)
      shift_y = max(0, (self.size - self.h) // 2) - max(0, (self.h - self.size) // 2)
    else:
      sx, sy = self.nw / self.w, self.nh / self.h
      shift_x, shift_y = -self.left, -self.top
    out = np.stack([boxes[:, 0] * sx + shift_x, boxes[:, 1] * sy + shift_y,
                    boxes[:, 2] * sx + shift_x, boxes[:, 3] * sy + shift_y], axis=-1)
    out = np.clip(out, 0.0, self.size)
    if self.flip:
      out = np.stack([self.size - out[:, 2], out[:, 1], self.size - out[:, 0], out[:, 3]], -1)
    kept = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return (out / self.size).astype(np.float32), kept


def _geometry(h, w, rng, size, resize_mode, random_crop) -> _Geometry:
  """Draws the crop (the RNG draws of the image-only path, in its order); not the flip."""
  if resize_mode == "short_side":
    scale = size / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    if random_crop:
      top, left = rng.integers(0, nh - size + 1), rng.integers(0, nw - size + 1)
    else:
      top, left = (nh - size) // 2, (nw - size) // 2
    return _Geometry("short_side", size, h, w, nh, nw, int(top), int(left))
  if resize_mode == "pad":
    return _Geometry("pad", size, h, w, h, w, 0, 0)
  if resize_mode == "stretch":
    return _Geometry("stretch", size, h, w, size, size, 0, 0)
  raise ValueError(f"data.resize_mode: unknown mode '{resize_mode}'")


def _as_map(name, aligned, h, w):
  aligned = np.asarray(aligned)
  aligned = aligned[..., 0] if aligned.ndim == 3 else aligned
  if aligned.shape != (h, w):
    raise DataError(f"data: {name} map {aligned.shape} does not match image {(h, w)}")
  return aligned


def preprocess_image(image: np.ndarray, rng: np.random.Generator, *, size: int,
                     resize_mode: str = "short_side", random_crop: bool = True,
                     random_flip: bool = False, aligned=None, boxes: np.ndarray | None = None,
                     box_classes: np.ndarray | None = None, max_boxes: int = 16,
                     uint8: bool = False):
  """A uint8 HWC image of any size -> (size, size, C) float32 in [-1, 1] (uint8 if `uint8`).

  Maps and boxes that belong to the image get its exact geometry (one set of RNG draws, in the
  order of the image-only path, so adding them does not change the image):
  - `aligned={name: (H, W) map}` (segmentation, mask, ...): resized nearest, cropped, flipped;
  - `boxes` (N, 4) [x0, y0, x1, y1] in the image's pixels with `box_classes` (N,): moved with
    the crop and flip, clipped to it, dropped when outside, then padded to `max_boxes`.
  With either (even `aligned={}`), a dict is returned: 'image', each map under its name (dtype
  kept), and 'boxes' (float32 (max_boxes, 4) in [0, 1] of the output, x0 < x1) and
  'box_classes' (int32 (max_boxes,), -1 = padding). The older form `aligned=<map>` returns
  (image, int32 map).
  """
  h, w = image.shape[:2]
  legacy = aligned is not None and not isinstance(aligned, dict)
  maps = {"segmentation": aligned} if legacy else dict(aligned or {})
  maps = {name: _as_map(name, m, h, w) for name, m in maps.items()}
  geometry = _geometry(h, w, rng, size, resize_mode, random_crop)
  if random_flip and rng.random() < 0.5:
    geometry = dataclasses.replace(geometry, flip=True)
  image = geometry.image(image)
  image = np.ascontiguousarray(image) if uint8 else to_float(image)
  if legacy:
    return image, geometry.map(maps["segmentation"]).astype(np.int32)
  if aligned is None and boxes is None:
    return image
  out = {"image": image, **{name: geometry.map(m) for name, m in maps.items()}}
  if boxes is not None:
    if max_boxes < 1:
      raise ConfigError(f"data.max_boxes: must be at least 1, got {max_boxes}")
    moved, kept = geometry.boxes(boxes)
    classes = np.asarray(box_classes if box_classes is not None else np.zeros(len(moved)),
                         np.int32).reshape(-1)
    moved, classes = moved[kept][:max_boxes], classes[kept][:max_boxes]
    out["boxes"] = np.zeros((max_boxes, 4), np.float32)
    out["boxes"][:len(moved)] = moved
    out["box_classes"] = np.full((max_boxes,), -1, np.int32)
    out["box_classes"][:len(classes)] = classes
  return out


def image_example_fn(data_config, train: bool):
  """Raw example -> {'image': uint8 (size, size, C), 'label': int32 if labelled, and the
  example's aligned conditions with the image's resize, crop and flip: 'segmentation' (int32
  map), 'mask' (uint8, 1 = region to fill), 'boxes' (float32 (max_boxes, 4) in [0, 1]) with
  'box_classes' (int32, -1 = padding)} per `config.data`.

  Images stay uint8 until the device (a quarter of float32's transfer); the jitted steps turn
  them into float32 in [-1, 1] with `model_inputs`. Evaluation (train=False) uses centre crops
  and no flips, so it sees the same pixels every time.
  """
  d = data_config

  def fn(example, rng):
    maps = {k: example[k] for k in ("segmentation", "mask") if k in example}
    out = preprocess_image(example["image"], rng, size=d.image_size,
                           resize_mode=d.resize_mode, random_crop=train and d.random_crop,
                           random_flip=train and d.random_flip, aligned=maps,
                           boxes=example.get("boxes"), box_classes=example.get("box_classes"),
                           max_boxes=d.get("max_boxes", 16), uint8=True)   # older configs
    if "segmentation" in out:
      out["segmentation"] = out["segmentation"].astype(np.int32)
    if "mask" in out:
      out["mask"] = (np.asarray(out["mask"]) > 0).astype(np.uint8)
    if "label" in example:
      out["label"] = np.int32(example["label"])
    return out

  return fn
