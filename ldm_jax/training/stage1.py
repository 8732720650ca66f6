"""Stage 1: the autoencoder and its PatchGAN discriminator, updated in one jitted step.

The generator's gradient is assembled from three backward passes that never repeat work: the
reconstruction NLL (through LPIPS) and the adversarial loss (through the discriminator) are each
differentiated only as far back as the decoder's last conv (where the adaptive weight compares
their gradient norms), and one pass through the decoder trunk and encoder carries their weighted
sum plus the KL / codebook term. The discriminator is updated on the same batch against the
pre-update reconstructions (the reference recomputes them after the generator update).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ldm_jax.data.preprocess import image_example_fn
from ldm_jax.evaluation import metrics as image_metrics
from ldm_jax.losses import autoencoder as losses
from ldm_jax.models.autoencoder import apply_codebook_restarts
from ldm_jax.models.build import build_autoencoder, build_discriminator, dtype_of
from ldm_jax.training import optim
from ldm_jax.training.stages import Stage, apply_step
from ldm_jax.training.state import TrainState

def reconstruct(ae, variables, x, is_vq: bool):
  """Deterministic reconstruction (posterior mode / quantised latent) and its extra metrics."""
  if is_vq:
    x_rec, qloss, info = ae.apply(variables, x, False)
    return x_rec, {"codebook_loss": qloss, "perplexity": info["perplexity"]}
  posterior = ae.apply(variables, x, False, method="encode")
  x_rec = ae.apply(variables, posterior.mode(), False, method="decode")
  return x_rec, {"kl": losses.kl_loss(posterior)}


class AutoencoderStage(Stage):
  """Trains AutoencoderKL / VQModel with L1 (or L2) + LPIPS + KL / VQ + PatchGAN losses."""
  name = "autoencoder"

  def __init__(self, config, mesh, workdir: str | None = None, facts: dict | None = None):
    super().__init__(config, mesh, workdir, facts)
    m, l, t = config.model, config.loss, config.train
    self.dtype = dtype_of(t.compute_dtype)
    self.is_vq = m.type == "vq"
    self.ae = build_autoencoder(m, image_size=config.data.image_size,
                                channels=config.data.channels, dtype=self.dtype)
    self.disc = build_discriminator(config.disc, self.dtype)
    self.lpips = None
    if l.lpips_weight > 0:
      from ldm_jax.models.lpips import LPIPS, load_lpips_params  # pylint: disable=g-import-not-at-top
      self.lpips = LPIPS(dtype=self.dtype)
      self.frozen = {"lpips": load_lpips_params(l.lpips_weights)}
    self.d_loss = losses.D_LOSSES[l.gan_loss]
    labels = {"ae": "gen", "disc": "disc", "logvar": "gen" if l.learn_logvar else "frozen"}
    self.tx = optax.multi_transform(
        {"gen": optim.optimizer(t), "disc": optim.optimizer(t, lr=config.disc.lr),
         "frozen": optax.set_to_zero()}, labels)

  # -- data and state --------------------------------------------------------------------------
  def example_fn(self, train: bool):
    return image_example_fn(self.config.data, train)

  def init(self, rng, batch) -> TrainState:
    x = batch["image"][:1]
    r_ae, r_disc, r_sample = jax.random.split(jax.random.fold_in(rng, 0), 3)
    ae_vars = self.ae.init({"params": r_ae, "sample": r_sample, "dropout": r_sample}, x)
    disc_vars = self.disc.init(r_disc, x, train=False)
    params = {"ae": ae_vars["params"], "disc": disc_vars["params"],
              "logvar": jnp.asarray(self.config.loss.logvar_init, jnp.float32)}
    model_state = {"vq": ae_vars.get("vq", {}), "disc": disc_vars.get("batch_stats", {})}
    ema = params["ae"] if self.config.train.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), ema_params=ema,
                      model_state=model_state, rng=rng)

  def ae_variables(self, params_ae, model_state):
    variables = {"params": params_ae}
    if self.is_vq:
      variables["vq"] = model_state["vq"]
    return variables

  # -- training: gradient assembly, top to bottom ----------------------------------------------
  def autoencoder_trunk(self, ae_params, model_state, x, rngs, r_sample):
    """Encoder -> latent -> decoder features before conv_out, the KL / VQ term, and aux."""
    variables = self.ae_variables(ae_params, model_state)
    if self.is_vq:
      h_pre = self.ae.apply(variables, x, True, method="encode", rngs=rngs)
      (zq, reg, info), updated = self.ae.apply(variables, h_pre, True, method="quantize_latent",
                                               rngs=rngs, mutable=["vq"])
      h = self.ae.apply(variables, zq, True, method="decode_features", rngs=rngs)
      aux = {"vq": updated["vq"], "perplexity": info["perplexity"],
             "codebook_usage": info["codebook_usage"]}
    else:
      posterior = self.ae.apply(variables, x, True, method="encode", rngs=rngs)
      z = posterior.sample(r_sample)
      h = self.ae.apply(variables, z, True, method="decode_features", rngs=rngs)
      reg = losses.kl_loss(posterior)
      aux = {"vq": {}}
    return (h, reg), aux

  def decoder_head(self, head_params, h):
    """The decoder's conv_out (with its norm and activation): features -> image."""
    return self.ae.apply({"params": {"decoder": {"conv_out": head_params}}}, h,
                         method="decode_head")

  def nll_and_grads(self, head_params, h, logvar, x, frozen):
    """Reconstruction NLL (through LPIPS), differentiated back to conv_out, its input and logvar.

    Returns (nll, x_rec, mean pixel loss, per-example LPIPS or None), (g_head, g_h, g_logvar).
    """
    l = self.config.loss

    def nll_fn(hp, feats, lv):
      x_rec = self.decoder_head(hp, feats)
      rec = losses.pixel_loss(x, x_rec, l.rec_loss)
      perceptual = None
      if self.lpips is not None:
        perceptual = self.lpips.apply({"params": frozen["lpips"]}, x, x_rec)
      nll = losses.reconstruction_nll(rec, perceptual, l.lpips_weight, lv,
                                      "mean" if self.is_vq else "sum")
      return nll, (x_rec, jnp.mean(rec), perceptual)

    nll, nll_vjp, (x_rec, rec_loss, perceptual) = jax.vjp(
        nll_fn, head_params, h, logvar, has_aux=True)
    return (nll, x_rec, rec_loss, perceptual), nll_vjp(jnp.ones_like(nll))

  def discriminator_loss(self, disc_params, disc_stats, x, x_rec, gan):
    """gan * D loss on real images and the (stop-gradient) reconstructions; updated BN stats."""
    fake = jax.lax.stop_gradient(x_rec)
    real_logits, upd = self.disc.apply({"params": disc_params, "batch_stats": disc_stats},
                                       x, True, mutable=["batch_stats"])
    stats = upd.get("batch_stats", disc_stats)
    fake_logits, upd = self.disc.apply({"params": disc_params, "batch_stats": stats},
                                       fake, True, mutable=["batch_stats"])
    stats = upd.get("batch_stats", stats)
    d_loss = gan * self.d_loss(real_logits, fake_logits)
    return d_loss, (stats, jnp.mean(real_logits), jnp.mean(fake_logits))

  def gan_grads(self, disc_params, disc_stats, head_params, h, g_head, x, x_rec, gan):
    """The GAN terms: generator gradients at conv_out, the adaptive weight, the D loss and grads.

    Returns (g_head_adv, g_h_adv, g_disc, new disc BN stats, GAN metrics).
    """
    l = self.config.loss

    def g_fn(hp, feats):
      logits = self.disc.apply({"params": disc_params, "batch_stats": disc_stats},
                               self.decoder_head(hp, feats), True, mutable=["batch_stats"])[0]
      return losses.generator_adversarial_loss(logits)

    g_loss, g_vjp = jax.vjp(g_fn, head_params, h)
    g_head_adv, g_h_adv = g_vjp(jnp.ones_like(g_loss))
    if l.adaptive_weight:
      weight = losses.adaptive_weight(g_head["kernel"], g_head_adv["kernel"], l.disc_weight)
    else:
      weight = jnp.asarray(l.disc_weight, jnp.float32)
    (d_loss, (stats, real, fake)), g_disc = jax.value_and_grad(
        self.discriminator_loss, has_aux=True)(disc_params, disc_stats, x, x_rec, gan)
    return (g_head_adv, g_h_adv, g_disc, stats,
            {"g_loss": g_loss, "d_weight": weight, "d_loss": d_loss, "logits_real": real,
             "logits_fake": fake})

  def no_gan_grads(self, disc_params, disc_stats, *rest):
    """gan_grads' outputs before disc_start: zeros, and the BN stats left as they are."""
    shapes = jax.eval_shape(self.gan_grads, disc_params, disc_stats, *rest)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return zeros[:3] + (disc_stats,) + zeros[4:]

  def assemble_generator_grads(self, trunk_vjp, h, reg, reg_weight, g_h, g_h_adv, g_head,
                               g_head_adv, coef):
    """One trunk backward pass with g_h + coef * g_h_adv (and reg_weight on the KL / VQ term),
    plus conv_out's own gradients g_head + coef * g_head_adv."""
    (g_ae,) = trunk_vjp(((g_h + coef * g_h_adv).astype(h.dtype),
                         jnp.asarray(reg_weight, reg.dtype)))
    g_ae = dict(g_ae)
    g_ae["decoder"] = dict(g_ae["decoder"])
    g_ae["decoder"]["conv_out"] = jax.tree_util.tree_map(
        lambda trunk_g, a, b: trunk_g + a + coef * b, g_ae["decoder"]["conv_out"], g_head,
        g_head_adv)
    return g_ae

  def _grads(self, params, model_state, batch, rng, step, frozen):
    """Gradients of one (micro-)batch for the autoencoder, the discriminator and logvar."""
    l = self.config.loss
    x = batch["image"]
    r_sample, r_drop, r_restart = jax.random.split(rng, 3)
    rngs = {"dropout": r_drop, "restart": r_restart}
    gan = losses.gan_factor(step, l.disc_start, l.disc_factor)

    # 1. The trunk's forward pass, kept (as a vjp) for the one backward pass of step 4.
    trunk = lambda ae_params: self.autoencoder_trunk(  # noqa: E731
        ae_params, model_state, x, rngs, r_sample)
    (h, reg), trunk_vjp, aux = jax.vjp(trunk, params["ae"], has_aux=True)
    head_params = params["ae"]["decoder"]["conv_out"]
    # 2. The NLL's gradients at conv_out and its input features.
    (nll, x_rec, rec_loss, perceptual), (g_head, g_h, g_logvar) = self.nll_and_grads(
        head_params, h, params["logvar"], x, frozen)
    # 3. The GAN terms, skipped at run time (lax.cond) before disc_start.
    gan_args = (params["disc"], model_state["disc"], head_params, h, g_head, x, x_rec, gan)
    g_head_adv, g_h_adv, g_disc, disc_stats, gan_metrics = jax.lax.cond(
        gan > 0, lambda _: self.gan_grads(*gan_args), lambda _: self.no_gan_grads(*gan_args),
        None)
    coef = gan_metrics["d_weight"] * gan
    # 4. One backward pass through the trunk with the weighted sum of both cotangents.
    reg_weight = l.codebook_weight if self.is_vq else l.kl_weight
    g_ae = self.assemble_generator_grads(trunk_vjp, h, reg, reg_weight, g_h, g_h_adv, g_head,
                                         g_head_adv, coef)

    grads = {"ae": g_ae, "disc": g_disc, "logvar": g_logvar}
    new_state = {"vq": aux["vq"] if self.is_vq else model_state["vq"], "disc": disc_stats}
    metrics = {
        "loss": nll + reg_weight * reg + coef * gan_metrics["g_loss"],
        "nll_loss": nll, "rec_loss": rec_loss,
        "psnr": jnp.mean(image_metrics.psnr(x, x_rec)),
        "disc_factor": gan, "logvar": params["logvar"], **gan_metrics,
    }
    if perceptual is not None:
      metrics["lpips"] = jnp.mean(perceptual)
    if self.is_vq:
      metrics.update(codebook_loss=reg, perplexity=aux["perplexity"],
                     codebook_usage=aux["codebook_usage"])
    else:
      metrics["kl_loss"] = reg
    return grads, new_state, metrics

  def train_step(self, state: TrainState, batch, frozen):
    post_update = None
    if self.is_vq and self.config.model.vq_restart_dead:
      post_update = lambda params, model_state: {  # noqa: E731
          **params, "ae": apply_codebook_restarts(params["ae"], model_state["vq"])}
    return apply_step(
        state, batch, tx=self.tx, train_config=self.config.train,
        grad_fn=lambda p, ms, b, r: self._grads(p, ms, b, r, state.step, frozen),
        post_update=post_update, ema_of=lambda params: params["ae"],
        grad_norm_of=lambda grads: grads["ae"])

  # -- evaluation ------------------------------------------------------------------------------
  def eval_variables(self, state: TrainState):
    params = state.ema_params if state.ema_params is not None else state.params["ae"]
    return self.ae_variables(params, state.model_state)

  def eval_step(self, state, batch, frozen):
    x = batch["image"]
    x_rec, extra = reconstruct(self.ae, self.eval_variables(state), x, self.is_vq)
    out = {"rec_loss": jnp.mean(jnp.abs(x - x_rec)),
           "psnr": jnp.mean(image_metrics.psnr(x, x_rec)),
           "ssim": jnp.mean(image_metrics.ssim(x, x_rec)), **extra}
    if self.lpips is not None:
      out["lpips"] = jnp.mean(self.lpips.apply({"params": frozen["lpips"]}, x, x_rec))
    return out

  fid_name = "rfid"

  def generate(self, state, batch, frozen):
    """(originals, reconstructions) of a batch: for rFID (training/fid.py) and the image
    summaries."""
    del frozen
    x = batch["image"]
    x_rec, _ = reconstruct(self.ae, self.eval_variables(state), x, self.is_vq)
    return x, jnp.clip(x_rec, -1.0, 1.0)

  def summaries(self, state, batch, frozen):
    n = self.config.train.num_summary_images
    x, x_rec = self.generate(state, {"image": batch["image"][:n]}, frozen)
    return {"reconstructions": jnp.concatenate([x, x_rec], axis=0)}

  def inference_params(self, state) -> dict:
    return {"autoencoder": self.eval_variables(state)}
