"""Builders shared by tests: tiny first stages as inference exports (no training needed), the
one tiny LDM every stage-2 and sampling test trains (so its programs compile once per suite),
real digits with captions and segmentation maps, a captioned digits tfds dataset."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.checkpoint import save_inference
from ldm_jax.compilation import run_once_options
from ldm_jax.first_stage import abstract_variables
from ldm_jax.models.build import build_autoencoder
from tests.conftest import load_config


def tiny_autoencoder_config(kind="kl", image_size=32, ch_mult=(1, 2)):
  c = load_config("tiny_ae", kind)
  c.data.image_size = image_size
  c.model.ch_mult = ch_mult
  return c


def export_random_autoencoder(directory, kind="kl", image_size=32, ch_mult=(1, 2), seed=0):
  """A randomly initialised tiny autoencoder saved as an inference export (stage-2 input)."""
  config = tiny_autoencoder_config(kind, image_size, ch_mult)
  module = build_autoencoder(config.model, image_size=image_size, channels=config.data.channels)
  x = jnp.zeros((1, image_size, image_size, config.data.channels))
  init = jax.jit(module.init, compiler_options=run_once_options())
  variables = init({"params": jax.random.PRNGKey(seed), "sample": jax.random.PRNGKey(0)}, x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      abstract_variables(module, config))
  save_inference(str(directory), {"autoencoder": variables}, config=config,
                 meta={"stage": "autoencoder"})
  return str(directory)


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# The conditioning routes of stage 2, as cond.* fields.
ROUTES = {
    "class": {"type": "class"},
    "adm": {"type": "adm"},
    "text": {"type": "text"},
    "lowres": {"type": "concat", "concat": "lowres"},
    "inpaint": {"type": "concat", "concat": "inpaint"},
    "segmentation": {"type": "concat", "concat": "segmentation"},
    # CompVis' semantic-synthesis rescaler: a learned 1x1 conv to 3 channels after the halving.
    "segmentation_mapper": {"type": "concat", "concat": "segmentation", "rescaler_channels": 3},
    "hybrid": {"type": "hybrid", "concat": "lowres", "context": "class"},
}
DIGITS = 32   # training digits of digit_source


def digit_source():
  """32 real MNIST digits with a caption each and a segmentation map (0 = background,
  1 + digit = the digit's strokes). Captions and maps are made here: the real caption and map
  data come with later work."""
  from ldm_jax.data import sources  # pylint: disable=g-import-not-at-top
  digits = sources.mnist_source(sources.packaged_mnist_dir(), "t10k")
  images, labels = digits.images[:DIGITS], digits.labels[:DIGITS]
  captions = [f"a handwritten {NUMBER_WORDS[d]}" for d in labels]
  maps = np.where(images[..., 0] > 127, labels[:, None, None] + 1, 0).astype(np.int32)
  return sources.ArraySource(images, labels, captions, num_classes=10,
                             description="captioned digits", segmentations=list(maps))


def tiny_ldm_config(autoencoder, route="class", **overrides):
  """The suite's one tiny LDM (32 channels, one level, 8x8 latents of a 16px f=2 autoencoder)
  on route `route`, 3 steps of batch 8 on one device. overrides: section__field=value."""
  c = load_config("tiny_ldm", "class")
  c.first_stage.checkpoint = autoencoder
  c.data.image_size, c.data.resize_mode, c.data.eval_split = 16, "stretch", ""
  c.data.random_flip = True
  c.unet.model_channels, c.unet.channel_mult, c.unet.attention_resolutions = 32, (1,), (1,)
  c.unet.num_head_channels, c.cond.embed_dim = 16, 16
  # FiLM: with one channel per GroupNorm group an added time/label embedding is normalised away.
  c.unet.use_scale_shift_norm = True
  c.cond.update(ROUTES[route])
  c.cond.seg_classes, c.cond.rescaler_stages = 11, 1
  c.diffusion.scale_by_std = False
  c.train.num_steps, c.train.batch_size, c.train.ckpt_every, c.train.log_every = 3, 8, 3, 1
  c.train.lr, c.train.ema_decay = 1e-2, 0.0   # 3 steps: raw weights show the condition best
  c.mesh.fsdp = 1
  c.sample.steps, c.sample.guidance_scale = 2, 3.0
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def train_on_digits(config, workdir, devices=None):
  """train_and_evaluate on digit_source() (one device unless `devices`): the history."""
  from ldm_jax.training import loop  # pylint: disable=g-import-not-at-top
  source = digit_source()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop, "open_source", lambda data_config, split, **kw: source)
    return loop.train_and_evaluate(config, str(workdir), devices=devices or jax.devices()[:1])


CAPTIONED_DIGITS = 64   # examples in the train split (then 16 in test)


@functools.lru_cache(maxsize=None)
def _captioned_digits_builder():
  """Defines (once per process: tfds registers builders by name) the 'captioned_digits' tfds
  builder of real MNIST digits with captions like 'a handwritten seven'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from ldm_jax.data import sources  # pylint: disable=g-import-not-at-top
  digits = sources.mnist_source(sources.packaged_mnist_dir(), "t10k")

  class CaptionedDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(28, 28, 1)),
          "label": tfds.features.ClassLabel(num_classes=10),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      n = CAPTIONED_DIGITS
      return {"train": self._generate_examples(0, n), "test": self._generate_examples(n, n + 16)}

    def _generate_examples(self, start, stop):  # pylint: disable=arguments-differ
      for i in range(start, stop):
        ex = digits[i]
        yield i, {"image": ex["image"], "label": ex["label"],
                  "captions": {"text": [f"a handwritten {NUMBER_WORDS[ex['label']]}"]}}

  return CaptionedDigits


def captioned_digits_tfds(data_dir):
  """Prepares 'captioned_digits' (ArrayRecord) in data_dir; returns data_dir for config.data."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _captioned_digits_builder()
  builder = tfds.builder("captioned_digits", data_dir=str(data_dir), file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare()
  return str(data_dir)


def pil_bicubic(image, height: int, width: int):
  """A float (H, W) or (H, W, C) image resized with PIL's bicubic filter (antialiased when
  downsampling: the 'bicubic' degradation), channel by channel in float: an independent
  reference for ldm_jax.data.degradations."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  planes = image[..., None] if image.ndim == 2 else image
  out = np.stack([np.asarray(Image.fromarray(np.float32(planes[..., c]), "F").resize(
      (width, height), Image.Resampling.BICUBIC)) for c in range(planes.shape[-1])], -1)
  return out[..., 0] if image.ndim == 2 else out
