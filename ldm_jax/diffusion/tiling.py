"""Overlapping tiles: run a spatial function on tiles of a large latent and blend the results.

Used for images larger than fit at once: the decoder on tiles of the final latent, and the
denoiser on tiles of x_t at every sampling step (so a super-resolution model upscales a
photo of any size with the memory of one tile). Tiles overlap by about `overlap` of their size
(the stride is rounded down to `multiple`, so the overlap can be larger; a tile equal to the
multiple does not overlap) and are blended with linear ramps, which hides the seams; tiles run
one after another (lax.map) through one compiled function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def tile_origins(h: int, w: int, tile: int, overlap: float = 0.25,
                 multiple: int = 1) -> tuple[list[tuple[int, int]], int, int]:
  """(origins, tile_h, tile_w) covering an (h, w) grid with tiles of at most `tile`; tile sides
  and origins are multiples of `multiple` (a UNet's downsampling factor) when h and w are."""
  tile = max(multiple, tile // multiple * multiple)
  tile_h, tile_w = min(tile, h), min(tile, w)
  stride = max(multiple, int(tile * (1 - overlap)) // multiple * multiple)

  def starts(size, t):
    s = list(range(0, max(size - t, 0) + 1, stride))
    if s[-1] != size - t:
      s.append(size - t)
    return s

  return [(y, x) for y in starts(h, tile_h) for x in starts(w, tile_w)], tile_h, tile_w


def _ramp(n: int) -> np.ndarray:
  return np.minimum(np.arange(1, n + 1), np.arange(n, 0, -1)).astype(np.float32)


def tiled_apply(fn, arrays, tile: int, factor: int = 1, overlap: float = 0.25,
                multiple: int = 1):
  """fn(*tiles) -> (B, th*factor, tw*factor, C) on overlapping tiles of `arrays` (each
  (B, h, w, ...), the same h and w), blended into the (B, h*factor, w*factor, C) result.
  Without a need to tile (tile >= h and w) it is fn(*arrays)."""
  b, h, w = arrays[0].shape[:3]
  if tile >= h and tile >= w:
    return fn(*arrays)
  origins, th, tw = tile_origins(h, w, tile, overlap, multiple)
  tiles = [jnp.stack([a[:, y:y + th, x:x + tw] for y, x in origins]) for a in arrays]
  out_tiles = jax.lax.map(lambda ts: fn(*ts), tiles)          # (T, B, th*f, tw*f, C)
  weight = np.outer(_ramp(th * factor), _ramp(tw * factor))[None, :, :, None]
  out = jnp.zeros((b, h * factor, w * factor, out_tiles.shape[-1]), out_tiles.dtype)
  norm = jnp.zeros((1, h * factor, w * factor, 1), out_tiles.dtype)
  for k, (y, x) in enumerate(origins):
    ys, xs = slice(y * factor, (y + th) * factor), slice(x * factor, (x + tw) * factor)
    out = out.at[:, ys, xs].add(out_tiles[k] * weight)
    norm = norm.at[:, ys, xs].add(weight)
  return out / norm


def tiled_model(model_fn, tile: int, overlap: float = 0.25, multiple: int = 1):
  """model_fn(x_t, t, cond) evaluated on overlapping tiles of x_t and of cond['concat'] (the
  context, labels and masks are shared by every tile), blended: the sampler sees the same
  calling convention (MultiDiffusion-style tiled denoising)."""
  if not tile:
    return model_fn

  def fn(x, t, cond):
    concat = cond.get("concat")
    if concat is None:
      return tiled_apply(lambda xt: model_fn(xt, t, cond), [x], tile, 1, overlap, multiple)
    return tiled_apply(lambda xt, ct: model_fn(xt, t, dict(cond, concat=ct)), [x, concat],
                       tile, 1, overlap, multiple)

  return fn
