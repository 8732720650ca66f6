"""Fine-tuning a Stable Diffusion model (the tiny SD fixture, converted to an export) on a
captioned image folder through train.py's code: the UNet starts from the pretrained weights and
moves, the frozen VAE and CLIP text encoder stay bit-identical and out of the checkpoints, and
the result exports back to a diffusers pipeline folder that loads again."""
import jax
import numpy as np
import pytest

from ldm_jax.checkpoint import load_inference
from ldm_jax.data import demo_sets
from ldm_jax.errors import ConfigError
from ldm_jax.inference import export_pipeline, load_pipeline
from ldm_jax.interop.convert import main as convert_main
from ldm_jax.training.loop import Trainer
from tests.conftest import load_config
from tests.interop.helpers import sd_pipeline_folder


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd")
  folder = sd_pipeline_folder(root, "sd1")
  convert_main(["sd", "--checkpoint", str(folder), "--out", str(root / "export")])
  data = demo_sets.build_digits("captions", str(root / "captions"), count=16)
  return str(root / "export"), data


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_finetuning_moves_the_unet_and_keeps_the_frozen_parts(sd_export, tmp_path):
  export, data = sd_export
  config = load_config("sd15_finetune", f"tiny,{export}")
  config.data.path = data
  before, _, _ = load_inference(export)
  trainer = Trainer(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  try:
    start = jax.device_get(trainer.state.params)
    history = trainer.train()
    after = jax.device_get(trainer.state.params)
    frozen = jax.device_get(trainer.frozen)
  finally:
    trainer.close()
  assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
  # step 0 was the pretrained UNet, not a random init; training moved it
  for a, b in zip(_leaves(start["unet"]), _leaves(before["unet"]["params"])):
    np.testing.assert_array_equal(a, b)
  moved = [not np.array_equal(a, b) for a, b in zip(_leaves(after["unet"]), _leaves(start["unet"]))]
  assert sum(moved) > len(moved) // 2
  assert set(after) == {"unet", "cond"} and not after["cond"]   # nothing else trains
  # the frozen VAE and text encoder are bit-identical to the export's
  for a, b in zip(_leaves(frozen["autoencoder"]), _leaves(before["autoencoder"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(frozen["text_encoder"]), _leaves(before["cond"]["params"]["clip"])):
    np.testing.assert_array_equal(a, b)
  # the result samples, exports and goes back to diffusers, and that folder loads again
  tuned = load_pipeline(str(tmp_path / "run"))
  export_pipeline(tuned, str(tmp_path / "tuned"))
  convert_main(["to-diffusers", "--export", str(tmp_path / "tuned"), "--out",
                str(tmp_path / "hf")])
  again = load_pipeline(str(tmp_path / "hf"))
  for a, b in zip(_leaves(again.params["unet"]), _leaves(after["unet"])):
    np.testing.assert_allclose(a, b, rtol=0, atol=0)
  for a, b in zip(_leaves(again.params["cond"]["clip"]), _leaves(before["cond"]["params"]["clip"])):
    np.testing.assert_array_equal(a, b)


def test_a_pretrained_model_of_another_shape_is_named(sd_export, tmp_path):
  export, data = sd_export
  config = load_config("sd15_finetune", f"tiny,{export}")
  config.data.path = data
  config.unet.transformer_depth = 1       # the fixture's UNet has 2
  with pytest.raises(ConfigError, match="unet.init_from: .* is not this config's model"):
    trainer = Trainer(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    trainer.close()


# The recipe's run (bfloat16, fsdp=2) costs ~40 s more than one float32 device: -m slow.
@pytest.mark.parametrize("dtype,fsdp", [("float32", 1),
                                        pytest.param("bfloat16", 2, marks=pytest.mark.slow)])
def test_precomputed_clip_contexts_are_the_encoders(sd_export, tmp_path, dtype, fsdp):
  """cond.clip_precompute: the latent cache stores each caption's tokens and CLIP context;
  training reads them (no text encoder per step; also in bfloat16, sharded) and dropped
  captions get the empty prompt's."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ldm_jax.data.latent_cache import LatentCacheSource  # pylint: disable=g-import-not-at-top
  export, data = sd_export
  config = load_config("sd15_finetune", f"tiny,{export}")
  config.data.path = data
  config.first_stage.precompute_latents, config.cond.clip_precompute = True, True
  config.train.compute_dtype, config.mesh.fsdp = dtype, fsdp    # fsdp over `fsdp` devices
  config.train.num_summary_images = 0
  trainer = Trainer(config, str(tmp_path / "run"), devices=jax.devices()[:fsdp])
  try:
    history = trainer.train()
    cond = trainer.stage.ldm.cond
    clip_params = jax.device_get(trainer.frozen["text_encoder"])
  finally:
    trainer.close()
  assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
  cache = LatentCacheSource(str(tmp_path / "run" / "latents"))
  assert {"tokens", "context"} <= set(cache.conditions)
  examples = [cache[i] for i in range(4)]
  batch = {"tokens": jnp.asarray(np.stack([e["tokens"] for e in examples])),
           "context": jnp.asarray(np.stack([e["context"] for e in examples]))}
  assert batch["context"].dtype == jnp.bfloat16
  drop = jnp.asarray([False, True, False, True])
  cached = cond.clip_context(clip_params, batch, drop)
  fresh = cond.clip_context(clip_params, {"tokens": batch["tokens"]}, drop)
  scale = float(jnp.max(jnp.abs(fresh)))
  assert float(jnp.max(jnp.abs(cached - fresh))) < 1e-2 * scale     # bfloat16 storage
  np.testing.assert_allclose(np.asarray(cached[1]), np.asarray(fresh[1]), atol=1e-5)  # the null
  assert float(jnp.max(jnp.abs(fresh[0] - fresh[1]))) > 0.1 * scale
