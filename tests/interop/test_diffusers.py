"""diffusers folders: parity with diffusers' own outputs, and exact round trips."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ldm_jax.interop import (load_diffusers_unet, load_diffusers_vae, save_diffusers_unet,
                             save_diffusers_vae)
from ldm_jax.interop.diffusers import WEIGHTS
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.unet import UNet
from tests.interop.helpers import assert_same_tree, rel_err, vq_noattn_folder

TOL = 1e-5


def test_autoencoder_kl_matches_diffusers(fixture_dir, outputs):
  module, variables = load_diffusers_vae(str(fixture_dir / "vae_kl"))
  assert isinstance(module, AutoencoderKL)
  posterior = jax.jit(lambda v, x: module.apply(v, x, method="encode"))(variables,
                                                                         outputs["image"])
  decoded = jax.jit(lambda v, z: module.apply(v, z, method="decode"))(variables,
                                                                      outputs["vae_kl/z"])
  assert rel_err(posterior.mean, outputs["vae_kl/mean"]) < TOL
  assert rel_err(posterior.logvar, outputs["vae_kl/logvar"]) < TOL
  assert rel_err(decoded, outputs["vae_kl/decoded"]) < TOL


def test_vq_model_matches_diffusers(fixture_dir, outputs):
  module, variables = load_diffusers_vae(str(fixture_dir / "vq"))
  assert isinstance(module, VQModel) and module.attn_resolutions == (8,)
  h = jax.jit(lambda v, x: module.apply(v, x, method="encode"))(variables, outputs["image"])
  decoded = jax.jit(lambda v, z: module.apply(v, z, method="decode"))(variables, outputs["vq/h"])
  assert rel_err(h, outputs["vq/h"]) < TOL
  assert rel_err(decoded, outputs["vq/decoded"]) < TOL
  # The 'vq' collection is the quantiser's own initial state (usage statistics).
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract)
  np.testing.assert_array_equal(variables["vq"]["quantize"]["usage"], np.full(16, 1 / 16))


@pytest.mark.parametrize("name", ["unet_conv", "unet_linear"])
def test_unet_matches_diffusers(fixture_dir, outputs, name):
  module, variables = load_diffusers_unet(str(fixture_dir / name))
  if name == "unet_conv":    # per-level heads, scale-shift norms, class embeddings
    assert (module.num_heads, module.use_scale_shift_norm, module.num_classes) == ((2, 4), True, 5)
    labels = outputs["unet/labels"]
  else:                      # linear projections, two transformer blocks per level
    assert (module.use_linear_proj, module.transformer_depth, module.num_heads) == (True, 2, 2)
    labels = None
  eps = jax.jit(lambda v, x, t, c, y: module.apply(v, x, t, c, y))(
      variables, outputs["unet/x"], outputs["unet/t"], outputs["unet/context"], labels)
  assert rel_err(eps, outputs[f"{name}/eps"]) < TOL


def test_vq_model_without_attention_matches_diffusers(outputs_noattn, tmp_path):
  """mid_block_add_attention=False becomes model.mid_attention=False (and back, bit for bit)."""
  o = outputs_noattn
  folder = vq_noattn_folder(tmp_path / "vq_noattn")
  module, variables = load_diffusers_vae(str(folder))
  assert isinstance(module, VQModel) and not module.mid_attention and module.attn_resolutions == ()
  assert "mid_attn_1" not in variables["params"]["encoder"]
  h = jax.jit(lambda v, x: module.apply(v, x, method="encode"))(variables, o["image"])
  decoded = jax.jit(lambda v, z: module.apply(v, z, method="decode"))(variables, o["noattn/h"])
  assert rel_err(h, o["noattn/h"]) < TOL and rel_err(decoded, o["noattn/decoded"]) < TOL
  save_diffusers_vae(str(tmp_path / "out"), module, variables, scaling_factor=0.75,
                     dtype="float16")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["mid_block_add_attention"] is False
  original, written = load_file(str(folder / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
  assert sorted(original) == sorted(written)
  for key, value in original.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_groupnorm8_autoencoder_matches_diffusers(fixture_dir, outputs_groups8):
  """norm_num_groups=8 (16 channels: no 32-group GroupNorm fits) becomes model.norm_groups."""
  out = outputs_groups8
  module, variables = load_diffusers_vae(str(fixture_dir / "vae_g8"))
  assert (module.norm_groups, module.ch, module.attn_resolutions) == (8, 16, (8,))
  posterior = jax.jit(lambda v, x: module.apply(v, x, method="encode"))(variables, out["image"])
  decoded = jax.jit(lambda v, z: module.apply(v, z, method="decode"))(variables, out["vae_g8/z"])
  assert rel_err(posterior.mean, out["vae_g8/mean"]) < TOL
  assert rel_err(posterior.logvar, out["vae_g8/logvar"]) < TOL
  assert rel_err(decoded, out["vae_g8/decoded"]) < TOL


def test_groupnorm8_unet_matches_diffusers(fixture_dir, outputs_groups8):
  """norm_num_groups=8 and norm_eps=1e-3 become the UNet's norm_groups / norm_eps."""
  out = outputs_groups8
  module, variables = load_diffusers_unet(str(fixture_dir / "unet_g8"))
  assert (module.norm_groups, module.norm_eps, module.model_channels) == (8, 1e-3, 16)
  eps = jax.jit(lambda v, x, t, c: module.apply(v, x, t, c))(
      variables, out["unet/x"], out["unet/t"], out["unet/context"])
  assert rel_err(eps, out["unet_g8/eps"]) < TOL


@pytest.mark.parametrize("name", ["vae_kl", "vq", "unet_conv", "unet_linear", "vae_g8",
                                  "unet_g8"])
def test_fixture_files_round_trip_exactly(fixture_dir, tmp_path, name):
  """diffusers files -> ldm_jax -> diffusers files gives back every tensor, bit for bit."""
  src = fixture_dir / name
  if name.startswith("unet"):
    module, variables = load_diffusers_unet(str(src))
    save_diffusers_unet(str(tmp_path), module, variables, sample_size=8, dtype="float16")
  else:
    module, variables = load_diffusers_vae(str(src))
    save_diffusers_vae(str(tmp_path), module, variables, scaling_factor=0.5, dtype="float16")
  original, written = load_file(str(src / WEIGHTS)), load_file(str(tmp_path / WEIGHTS))
  assert sorted(original) == sorted(written)
  for key, value in original.items():
    assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  # The written config describes the same architecture, GroupNorm settings included.
  again = (load_diffusers_unet if name.startswith("unet") else load_diffusers_vae)(str(tmp_path))
  assert again[0] == module
  configs = [json.loads((folder / "config.json").read_text()) for folder in (src, tmp_path)]
  for key in ("norm_num_groups", "norm_eps") if name.startswith("unet") else ("norm_num_groups",):
    assert configs[1][key] == configs[0][key], key


def _random_params(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


@pytest.mark.parametrize("kind,mid_attention", [("kl", True), ("vq", True), ("kl", False)])
def test_ldm_jax_autoencoder_round_trips_exactly(tmp_path, kind, mid_attention):
  """Written and read back unchanged; mid_attention=False writes mid_block_add_attention=false
  and no mid-block attention weights."""
  kw = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4,
            embed_dim=4, resolution=16, mid_attention=mid_attention)
  module = AutoencoderKL(**kw) if kind == "kl" else VQModel(n_embed=8, **kw)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  variables = {"params": _random_params(abstract["params"], 0)}
  save_diffusers_vae(str(tmp_path), module, variables)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["mid_block_add_attention"] is mid_attention
  mid = [k for k in load_file(str(tmp_path / WEIGHTS)) if ".mid_block.attentions." in k]
  assert len(mid) == (20 if mid_attention else 0)
  loaded, again = load_diffusers_vae(str(tmp_path))
  assert loaded == module
  assert_same_tree(again["params"], variables["params"])


def test_ldm_jax_unet_round_trips_exactly(tmp_path):
  module = UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(2,), num_classes=3,
                use_scale_shift_norm=True, num_heads=-1, num_head_channels=16,
                use_spatial_transformer=True, transformer_depth=2)
  abstract = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 2, 8)),
      jnp.zeros((1,), jnp.int32)))
  variables = {"params": _random_params(abstract["params"], 1)}
  save_diffusers_unet(str(tmp_path), module, variables, sample_size=8)
  loaded, again = load_diffusers_unet(str(tmp_path))
  # A fixed head width comes back as diffusers' per-level head counts: the same attention.
  assert loaded.num_heads == (2, 4) and loaded.num_head_channels == -1
  assert_same_tree(again["params"], variables["params"])


def test_cli_exports_a_diffusers_vae_for_stage_two(fixture_dir, tmp_path, capsys):
  from ldm_jax.first_stage import load_first_stage  # pylint: disable=g-import-not-at-top
  from ldm_jax.interop.convert import main  # pylint: disable=g-import-not-at-top
  main(["diffusers", "--vae", str(fixture_dir / "vae_kl"), "--out", str(tmp_path / "ae")])
  assert "scaling_factor 0.5" in capsys.readouterr().out
  first = load_first_stage(str(tmp_path / "ae"))
  _, variables = load_diffusers_vae(str(fixture_dir / "vae_kl"))
  assert first.config.model.type == "kl" and first.config.data.image_size == 16
  assert_same_tree(first.variables["params"], variables["params"])
  with pytest.raises(SystemExit):
    main(["diffusers", "--unet", str(fixture_dir / "unet_conv"), "--out", str(tmp_path / "u")])
  assert "convert sd --checkpoint" in capsys.readouterr().err
