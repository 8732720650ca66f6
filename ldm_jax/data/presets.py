"""Dataset presets for experiment files: each points `config.data` at one kind of source.

Pure functions of a config: they only set `config.data` fields (and return the config), so an
experiment file reads `presets.use_tfds(c, "imagenet2012")` and the fields it sets are listed here.
"""
from __future__ import annotations


def use_tfds(config, name: str, *, split: str = "train", eval_split: str = "",
             label_key: str = "label", caption_key: str = ""):
  """Points `config.data` at the tensorflow-datasets catalog dataset `name`."""
  d = config.data
  d.source, d.tfds_name, d.split, d.eval_split = "tfds", name, split, eval_split
  d.label_key, d.caption_key = label_key, caption_key
  return config


def use_packaged_mnist(config, *, image_size: int = 32, eval_digits: int = 1000):
  """The MNIST test digits shipped in the package (no download): all but the last
  `eval_digits` train, those evaluate; padded from 28 px, grey, unflipped."""
  d = config.data
  d.source = "packaged_mnist"
  d.split, d.eval_split = f"t10k[:{-eval_digits}]", f"t10k[{-eval_digits}:]"
  d.image_size, d.channels, d.resize_mode, d.random_flip = image_size, 1, "pad", False
  return config
