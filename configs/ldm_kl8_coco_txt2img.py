"""Text-to-image LDM on MS-COCO captions and the KL-f8 first stage.

The UNet of the paper's text-to-image model (320 channels, mult 1,2,4,4, 8 heads, cross-
attention over the caption) with a text transformer trained jointly, as in the paper; here a
12-layer, 768-wide one over a WordPiece tokenizer trained on the COCO captions (the paper's
LAION model: 32 layers of 1280 over BERT tokens). Captions are dropped for 10% of examples for
classifier-free guidance.

  python train.py --config=configs/ldm_kl8_coco_txt2img.py --workdir=runs/ldm_coco
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets


def get_config():
  c = config_lib.defaults("ldm")
  presets.use_tfds(c, "coco_captions", split="train", eval_split="val[:5000]",
                   label_key="", caption_key="captions/text")
  c.data.image_size = 256
  c.first_stage.checkpoint = "runs/ae_kl8_imagenet"

  c.unet.model_channels = 320
  c.unet.channel_mult = (1, 2, 4, 4)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (4, 2, 1)
  c.unet.num_heads = 8
  c.unet.num_head_channels = -1
  c.unet.use_spatial_transformer = True
  c.unet.remat = "save_dots"    # keep conv/matmul outputs, recompute norms and activations

  c.cond.type = "text"
  c.cond.embed_dim = 768
  c.cond.text_tokenizer = "train"
  c.cond.text_vocab_size = 16384
  c.cond.text_max_length = 77
  c.cond.text_depth = 12
  c.cond.text_heads = 12
  c.cond.p_uncond = 0.1

  c.diffusion.linear_start = 0.00085
  c.diffusion.linear_end = 0.012
  c.diffusion.scale_by_std = True

  c.train.batch_size = 256
  c.train.lr = 1e-4
  c.train.scale_lr = False
  c.train.warmup_steps = 10_000
  c.train.num_steps = 500_000
  c.train.ckpt_every = 5000
  c.train.image_every = 5000
  c.sample.steps = 50
  c.sample.guidance_scale = 3.0
  return c
