"""Stage-1 losses: reconstruction NLL (pixels + LPIPS), KL/VQ terms, GAN losses, and the
adaptive discriminator weight. Pure functions of arrays; the train step (training/stage1.py)
wires them together."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pixel_loss(x, x_rec, kind: str = "l1"):
  """Per-element reconstruction error, same shape as x."""
  diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
  if kind == "l1":
    return jnp.abs(diff)
  if kind == "l2":
    return jnp.square(diff)
  raise ValueError(f"loss.rec_loss: unknown kind '{kind}'")


def reconstruction_nll(rec, perceptual, lpips_weight: float, logvar, reduction: str):
  """(rec + w * LPIPS) / exp(logvar) + logvar, reduced as the reference does.

  rec: per-element error (B, H, W, C); perceptual: per-image LPIPS (B,) or None.
  reduction 'sum' (KL models): summed over all elements, divided by the batch size, so the
  per-image LPIPS value counts once per pixel, as in the reference; 'mean' (VQ models): mean.
  """
  if perceptual is not None and lpips_weight > 0:
    rec = rec + lpips_weight * perceptual[:, None, None, None]
  nll = rec / jnp.exp(logvar) + logvar
  if reduction == "sum":
    return jnp.sum(nll) / nll.shape[0]
  if reduction == "mean":
    return jnp.mean(nll)
  raise ValueError(f"unknown reduction '{reduction}'")


def kl_loss(posterior):
  """KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch."""
  return jnp.mean(posterior.kl())


def generator_adversarial_loss(logits_fake):
  """The generator wants the discriminator to call its reconstructions real."""
  return -jnp.mean(logits_fake)


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_grad_last, g_grad_last, disc_weight: float):
  """||grad_last nll|| / (||grad_last g|| + 1e-4), clamped to [0, 1e4], times disc_weight.

  The gradients are those of the reconstruction NLL and of the generator's GAN loss with respect
  to the decoder's last layer (its conv_out kernel). No gradient flows through the weight.
  """
  num = jnp.sqrt(jnp.sum(jnp.square(nll_grad_last.astype(jnp.float32))))
  den = jnp.sqrt(jnp.sum(jnp.square(g_grad_last.astype(jnp.float32)))) + 1e-4
  weight = jnp.clip(num / den, 0.0, 1e4)
  return jax.lax.stop_gradient(weight) * disc_weight


def gan_factor(step, disc_start: int, disc_factor: float):
  """disc_factor once step >= disc_start, else 0 (the reference's adopt_weight)."""
  return jnp.where(step >= disc_start, disc_factor, 0.0).astype(jnp.float32)
