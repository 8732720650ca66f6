"""The latent-diffusion UNet (the reference's openaimodel UNetModel), NHWC.

Block names follow the reference's checkpoints: input_blocks_{n}_{m}, middle_block_{m},
output_blocks_{n}_{m}, where n counts the blocks of the encoder/decoder path and m the layers
inside one (a ResBlock, then attention, then an up/down sampler), so the weight converters map
names without tracking the architecture.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import AttentionBlock, SpatialTransformer
from ldm_jax.models.layers import (Dtype, conv, group_norm, group_norm_silu, maybe_remat,
                                   timestep_embedding, upsample_nearest)


class ResBlock(nn.Module):
  """GN-SiLU-conv, plus the projected time embedding (added, or as scale and shift of the
  second norm), GN-SiLU-dropout-conv (zero-initialised), and a skip (identity or 1x1).
  `updown` resamples inside the block ('up': nearest x2, 'down': 2x2 average pooling)."""
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  updown: str = "none"
  dtype: Dtype = jnp.float32
  norm_groups: int = 32
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    norm = lambda name: group_norm(name, self.norm_eps, self.norm_groups)  # noqa: E731
    def resample(v):
      if self.updown == "up":
        return upsample_nearest(v)
      if self.updown == "down":
        return nn.avg_pool(v, (2, 2), strides=(2, 2))
      return v

    h = group_norm_silu("in_norm", self.norm_eps, self.norm_groups)(x).astype(self.dtype)
    h = conv(self.out_channels, dtype=self.dtype, name="in_conv")(resample(h))
    x = resample(x)
    emb_out = nn.Dense((2 if self.use_scale_shift_norm else 1) * self.out_channels,
                       dtype=self.dtype, param_dtype=jnp.float32, name="emb_proj")(
                           nn.silu(emb).astype(self.dtype))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out.astype(jnp.float32), 2, axis=-1)
      h = norm("out_norm")(h) * (1.0 + scale) + shift
    else:
      h = norm("out_norm")(h + emb_out)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h).astype(self.dtype))
    h = conv(self.out_channels, dtype=self.dtype, kernel_init=nn.initializers.zeros,
             name="out_conv")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, kernel=1, dtype=self.dtype, name="skip")(x)
    return x + h


def heads_for_level(channels: int, level: int, num_heads, num_head_channels: int):
  """(heads, head_dim) of an attention layer: fixed head width or a head count per level."""
  if num_head_channels > 0:
    if channels % num_head_channels:
      raise ValueError(f"unet.num_head_channels ({num_head_channels}) must divide the "
                       f"{channels} channels of level {level}")
    return channels // num_head_channels, num_head_channels
  heads = num_heads[level] if isinstance(num_heads, (tuple, list)) else num_heads
  if heads <= 0 or channels % heads:
    raise ValueError(f"unet: {heads} heads do not divide the {channels} channels of level "
                     f"{level} (set unet.num_heads or unet.num_head_channels)")
  return heads, channels // heads


class UNet(nn.Module):
  """eps_theta(x_t, t, context, y): the denoiser of latent diffusion.

  attention_resolutions are DOWNSAMPLE FACTORS (1 = the input resolution), as in the reference.
  `context` (B, L, context_dim) feeds the SpatialTransformers' cross-attention (with an
  optional (B, L) `context_mask`); `y` (B,) class labels are embedded and added to the time
  embedding (the "adm" path) when num_classes > 0. `norm_groups` / `norm_eps` are the GroupNorm
  group count and epsilon (diffusers' norm_num_groups / norm_eps; the SpatialTransformer's norm
  keeps epsilon 1e-6). `activation_sharding` (a NamedSharding of the batch axis, or None) pins
  the activations between blocks to it, so SPMD partitioning gathers FSDP-sharded weights
  rather than splitting activations by channel; batches it does not divide are left alone.
  """
  in_channels: int = 4
  out_channels: int = 4
  model_channels: int = 256
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (4, 2, 1)
  dropout: float = 0.0
  conv_resample: bool = True
  num_classes: int = 0
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  num_heads: int | Sequence[int] = -1
  num_head_channels: int = -1
  use_spatial_transformer: bool = False
  transformer_depth: int = 1
  use_linear_proj: bool = False
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = "auto"
  norm_groups: int = 32
  norm_eps: float = 1e-5
  activation_sharding: Any = None
  attention_coords: bool = False

  def _constrain(self, h):
    """h pinned to `activation_sharding` (when set and it divides the batch)."""
    sharding = self.activation_sharding
    if sharding is None:
      return h
    axes = sharding.spec[0] if sharding.spec else None
    axes = axes if isinstance(axes, tuple) else (axes,)
    if h.shape[0] % math.prod(sharding.mesh.shape[a] for a in axes if a is not None):
      return h
    return jax.lax.with_sharding_constraint(h, sharding)

  def _attention(self, channels, level, name):
    heads, head_dim = heads_for_level(channels, level, self.num_heads, self.num_head_channels)
    if self.use_spatial_transformer:
      cls = maybe_remat(SpatialTransformer, self.remat, static_argnums=(4,))
      return cls(heads, head_dim, self.transformer_depth, self.dropout, self.use_linear_proj,
                 self.dtype, self.attention_impl, self.norm_groups, self.attention_coords,
                 name=name)
    cls = maybe_remat(AttentionBlock, self.remat)
    return cls(heads, self.dtype, self.attention_impl, self.norm_groups, self.norm_eps,
               name=name)

  def _apply_attention(self, layer, h, context, mask, train):
    if self.use_spatial_transformer:
      return layer(h, context, mask, train)
    return layer(h)

  @nn.compact
  def __call__(self, x, t, context=None, y=None, context_mask=None, train: bool = False):
    res_cls = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    res_block = lambda c, updown, name: res_cls(  # noqa: E731
        c, self.dropout, self.use_scale_shift_norm, updown, self.dtype, self.norm_groups,
        self.norm_eps, name=name)
    mc = self.model_channels
    emb_dim = 4 * mc
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                     name=name)
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    emb = dense(emb_dim, "time_embed_0")(timestep_embedding(t, mc).astype(self.dtype))
    emb = dense(emb_dim, "time_embed_2")(nn.silu(emb))
    if self.num_classes > 0:
      if y is None:
        raise ValueError("UNet: this model has num_classes > 0 and needs class labels y")
      emb = emb + nn.Embed(self.num_classes, emb_dim, param_dtype=jnp.float32,
                           name="label_emb")(y).astype(emb.dtype)

    h = self._constrain(conv(mc, dtype=self.dtype, name="input_blocks_0_0")(x.astype(self.dtype)))
    skips, ch, ds, n = [h], mc, 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = mult * mc
        h = res_block(ch, "none", f"input_blocks_{n}_0")(h, emb, train)
        if ds in self.attention_resolutions:
          h = self._apply_attention(self._attention(ch, level, f"input_blocks_{n}_1"), h,
                                    context, context_mask, train)
        h = self._constrain(h)
        skips.append(h)
        n += 1
      if level != len(self.channel_mult) - 1:
        name = f"input_blocks_{n}_0"
        if self.resblock_updown:
          h = res_block(ch, "down", name)(h, emb, train)
        elif self.conv_resample:
          h = conv(ch, stride=2, padding=((1, 1), (1, 1)), dtype=self.dtype,
                   name=name)(h)
        else:
          h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = self._constrain(h)
        skips.append(h)
        ds *= 2
        n += 1

    last = len(self.channel_mult) - 1
    h = res_block(ch, "none", "middle_block_0")(h, emb, train)
    h = self._apply_attention(self._attention(ch, last, "middle_block_1"), h, context,
                              context_mask, train)
    h = self._constrain(res_block(ch, "none", "middle_block_2")(h, emb, train))

    n = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        ch = mult * mc
        h = res_block(ch, "none", f"output_blocks_{n}_0")(h, emb, train)
        m = 1
        if ds in self.attention_resolutions:
          h = self._apply_attention(self._attention(ch, level, f"output_blocks_{n}_1"), h,
                                    context, context_mask, train)
          m = 2
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{n}_{m}"
          if self.resblock_updown:
            h = res_block(ch, "up", name)(h, emb, train)
          else:
            h = upsample_nearest(h)
            if self.conv_resample:
              h = conv(ch, dtype=self.dtype, name=name)(h)
          ds //= 2
        h = self._constrain(h)
        n += 1

    h = group_norm_silu("out_norm", self.norm_eps, self.norm_groups)(h).astype(self.dtype)
    out = conv(self.out_channels, dtype=self.dtype, kernel_init=nn.initializers.zeros,
               name="out_conv")(h)
    return out.astype(jnp.float32)
