"""The semantic, layout and text tasks on the digit datasets (ldm_jax/data/digit_sets.py):
the builders write what their docstring says; layouts become the tokens the paper describes;
each task's tiny model trains a few steps through the training loop on the built folder and
samples through sample.py's file-task (or prompt) code with the condition changing the sample;
bad task inputs stop with one line naming the file.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from ldm_jax import image_tasks, sampling_job
from ldm_jax.data import conditions, digit_sets
from ldm_jax.data.demo_sets import build_digits
from ldm_jax.errors import JobError
from ldm_jax.inference import load_pipeline
from ldm_jax.models.conditioning import layout_tokens
from ldm_jax.training import loop
from tests.helpers import tiny_ldm_config

ONE_DEVICE = Mesh(np.asarray(jax.devices()[:1]), ("data",))


def _png(path):
  return np.asarray(Image.open(path))


# -- builders ----------------------------------------------------------------------------------
def test_semantic_maps_label_each_digits_ink_with_its_class(tmp_path):
  out = build_digits("semantic", str(tmp_path / "s"), start=0, count=20)
  assert len(os.listdir(os.path.join(out, "images", "7"))) >= 1
  for d in os.listdir(os.path.join(out, "images")):
    for name in os.listdir(os.path.join(out, "images", d)):
      image = _png(os.path.join(out, "images", d, name))
      label = _png(os.path.join(out, "maps", d, name))
      assert image.shape == label.shape == (32, 32)
      np.testing.assert_array_equal(label, np.where(image >= 128, int(d) + 1, 0))


def test_layout_canvases_hold_ink_only_inside_their_boxes(tmp_path):
  out = build_digits("layout", str(tmp_path / "l"), start=0, count=30, canvas=64)
  counts = []
  for i in range(30):
    canvas = _png(os.path.join(out, f"{i:05d}.png"))
    with open(os.path.join(out, f"{i:05d}.json"), encoding="utf-8") as f:
      boxes = json.load(f)["boxes"]
    counts.append(len(boxes))
    inside = np.zeros_like(canvas, bool)
    for b in boxes:
      x0, y0, x1, y1 = b["box"]
      assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 24 <= x1 - x0 <= 40
      assert 0 <= b["class"] <= 9 and canvas[y0:y1, x0:x1].max() > 100   # a digit is there
      inside[y0:y1, x0:x1] = True
    assert canvas[~inside].max(initial=0) == 0
  assert set(counts) == {1, 2, 3}
  again = build_digits("layout", str(tmp_path / "l2"), start=0, count=30, canvas=64)
  np.testing.assert_array_equal(_png(os.path.join(out, "00007.png")),
                                _png(os.path.join(again, "00007.png")))


def test_captions_name_the_digit_in_their_folder(tmp_path):
  out = build_digits("captions", str(tmp_path / "c"), start=100, count=40)
  seen = set()
  for d in os.listdir(out):
    if d.startswith("."):
      continue
    for name in os.listdir(os.path.join(out, d)):
      if name.endswith(".txt"):
        with open(os.path.join(out, d, name), encoding="utf-8") as f:
          text = f.read().strip()
        words = text.replace(",", " ").split()
        assert digit_sets.NUMBER_WORDS[int(d)] in words or d in words, text
        others = [w for k, w in enumerate(digit_sets.NUMBER_WORDS) if k != int(d)]
        assert not set(others) & set(words), text
        seen.add(text.split()[0])
  assert len(seen) >= 3   # the templates vary


# -- layout tokens -----------------------------------------------------------------------------
def test_layout_tokens_are_start_then_class_and_two_quantised_corners():
  boxes = jnp.asarray([[[0.0, 0.0, 0.5, 1.0], [0.25, 0.75, 1.0, 1.0], [0, 0, 0, 0]]])
  classes = jnp.asarray([[3, 0, -1]])
  grid, c = 5, 10   # positions round(v * 4): 0, 1, 2, 3, 4
  tokens = np.asarray(layout_tokens(boxes, classes, c, grid))
  pos = lambda x, y: 2 + c + y * grid + x  # noqa: E731
  np.testing.assert_array_equal(tokens[0], [1, 2 + 3, pos(0, 0), pos(2, 4),
                                            2 + 0, pos(1, 3), pos(4, 4), 0, 0, 0])


def test_corner_tokens_carry_fourier_features_of_their_coordinates():
  from ldm_jax.models.conditioning import grid_fourier_features  # pylint: disable=g-import-not-at-top
  grid, offset = 5, 12
  tokens = jnp.asarray([[1, 3, offset + 2 * grid + 4, offset + 0, 0]])   # (x, y) = (4, 2), (0, 0)
  f = np.asarray(grid_fourier_features(tokens, offset, grid, frequencies=2))
  x, y = 4 / 4, 2 / 4
  angles = np.pi * np.asarray([[x, 2 * x], [y, 2 * y]])
  np.testing.assert_allclose(f[0, 2], np.concatenate([np.sin(angles), np.cos(angles)], -1)
                             .reshape(-1), atol=1e-6)
  np.testing.assert_allclose(f[0, 3], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-6)
  assert not f[0, [0, 1, 4]].any()


def test_a_cached_layout_flips_with_its_latent():
  example = {"latent": np.arange(8, dtype=np.float32).reshape(1, 2, 4),
             "boxes": np.asarray([[0.1, 0.2, 0.4, 0.9], [0, 0, 0, 0]], np.float32),
             "box_classes": np.asarray([4, -1], np.int32)}
  for seed in range(20):   # one of these draws flips
    out = conditions.cached_example(example, np.random.default_rng(seed), flip=True)
    if out["latent"][0, 0, 0] != 0:
      np.testing.assert_allclose(out["boxes"][0], [0.6, 0.2, 0.9, 0.9], atol=1e-6)
      np.testing.assert_array_equal(out["boxes"][1], 0)
      return
  pytest.fail("no draw flipped")


# -- tasks end to end --------------------------------------------------------------------------
def _train(config, workdir):
  history = loop.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert np.all(np.isfinite([h["loss"] for h in history]))
  return load_pipeline(str(workdir))


def _one_input_job(pipeline, task, tmp_path, name, write):
  """Runs `task` on a folder holding one input (so its noise is sample 0's): the output."""
  folder = tmp_path / f"in_{name}"
  folder.mkdir()
  rel = write(folder)
  out = str(tmp_path / f"out_{name}")
  image_tasks.run(pipeline, image_tasks.FileJob(task, str(folder)), out, ONE_DEVICE)
  return _png(image_tasks.output_path(out, rel)).astype(np.float32)


def _box_file(boxes):
  def write(folder):
    with open(folder / "layout.json", "w", encoding="utf-8") as f:
      json.dump({"boxes": [{"class": c, "box": b} for c, b in boxes]}, f)
    return "layout.json"
  return write


def test_layout_model_trains_on_canvases_and_renders_box_files(tiny_autoencoder, tmp_path):
  data = build_digits("layout", str(tmp_path / "canvases"), start=0, count=24, canvas=32)
  config = tiny_ldm_config(tiny_autoencoder, "class", cond__type="layout", cond__num_classes=10,
                           cond__layout_grid=8, data__max_boxes=3, data__source="image_folder",
                           data__path=data, data__split="", data__random_flip=False,
                           unet__coord_channels=True, unet__attention_coords=True,
                           cond__layout_bind_objects=True)
  config.data.channels = 1
  pipeline = _train(config, tmp_path / "ldm")   # 16 px canvases (the 32 px ones, resized)
  names = {str(path) for path, _ in jax.tree_util.tree_flatten_with_path(pipeline.params)[0]}
  for built in ("object_class", "object_box", "coord_features"):   # the recipe's options
    assert any(built in n for n in names), built
  coords = pipeline.ldm.conditions(pipeline.params, {
      "boxes": jnp.zeros((2, 3, 4)), "box_classes": -jnp.ones((2, 3), jnp.int32)},
      pipeline.frozen["autoencoder"], jnp.asarray([False, True]), 1.0,
      latent_shape=(2, 8, 8, 3))["concat"]   # the grid's (y, x), the same when dropped
  np.testing.assert_allclose(coords[:, 0, 0], [[-1, -1], [-1, -1]])
  np.testing.assert_allclose(coords[:, 7, 3], [[1, -1 + 6 / 7]] * 2, atol=1e-6)
  a = _one_input_job(pipeline, "layout", tmp_path, "a", _box_file([(1, [0, 0, 8, 8])]))
  b = _one_input_job(pipeline, "layout", tmp_path, "b", _box_file([(7, [6, 6, 16, 16])]))
  assert a.shape == b.shape == (16, 16)
  assert np.abs(a - b).max() > 0, "the layout is ignored"
  with pytest.raises(JobError, match=r"in_c/layout.json' box 0 \[4, 4, 20, 12\] lies outside "
                                     r"the 16x16 canvas"):
    _one_input_job(pipeline, "layout", tmp_path, "c", _box_file([(2, [4, 4, 20, 12])]))
  with pytest.raises(JobError, match=r"in_d/layout.json' box 0 has class 12; the model knows "
                                     r"10 object classes"):
    _one_input_job(pipeline, "layout", tmp_path, "d", _box_file([(12, [4, 4, 8, 8])]))
  with pytest.raises(JobError, match=r"--task=semantic: this model is not a semantic-synthesis"):
    image_tasks.check_task(pipeline, image_tasks.FileJob("semantic", str(tmp_path)))


def _label_map(array):
  def write(folder):
    Image.fromarray(np.asarray(array, np.uint8)).save(folder / "map.png")
    return "map.png"
  return write


def _random_semantic(autoencoder):
  """A semantic-synthesis pipeline with random weights (the file task's mechanics)."""
  from ldm_jax.first_stage import load_first_stage  # pylint: disable=g-import-not-at-top
  from ldm_jax.inference import Pipeline  # pylint: disable=g-import-not-at-top
  from ldm_jax.ldm import LatentDiffusion  # pylint: disable=g-import-not-at-top
  config = tiny_ldm_config(autoencoder, "segmentation", sample__steps=2)
  ldm = LatentDiffusion(config, load_first_stage(autoencoder))
  params = jax.jit(ldm.init_params)(jax.random.PRNGKey(0), {
      "image": jnp.zeros((1, 16, 16, 1)), "segmentation": jnp.zeros((1, 16, 16), jnp.int32)})
  leaves, tree = jax.tree_util.tree_flatten(params)   # zero-initialised output layers see
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))   # nothing: perturb every weight
  params = jax.tree_util.tree_unflatten(tree, [
      a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  return Pipeline(ldm, params, {"autoencoder": ldm.first.variables}, 1.0, "random semantic")


@pytest.mark.slow   # ~45 s; the random-weight test below covers the file task by default
def test_semantic_model_trains_on_the_digit_maps(tiny_autoencoder, tmp_path):
  data = build_digits("semantic", str(tmp_path / "digits"), start=0, count=24)
  config = tiny_ldm_config(tiny_autoencoder, "segmentation", data__source="image_folder",
                           data__path=os.path.join(data, "images"), data__split="",
                           data__segmentation_dir=os.path.join(data, "maps"))
  config.data.channels = 1
  _check_semantic_task(_train(config, tmp_path / "ldm"), tmp_path)


def test_semantic_file_task_renders_label_maps_of_any_size(tiny_autoencoder, tmp_path):
  _check_semantic_task(_random_semantic(tiny_autoencoder), tmp_path)


def _check_semantic_task(pipeline, tmp_path):
  seven, one = np.zeros((16, 16)), np.zeros((16, 16))
  seven[3:13, 4:12] = 8
  one[2:14, 7:9] = 2
  a = _one_input_job(pipeline, "semantic", tmp_path, "a", _label_map(seven))
  b = _one_input_job(pipeline, "semantic", tmp_path, "b", _label_map(one))
  assert np.abs(a - b).max() > 0, "the label map is ignored"
  wide = _one_input_job(pipeline, "semantic", tmp_path, "w", _label_map(
      np.concatenate([seven, one, seven], axis=1)[:, :44]))   # padded to 48, cropped back
  assert wide.shape == (16, 44)
  with pytest.raises(JobError, match=r"in_x/map.png' holds class 11, but the model knows 11 "
                                     r"classes \(0..10\)"):
    _one_input_job(pipeline, "semantic", tmp_path, "x", _label_map(np.full((16, 16), 11)))


@pytest.mark.slow   # ~47 s; the text route also trains in tests/test_routes.py (-m slow)
def test_text_model_trains_on_a_captioned_folder_and_follows_prompts(tiny_autoencoder, tmp_path):
  data = build_digits("captions", str(tmp_path / "captioned"), start=0, count=32)
  config = tiny_ldm_config(tiny_autoencoder, "text", data__source="image_folder",
                           data__path=data, data__split="", data__random_flip=False,
                           cond__text_tokenizer="train", cond__text_vocab_size=128,
                           cond__text_max_length=12, cond__text_depth=1, cond__text_heads=2)
  config.data.channels = 1
  pipeline = _train(config, tmp_path / "ldm")
  images = []
  for prompt in ("a handwritten seven", "the numeral 1, drawn with a thin stroke"):
    job = sampling_job.job_for(pipeline, prompts=[prompt], batch_size=1)
    out = str(tmp_path / prompt.replace(" ", "_").replace(",", ""))
    sampling_job.run(pipeline, job, out, ONE_DEVICE)
    images.append(np.load(os.path.join(out, "samples.npz"))["images"][0].astype(np.float32))
  assert np.abs(images[0] - images[1]).max() > 0, "the prompt is ignored"
