"""The PatchGAN discriminator (pix2pix NLayerDiscriminator) used by the stage-1 GAN loss."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype


class NLayerDiscriminator(nn.Module):
  """4x4 convs: stride 2 for the first `num_layers`, then stride 1; LeakyReLU(0.2).

  Returns one logit per overlapping image patch, shape (B, h, w, 1). Weights start from
  N(0, 0.02) and norm scales from N(1, 0.02), as the reference initialises them.
  """
  base_channels: int = 64
  num_layers: int = 3
  norm: str = "batch"   # 'batch' | 'group' | 'none'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    w_init = nn.initializers.normal(0.02)
    scale_init = lambda key, shape, dtype=jnp.float32: 1.0 + 0.02 * jax.random.normal(  # noqa
        key, shape, dtype)

    def conv4(features, stride, bias, name):
      return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=bias, kernel_init=w_init, dtype=self.dtype,
                     param_dtype=jnp.float32, name=name)

    def normalise(h, name):
      if self.norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            scale_init=scale_init, dtype=jnp.float32, name=name)(h)
      if self.norm == "group":
        return nn.GroupNorm(num_groups=32, scale_init=scale_init, dtype=jnp.float32, name=name)(h)
      return h

    has_bias = self.norm == "none"
    h = nn.leaky_relu(conv4(self.base_channels, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
    for n in range(1, self.num_layers + 1):
      mult = min(2 ** n, 8)
      stride = 2 if n < self.num_layers else 1
      h = conv4(self.base_channels * mult, stride, has_bias, f"conv_{n}")(h)
      h = nn.leaky_relu(normalise(h, f"norm_{n}"), 0.2).astype(self.dtype)
    return conv4(1, 1, True, f"conv_{self.num_layers + 1}")(h).astype(jnp.float32)
