"""Mismatched and unsupported checkpoints fail with one line naming the key or the block."""
import numpy as np
import pytest

from ldm_jax.interop import (ConversionError, UnsupportedError, load_compvis,
                             load_diffusers_unet, load_diffusers_vae)
from tests.interop.helpers import copy_diffusers, vq_noattn_folder


def test_missing_weight_is_named(fixture_dir, tmp_path):
  path = copy_diffusers(fixture_dir / "unet_conv", tmp_path,
                        state_edit=lambda s: s.pop("down_blocks.0.resnets.0.conv1.weight"))
  with pytest.raises(ConversionError,
                     match=r"missing 1 weight\(s\): down_blocks\.0\.resnets\.0\.conv1\.weight"):
    load_diffusers_unet(str(path))


def test_unexpected_weight_is_named(fixture_dir, tmp_path):
  def add(state):
    state["decoder.up_blocks.0.resnets.9.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float16)
  path = copy_diffusers(fixture_dir / "vae_kl", tmp_path, state_edit=add)
  with pytest.raises(ConversionError, match=r"unexpected 1 weight\(s\) \(not in this "
                     r"architecture\): decoder\.up_blocks\.0\.resnets\.9\.conv1\.weight"):
    load_diffusers_vae(str(path))


def test_shape_mismatch_is_named(fixture_dir, tmp_path):
  def widen(state):
    state["conv_in.weight"] = np.zeros((32, 5, 3, 3), np.float16)
  path = copy_diffusers(fixture_dir / "unet_linear", tmp_path, state_edit=widen)
  with pytest.raises(ConversionError, match=r"shape mismatch: conv_in\.weight is \(32, 5, 3, 3\), "
                     r"the architecture needs \(32, 4, 3, 3\)"):
    load_diffusers_unet(str(path))


@pytest.mark.parametrize("field,value,match", [
    ("mid_block_type", "UNetMidBlock2D", "mid_block_type='UNetMidBlock2D' is not supported"),
    ("mid_block_type", None, "mid_block_type=None is not supported"),
    ("transformer_layers_per_block", [1, 2], r"transformer_layers_per_block=\[1, 2\] varies"),
    ("time_embedding_type", "fourier", "time_embedding_type='fourier' is not supported"),
    ("flip_sin_to_cos", False, "flip_sin_to_cos=False is not supported"),
    ("freq_shift", 1, "freq_shift=1 is not supported"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"],
     "down block type 'SimpleCrossAttnDownBlock2D' is not supported"),
    ("addition_embed_type", "text_time", "addition_embed_type='text_time' is not supported"),
])
def test_unsupported_unet_settings_are_named(fixture_dir, tmp_path, field, value, match):
  def edit(config):
    config[field] = value
  path = copy_diffusers(fixture_dir / "unet_conv", tmp_path, config_edit=edit)
  with pytest.raises(UnsupportedError, match=match):
    load_diffusers_unet(str(path))


@pytest.mark.parametrize("field,value,match", [
    ("mid_block_add_attention", "no", "mid_block_add_attention='no' is not supported"),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], "is not mirrored"),
    ("norm_num_groups", 12, r"divisible by model.norm_groups \(12\)"),
])
def test_unsupported_vae_settings_are_named(fixture_dir, tmp_path, field, value, match):
  def edit(config):
    config[field] = value
  path = copy_diffusers(fixture_dir / "vae_kl", tmp_path, config_edit=edit)
  with pytest.raises(UnsupportedError, match=match):
    load_diffusers_vae(str(path))


def test_mid_attention_setting_that_does_not_fit_the_weights_is_one_line(fixture_dir, tmp_path):
  def off(config):
    config["mid_block_add_attention"] = False
  path = copy_diffusers(fixture_dir / "vae_kl", tmp_path / "off", config_edit=off)
  with pytest.raises(ConversionError, match=r"mid_block_add_attention=false means no mid-block "
                     r"attention, but the checkpoint has its 20 weights \(e\.g\. "
                     r"decoder\.mid_block\.attentions\.0\.group_norm\.bias\); set "
                     r"mid_block_add_attention=true, or use the config") as e:
    load_diffusers_vae(str(path))
  assert "\n" not in str(e.value)

  def on(config):
    config["mid_block_add_attention"] = True
  path = copy_diffusers(vq_noattn_folder(tmp_path / "noattn"), tmp_path / "on", config_edit=on)
  with pytest.raises(ConversionError, match=r"mid_block_add_attention=true means a mid-block "
                     r"attention, but the checkpoint has none of its weights \(no "
                     r"encoder\.mid_block\.attentions\.0\.\*, "
                     r"decoder\.mid_block\.attentions\.0\.\*\); set "
                     r"mid_block_add_attention=false"):
    load_diffusers_vae(str(path))


def test_compvis_missing_ema_copy_is_named(compvis_files, tmp_path):
  """A checkpoint with model_ema.* but not for every UNet weight."""
  from safetensors.numpy import load_file, save_file
  ckpt, yaml = compvis_files["cin"]
  state = load_file(ckpt)
  state.pop("model_ema.diffusion_modelout2weight")
  partial = str(tmp_path / "partial.safetensors")
  save_file(state, partial)
  with pytest.raises(ConversionError, match=r"not for 1 UNet weight\(s\), e\.g\. "
                     r"model_ema\.diffusion_modelout2weight; pass use_ema=False"):
    load_compvis(partial, yaml)


def test_export_of_a_unet_without_a_diffusers_equivalent_is_refused_up_front():
  """A UNet with positional features in its SpatialTransformers (unet.attention_coords) has no
  UNet2DConditionModel counterpart: refused by name before anything is written."""
  from ldm_jax.interop.diffusers import diffusers_unet_config  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  unet = UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
              use_spatial_transformer=True, attention_coords=True)
  with pytest.raises(UnsupportedError, match=r"attention_coords=True\) has no diffusers"):
    diffusers_unet_config(unet, cross_attention_dim=64)
