"""Stage-1 training on real digits: the reconstruction loss falls well below its start, the GAN
switches on at disc_start, and the VQ variants train their codebooks."""
import jax
import pytest

from ldm_jax.training.loop import train_and_evaluate
from tests.conftest import load_config


def _one_device(c):
  c.mesh.fsdp = 1
  return jax.devices()[:1]


@pytest.mark.slow  # 2 min of CPU: falling losses are in the default run via test_harness
def test_tiny_kl_autoencoder_learns_digits_and_gan_starts_on_time(tmp_path):
  c = load_config("tiny_ae")
  c.data.image_size, c.data.resize_mode = 16, "stretch"   # 4x cheaper than 32 px on a CPU
  c.model.ch_mult = (1, 2)
  c.train.num_steps = 200
  c.train.log_every = 20
  c.train.ckpt_every = 200
  c.train.eval_every = 200
  c.train.image_every = 200
  c.train.lr = 1e-3
  c.loss.disc_start = 160
  history = train_and_evaluate(c, str(tmp_path), devices=_one_device(c))
  train = [h for h in history if "rec_loss" in h]
  rec = {h["step"]: h["rec_loss"] for h in train}
  # Means over 20-step windows: the first window already includes 20 updates.
  assert rec[160] < 0.4 * rec[20], rec
  # The GAN (with the reference's adaptive weight) perturbs an unconverged model, but the
  # reconstructions stay far better than at the start.
  assert rec[200] < 0.6 * rec[20], rec
  factor = {h["step"]: h["disc_factor"] for h in train}
  # Steps are 1-based and the GAN is on from update index 160, i.e. logged steps 161+.
  assert factor[160] == 0.0 and factor[180] == 1.0 and factor[200] == 1.0
  assert all(h["d_loss"] > 0 for h in train if h["step"] > 160)
  assert all(h["d_loss"] == 0 for h in train if h["step"] <= 160)
  grids = sorted((tmp_path / "images").glob("reconstructions_*.png"))
  assert grids, "no reconstruction grid written"


@pytest.mark.slow  # compile-bound on CPU; run with -m slow
def test_vq_autoencoder_with_ema_codebook_and_restarts_trains(tmp_path):
  """(LPIPS inside the loss is covered by tests/losses; VGG16 would make this run 8x longer.)"""
  c = load_config("tiny_ae", "vq")
  c.data.image_size, c.data.resize_mode = 16, "stretch"
  c.model.ch_mult = (1, 2)
  c.model.vq_ema_decay = 0.9
  c.model.vq_restart_dead = True
  c.model.vq_dead_threshold = 0.3
  c.loss.disc_start = 1000
  c.train.num_steps = 60
  c.train.log_every = 10
  c.train.ckpt_every = 60
  c.train.lr = 1e-3
  c.data.eval_split = ""
  history = train_and_evaluate(c, str(tmp_path), devices=_one_device(c))
  rec = [h["rec_loss"] for h in history]
  assert rec[-1] < 0.7 * rec[0], rec
  # With restarts, codes unused by the early batches are re-seeded: usage and perplexity grow.
  assert history[-1]["perplexity"] > 2 * history[0]["perplexity"], history
  assert history[-1]["codebook_usage"] > 0.5
