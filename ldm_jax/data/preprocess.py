"""Image preprocessing: resize, crop, flip and scale to [-1, 1], deterministic given an RNG."""
from __future__ import annotations

import numpy as np
from PIL import Image


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
  return np.asarray(Image.fromarray(seg.astype(np.int32)).resize((width, height),
                                                                 Image.Resampling.NEAREST))


def preprocess_image(image: np.ndarray, rng: np.random.Generator, *, size: int,
                     resize_mode: str = "short_side", random_crop: bool = True,
                     random_flip: bool = False, aligned: np.ndarray | None = None):
  """A uint8 HWC image of any size -> float32 (size, size, C) in [-1, 1].

  `aligned` (an integer map of the image's height and width, e.g. a semantic segmentation)
  gets the same resize (nearest), crop and flip; then (image, aligned) is returned.
  """
  h, w = image.shape[:2]
  if aligned is not None:
    aligned = np.asarray(aligned)
    aligned = aligned[..., 0] if aligned.ndim == 3 else aligned
    if aligned.shape != (h, w):
      raise ValueError(f"data: segmentation map {aligned.shape} does not match image {(h, w)}")
  if resize_mode == "short_side":
    scale = size / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    image = _resize(image, nh, nw)
    if random_crop:
      top, left = rng.integers(0, nh - size + 1), rng.integers(0, nw - size + 1)
    else:
      top, left = (nh - size) // 2, (nw - size) // 2
    image = image[top:top + size, left:left + size]
    if aligned is not None:
      aligned = _resize_nearest(aligned, nh, nw)[top:top + size, left:left + size]
  elif resize_mode == "pad":
    image = _pad_or_crop(image, size)
    if aligned is not None:
      aligned = _pad_or_crop(aligned[..., None], size)[..., 0]
  elif resize_mode == "stretch":
    image = _resize(image, size, size)
    if aligned is not None:
      aligned = _resize_nearest(aligned, size, size)
  else:
    raise ValueError(f"data.resize_mode: unknown mode '{resize_mode}'")
  if random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
    aligned = None if aligned is None else aligned[:, ::-1]
  if aligned is None:
    return to_float(image)
  return to_float(image), np.ascontiguousarray(aligned).astype(np.int32)


def image_example_fn(data_config, train: bool):
  """Raw example -> {'image': float32 [-1, 1], 'label': int32 if labelled, 'segmentation':
  int32 map with the image's crop and flip if the example has one} per `config.data`.

  Evaluation (train=False) uses centre crops and no flips, so it sees the same pixels every time.
  """
  d = data_config

  def fn(example, rng):
    kwargs = dict(size=d.image_size, resize_mode=d.resize_mode,
                  random_crop=train and d.random_crop, random_flip=train and d.random_flip)
    if "segmentation" in example:
      image, seg = preprocess_image(example["image"], rng, aligned=example["segmentation"],
                                    **kwargs)
      out = {"image": image, "segmentation": seg}
    else:
      out = {"image": preprocess_image(example["image"], rng, **kwargs)}
    if "label" in example:
      out["label"] = np.int32(example["label"])
    return out

  return fn
