"""Name maps derived from parameter trees: structural renames and unknown modules."""
import jax
import jax.numpy as jnp
import pytest

from ldm_jax.interop import build, names
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.unet import UNet


def _torch_names(entries, flax_prefix):
  return {e.torch for e in entries if e.flax[:len(flax_prefix)] == flax_prefix}


def test_diffusers_numbers_decoder_levels_from_the_bottom():
  module = AutoencoderKL(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=16,
                         norm_groups=8)
  shapes = build.autoencoder_shapes(module)["params"]
  cv = names.autoencoder_entries(shapes, names.COMPVIS)
  df = names.autoencoder_entries(shapes, names.DIFFUSERS)
  assert _torch_names(cv, ("decoder", "up_0_block_1")) == {"decoder.up.0.block.1.conv1",
                                                           "decoder.up.0.block.1.conv2",
                                                           "decoder.up.0.block.1.norm1",
                                                           "decoder.up.0.block.1.norm2"}
  assert "decoder.up_blocks.2.resnets.1.conv1" in _torch_names(df, ("decoder", "up_0_block_1"))
  assert _torch_names(df, ("decoder", "up_2_upsample")) == {"decoder.up_blocks.0.upsamplers.0.conv"}


def test_unknown_module_and_layout_gaps_are_named():
  shapes = {"decoder": {"new_layer": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32),
                                      "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}}
  with pytest.raises(ValueError, match="no compvis name rule for ldm_jax's decoder/new_layer"):
    names.autoencoder_entries(shapes, names.COMPVIS)
  unet = UNet(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
              num_heads=2, use_spatial_transformer=False)
  shapes = build.unet_shapes(unet, None)
  assert names.unet_entries(shapes, names.COMPVIS, levels=1, num_res_blocks=1)
  with pytest.raises(ValueError, match="has no diffusers equivalent"):
    names.unet_entries(shapes, names.DIFFUSERS, levels=1, num_res_blocks=1)
