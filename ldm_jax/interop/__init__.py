"""Checkpoint interoperability with the PyTorch peers: CompVis latent-diffusion / stable-diffusion
checkpoints and diffusers folders into ldm_jax modules (NHWC), and ldm_jax models back to
diffusers. torch is never needed for .safetensors; see convert.py for the command line.

  module, variables = load_diffusers_vae("sd/vae")
  posterior = module.apply(variables, images, method="encode")      # .mean, .logvar
  images = module.apply(variables, latents, method="decode")
  unet, unet_vars = load_diffusers_unet("sd/unet")
  eps = unet.apply(unet_vars, latents, t, context)
  model = load_compvis("cin256-v2.ckpt", "cin256-v2.yaml")         # .autoencoder, .unet, ...
"""
from ldm_jax.interop.compvis import (CompVisModel, load_compvis, load_compvis_autoencoder,
                                     load_compvis_cond, load_compvis_unet)
from ldm_jax.interop.exports import export_autoencoder, export_ldm
from ldm_jax.interop.diffusers import (load_diffusers_unet, load_diffusers_vae,
                                       save_diffusers_unet, save_diffusers_vae)
from ldm_jax.interop.weights import ConversionError, UnsupportedError, read_state_dict

__all__ = [
    "CompVisModel", "ConversionError", "UnsupportedError", "export_autoencoder", "export_ldm",
    "load_compvis", "load_compvis_autoencoder", "load_compvis_cond", "load_compvis_unet",
    "load_diffusers_unet", "load_diffusers_vae", "read_state_dict", "save_diffusers_unet",
    "save_diffusers_vae",
]
