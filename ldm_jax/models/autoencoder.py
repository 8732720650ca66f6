"""The first stage: Encoder, Decoder, AutoencoderKL (KL-reg) and VQModel (VQ-reg).

Module names follow the reference checkpoints (encoder.down.{i}.block.{j} becomes
encoder/down_{i}_block_{j}), which keeps the weight converters a plain renaming. Attention
placement is decided by level from the training `resolution`, so larger inputs keep the same
architecture (convolutional sampling of large images relies on that). `mid_attention=False`
drops the attention between the two mid-block ResNet blocks of encoder and decoder (CompVis'
attn_type 'none', diffusers' mid_block_add_attention=False).
"""
from __future__ import annotations

from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import AttnBlock
from ldm_jax.models.layers import (Downsample, Dtype, ResnetBlock, Upsample, conv,
                                   group_norm_silu, maybe_remat, remat_policy)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@flax.struct.dataclass
class DiagonalGaussian:
  """The KL autoencoder's posterior q(z|x) = N(mean, exp(logvar)), per latent element."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments):
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self):
    return jnp.exp(self.logvar)

  def sample(self, rng):
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q || N(0, I)) summed over each latent: shape (B,)."""
    return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class Encoder(nn.Module):
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 4
  double_z: bool = True
  resolution: int = 256
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = "auto"
  norm_groups: int = 32
  mid_attention: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    resnet = maybe_remat(ResnetBlock, self.remat, static_argnums=(2,))
    block = lambda c, name: resnet(c, self.dropout, self.dtype, self.norm_groups,  # noqa: E731
                                   name=name)
    attn = lambda name: AttnBlock(self.dtype, self.attention_impl, self.norm_groups,  # noqa: E731
                                  name=name)
    h = conv(self.ch, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = block(self.ch * mult, f"down_{i}_block_{j}")(h, train)
        if res in self.attn_resolutions:
          h = attn(f"down_{i}_attn_{j}")(h)
      if i != len(self.ch_mult) - 1:
        h = Downsample(True, self.dtype, name=f"down_{i}_downsample")(h)
        res //= 2
    width = self.ch * self.ch_mult[-1]
    h = block(width, "mid_block_1")(h, train)
    if self.mid_attention:
      h = attn("mid_attn_1")(h)
    h = block(width, "mid_block_2")(h, train)
    h = group_norm_silu("norm_out", groups=self.norm_groups)(h).astype(self.dtype)
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return conv(out, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """`part`: 'all' decodes; 'features' stops before conv_out; 'head' applies conv_out alone.

  The split lets the stage-1 loss take gradients at the last layer (adaptive GAN weight)
  without a second backward pass through the whole decoder.
  """
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  resolution: int = 256
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = "auto"
  norm_groups: int = 32
  mid_attention: bool = True

  @nn.compact
  def __call__(self, z, train: bool = False, part: str = "all"):
    if part == "head":
      return conv(self.out_ch, dtype=self.dtype, name="conv_out")(z).astype(jnp.float32)
    resnet = maybe_remat(ResnetBlock, self.remat, static_argnums=(2,))
    block = lambda c, name: resnet(c, self.dropout, self.dtype, self.norm_groups,  # noqa: E731
                                   name=name)
    attn = lambda name: AttnBlock(self.dtype, self.attention_impl, self.norm_groups,  # noqa: E731
                                  name=name)
    levels = len(self.ch_mult)
    width = self.ch * self.ch_mult[-1]
    res = self.resolution // 2 ** (levels - 1)
    h = conv(width, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    h = block(width, "mid_block_1")(h, train)
    if self.mid_attention:
      h = attn("mid_attn_1")(h)
    h = block(width, "mid_block_2")(h, train)
    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = block(self.ch * self.ch_mult[i], f"up_{i}_block_{j}")(h, train)
        if res in self.attn_resolutions:
          h = attn(f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = Upsample(True, dtype=self.dtype, name=f"up_{i}_upsample")(h)
        res *= 2
    h = group_norm_silu("norm_out", groups=self.norm_groups)(h).astype(self.dtype)
    if part == "features":
      return h
    return conv(self.out_ch, dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)


class _FirstStage(nn.Module):
  """Fields shared by both autoencoders."""
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 4
  embed_dim: int = 4
  resolution: int = 256
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = "auto"
  norm_groups: int = 32
  mid_attention: bool = True

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def _coder_kwargs(self):
    return dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                dropout=self.dropout, dtype=self.dtype, remat=self.remat,
                attention_impl=self.attention_impl, norm_groups=self.norm_groups,
                mid_attention=self.mid_attention)

  def _coders(self):
    """The Encoder and Decoder classes; remat='full' rematerialises each as one unit (the
    nearest the two-part autoencoder has to whole-model remat; names and weights unchanged)."""
    if remat_policy(self.remat) == "full":
      return nn.remat(Encoder, static_argnums=(2,)), nn.remat(Decoder, static_argnums=(2, 3))
    return Encoder, Decoder

  def decode_features(self, z, train: bool = False):
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)), train, "features")

  def decode_head(self, h):
    return self.decoder(h, False, "head")


class AutoencoderKL(_FirstStage):
  """KL-regularised autoencoder: encode -> DiagonalGaussian posterior, decode(z) -> image."""

  def setup(self):
    encoder, decoder = self._coders()
    self.encoder = encoder(z_channels=self.z_channels, double_z=True, **self._coder_kwargs())
    self.decoder = decoder(out_ch=self.out_ch, **self._coder_kwargs())
    self.quant_conv = conv(2 * self.embed_dim, kernel=1, dtype=self.dtype)
    self.post_quant_conv = conv(self.z_channels, kernel=1, dtype=self.dtype)

  def encode(self, x, train: bool = False) -> DiagonalGaussian:
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x, train)))

  def decode(self, z, train: bool = False):
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)), train, "all")

  def __call__(self, x, train: bool = False, sample_posterior: bool = True):
    posterior = self.encode(x, train)
    z = posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
    return self.decode(z, train), posterior


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantisation with straight-through gradients.

  loss = ||sg(z) - e||^2 + beta ||z - sg(e)||^2 (means). With `ema_decay` > 0 the codebook is
  instead the EMA of the encoder outputs assigned to each code (van den Oord et al. 2017, app.
  A.1) and the first term is dropped. A running usage frequency per code (decay 0.99) feeds the
  codebook metrics and dead-code restarts. All non-trained state lives in the 'vq' collection.

  With `restart_dead`, codes whose usage fell below `dead_threshold / n_embed` are re-initialised
  to random encoder outputs of the current batch: directly for the EMA codebook, and as a
  proposal ('restart_codes', 'restart_mask') that the train step applies after its optimizer
  update for the trained codebook (a module cannot change its own parameters).
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  ema_decay: float = 0.0
  restart_dead: bool = False
  dead_threshold: float = 1e-3

  @nn.compact
  def __call__(self, z, train: bool = False):
    n, d = self.n_embed, self.embed_dim
    init = nn.initializers.uniform(2.0 / n)
    uniform_init = lambda key, shape: init(key, shape) - 1.0 / n  # U(-1/n, 1/n)  # noqa: E731
    ema = self.ema_decay > 0
    if ema:
      codebook_var = self.variable("vq", "codebook",
                                   lambda: uniform_init(self.make_rng("params"), (n, d)))
      # Start as if each code had been assigned once: codebook == embed_sum / cluster_size.
      cluster_size = self.variable("vq", "cluster_size", lambda: jnp.ones((n,), jnp.float32))
      embed_sum = self.variable("vq", "embed_sum", lambda: codebook_var.value.copy())
      codebook = codebook_var.value
    else:
      codebook = self.param("embedding", uniform_init, (n, d))
    usage = self.variable("vq", "usage", lambda: jnp.full((n,), 1.0 / n, jnp.float32))
    if self.restart_dead and not ema:
      restart_codes = self.variable("vq", "restart_codes", lambda: jnp.zeros((n, d), jnp.float32))
      restart_mask = self.variable("vq", "restart_mask", lambda: jnp.zeros((n,), bool))

    flat = z.reshape(-1, d).astype(jnp.float32)
    indices = nearest_code(flat, codebook)
    zq = codebook[indices]
    commitment = jnp.mean((flat - jax.lax.stop_gradient(zq)) ** 2)
    if ema:
      loss = self.beta * commitment
    else:
      loss = jnp.mean((jax.lax.stop_gradient(flat) - zq) ** 2) + self.beta * commitment
    onehot = jax.nn.one_hot(indices, n, dtype=jnp.float32)
    avg = jnp.mean(onehot, axis=0)
    perplexity = jnp.exp(-jnp.sum(avg * jnp.log(avg + 1e-10)))
    if train and not self.is_initializing():
      usage.value = 0.99 * usage.value + 0.01 * avg
      if ema:
        decay = self.ema_decay
        cluster_size.value = decay * cluster_size.value + (1 - decay) * jnp.sum(onehot, 0)
        embed_sum.value = decay * embed_sum.value + (1 - decay) * (onehot.T @ flat)
        total = jnp.sum(cluster_size.value)
        smoothed = (cluster_size.value + 1e-5) / (total + n * 1e-5) * total
        codebook_var.value = embed_sum.value / smoothed[:, None]
      if self.restart_dead:
        new_codes, new_usage, dead = restart_dead_codes(
            codebook_var.value if ema else codebook, usage.value,
            jax.lax.stop_gradient(flat), self.make_rng("restart"), self.dead_threshold)
        usage.value = new_usage
        if ema:
          codebook_var.value = new_codes
          cluster_size.value = jnp.where(dead, 1.0, cluster_size.value)
          embed_sum.value = jnp.where(dead[:, None], new_codes, embed_sum.value)
        else:
          restart_codes.value, restart_mask.value = jax.lax.stop_gradient(new_codes), dead
    zq = flat + jax.lax.stop_gradient(zq - flat)
    info = {"indices": indices.reshape(z.shape[:-1]), "perplexity": perplexity,
            "codebook_usage": jnp.mean(usage.value > self.dead_threshold / n)}
    return zq.reshape(z.shape).astype(z.dtype), loss, info

  def lookup(self, indices):
    """Code vectors of integer indices (..., ) -> (..., embed_dim)."""
    if self.ema_decay > 0:
      return self.get_variable("vq", "codebook")[indices]
    return self.get_variable("params", "embedding")[indices]


def nearest_code(flat, codebook):
  """Index of the nearest codebook row (squared Euclidean) for each row of `flat`."""
  d = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)[None]
       - 2.0 * flat @ codebook.T)
  return jnp.argmin(d, axis=1)


def restart_dead_codes(codebook, usage, candidates, rng, threshold: float):
  """Replaces codes whose usage frequency < threshold / n by random rows of `candidates`.

  Returns (codebook, usage, dead mask). Restarted codes get a uniform usage so they are given
  time to be picked before they can be restarted again.
  """
  n = codebook.shape[0]
  dead = usage < threshold / n
  picks = jax.random.randint(rng, (n,), 0, candidates.shape[0])
  codebook = jnp.where(dead[:, None], candidates[picks].astype(codebook.dtype), codebook)
  usage = jnp.where(dead, 1.0 / n, usage)
  return codebook, usage, dead


def apply_codebook_restarts(params, vq_state):
  """Applies the quantiser's restart proposal to a trained codebook (params['quantize'])."""
  q = vq_state.get("quantize", {})
  if "restart_mask" not in q:
    return params
  params = dict(params)
  quantize = dict(params["quantize"])
  quantize["embedding"] = jnp.where(q["restart_mask"][:, None], q["restart_codes"],
                                    quantize["embedding"])
  params["quantize"] = quantize
  return params


class VQModel(_FirstStage):
  """VQ-regularised autoencoder.

  For the LDM, `encode` returns the pre-quantisation latent and `decode` quantises it first
  (diffusion runs in the continuous space; the decoder sees codebook vectors).
  """
  n_embed: int = 16384
  beta: float = 0.25
  ema_decay: float = 0.0
  restart_dead: bool = False
  dead_threshold: float = 1e-3

  def setup(self):
    encoder, decoder = self._coders()
    self.encoder = encoder(z_channels=self.z_channels, double_z=False, **self._coder_kwargs())
    self.decoder = decoder(out_ch=self.out_ch, **self._coder_kwargs())
    self.quant_conv = conv(self.embed_dim, kernel=1, dtype=self.dtype)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.ema_decay,
                                    self.restart_dead, self.dead_threshold)
    self.post_quant_conv = conv(self.z_channels, kernel=1, dtype=self.dtype)

  def encode(self, x, train: bool = False):
    return self.quant_conv(self.encoder(x, train)).astype(jnp.float32)

  def quantize_latent(self, h, train: bool = False):
    return self.quantize(h, train)

  def decode(self, h, train: bool = False, force_not_quantize: bool = False):
    if not force_not_quantize:
      h, _, _ = self.quantize(h, False)
    return self.decoder(self.post_quant_conv(h.astype(self.dtype)), train, "all")

  def decode_code(self, indices):
    return self.decode(self.quantize.lookup(indices), force_not_quantize=True)

  def __call__(self, x, train: bool = False):
    h = self.encode(x, train)
    zq, qloss, info = self.quantize(h, train)
    return self.decode(zq, train, force_not_quantize=True), qloss, info
