"""Text-to-image LDMs on a user's own captioned image folder.

Captions are sidecars (name.txt beside name.jpg, or one captions.jsonl at the folder's root;
ldm_jax/data/sidecars.py). A WordPiece tokenizer is trained on the folder's captions (saved to
the workdir) or read from a local BERT vocab.txt (cond.text_tokenizer='vocab',
cond.text_vocab=...); the transformer tau_theta trains jointly with the UNet, as in the paper;
10% of captions are dropped so that sampling can use classifier-free guidance.

Variants:
  folder  (default) the paper's text-to-image UNet (KL-f8, 320 channels, mult 1,2,4,4,
          cross-attention at 4,2,1) at 256 px, with an 8-layer 512-wide transformer trained on
          the folder's captions. Set data.path.
  mnist   the CPU recipe (python -m ldm_jax.recipes.digit_tasks --task=text): 32 px digits
          captioned with varied sentences naming the digit, on the quickstart's autoencoder.

  python train.py --config=configs/ldm_txt2img_folder.py --workdir=runs/ldm_txt \\
      --config.data.path=/data/my_captioned_photos --config.first_stage.checkpoint=runs/ae_kl8
  python sample.py --checkpoint=runs/ldm_txt --out=samples --prompts=prompts.txt --per_prompt=4
"""
from ldm_jax import config as config_lib

VARIANTS = ("folder", "mnist")


def get_config(variant: str = "folder"):
  if variant not in VARIANTS:
    raise ValueError(f"ldm_txt2img_folder: unknown variant '{variant}' (known: "
                     f"{', '.join(VARIANTS)})")
  if variant == "mnist":   # the recipe's config, with its paths
    from ldm_jax.recipes import digit_tasks  # pylint: disable=g-import-not-at-top
    return digit_tasks.ldm_config("text", "runs/digit_tasks/data/captions/train",
                                  "runs/digit_tasks/autoencoder")
  c = config_lib.defaults("ldm")
  c.data.source, c.data.path, c.data.image_size = "image_folder", "data/captioned", 256
  c.data.random_flip = False         # "left" and "right" in captions would lie
  c.first_stage.checkpoint = "runs/ae_kl8_imagenet"
  c.unet.model_channels = 320
  c.unet.channel_mult = (1, 2, 4, 4)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (4, 2, 1)
  c.unet.num_heads, c.unet.num_head_channels = 8, -1
  c.unet.use_spatial_transformer = True
  c.cond.type = "text"
  c.cond.text_tokenizer, c.cond.text_vocab_size, c.cond.text_max_length = "train", 8192, 77
  c.cond.embed_dim, c.cond.text_depth, c.cond.text_heads = 512, 8, 8
  c.cond.p_uncond = 0.1
  c.diffusion.linear_start, c.diffusion.linear_end = 0.00085, 0.012
  c.diffusion.scale_by_std = True
  c.train.batch_size = 64
  c.train.lr = 1e-4
  c.train.scale_lr = False
  c.train.warmup_steps = 10_000
  c.train.num_steps = 500_000
  c.sample.guidance_scale = 3.0
  c.sample.steps = 50
  return c
