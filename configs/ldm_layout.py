"""Layout-to-image LDMs: boxes and their classes as a token sequence through a transformer
tau_theta into the UNet's cross-attention, as in the paper.

A layout is a start token, then per box its class token and the tokens of its top-left and
bottom-right corners on a cond.layout_grid x cond.layout_grid lattice
(ldm_jax/models/conditioning.layout_tokens); boxes move with the image's crop and flip. Corner
tokens also carry fixed Fourier features of their coordinates (not in the paper; GLIGEN's box
encoding), so the transformer starts from embeddings in which nearby corners are alike. Box
files are the image folder's sidecars: name.json beside name.jpg holding
{"boxes": [{"class": c, "box": [x0, y0, x1, y1]}]} in pixels.

Variants:
  openimages  (default) the paper's layout model as released (CompVis layout2img-openimages256,
              as read from its config): VQ-f4 first stage, UNet 128 channels, mult 1,2,3,4,
              SpatialTransformers of depth 3 at downsample factors 8,4,2 with 32-channel heads,
              a 16-layer 512-wide transformer over at most 92 tokens (30 boxes here), L1 loss,
              linear schedule 0.0015 -> 0.0205, lr 2e-6 x batch 24. The 601 OpenImages
              classes; corners on a 64 x 64 lattice (our choice: the reference's quantisation
              is not in its config). Condition dropout 10% for guidance (the reference has none).
  coco        the same model on COCO 2017 instances through tfds (80 classes; boxes from
              'objects/bbox', classes from 'objects/label'); tfds needs COCO's files.
  mnist       the CPU recipe (python -m ldm_jax.recipes.digit_tasks --task=layout): 48 px
              canvases of 1-3 MNIST digits at random boxes, on the quickstart's autoencoder,
              with three aids not in the paper: the latent grid's coordinates as two extra
              UNet inputs (unet.coord_channels), a positional embedding on the
              SpatialTransformers' tokens (unet.attention_coords) and each box's class and
              corners on all three of its tokens (cond.layout_bind_objects).

  python train.py --config=configs/ldm_layout.py --workdir=runs/ldm_layout \\
      --config.data.path=/data/openimages/train --config.first_stage.checkpoint=runs/ae_vq4
  python sample.py --checkpoint=runs/ldm_layout --out=canvases --task=layout --inputs=layouts/
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets

VARIANTS = ("openimages", "coco", "mnist")


def get_config(variant: str = "openimages"):
  if variant not in VARIANTS:
    raise ValueError(f"ldm_layout: unknown variant '{variant}' (known: {', '.join(VARIANTS)})")
  if variant == "mnist":   # the recipe's config, with its paths
    from ldm_jax.recipes import digit_tasks  # pylint: disable=g-import-not-at-top
    return digit_tasks.ldm_config("layout", "runs/digit_tasks/data/layout/train",
                                  "runs/digit_tasks/autoencoder")
  c = config_lib.defaults("ldm")
  c.data.source, c.data.path, c.data.image_size = "image_folder", "data/openimages", 256
  c.data.max_boxes = 30
  c.first_stage.checkpoint = "runs/ae_vq4_imagenet"
  c.cond.type, c.cond.num_classes, c.cond.layout_grid = "layout", 601, 64
  if variant == "coco":
    presets.use_tfds(c, "coco/2017", split="train", eval_split="validation[:2000]",
                     label_key="")
    c.data.boxes_key, c.data.box_classes_key = "objects/bbox", "objects/label"
    c.cond.num_classes = 80
  c.cond.embed_dim, c.cond.text_depth, c.cond.text_heads = 512, 16, 8
  c.cond.p_uncond = 0.1
  c.unet.model_channels = 128
  c.unet.channel_mult = (1, 2, 3, 4)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (8, 4, 2)
  c.unet.num_head_channels = 32
  c.unet.use_spatial_transformer = True
  c.unet.transformer_depth = 3
  c.diffusion.linear_start, c.diffusion.linear_end = 0.0015, 0.0205
  c.diffusion.loss_type = "l1"
  c.train.batch_size = 24
  c.train.lr = 2e-6
  c.train.num_steps = 500_000
  c.sample.guidance_scale = 2.0
  c.sample.steps = 100
  return c
