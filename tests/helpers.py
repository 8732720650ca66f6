"""Builders shared by tests: tiny first stages as inference exports (no training needed), a
captioned digits tfds dataset."""
import functools

import jax
import jax.numpy as jnp

from ldm_jax.checkpoint import save_inference
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
  variables = module.init({"params": jax.random.PRNGKey(seed), "sample": jax.random.PRNGKey(0)},
                          x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      abstract_variables(module, config))
  save_inference(str(directory), {"autoencoder": variables}, config=config,
                 meta={"stage": "autoencoder"})
  return str(directory)


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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
