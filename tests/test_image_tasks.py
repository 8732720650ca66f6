"""sample.py's file tasks: upscale a folder with a super-resolution model (any size, tiled or
not; back-projected onto the input), inpaint images with masks (an inpainting model, or
mask-blend with any class model); the known region of an inpainting equals the input; bad
inputs stop with one line naming the file.

Models are the suite's tiny LDM (tests.helpers.tiny_ldm_config) on real MNIST digits; the
class model is the session's shared `class_ldm`.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from ldm_jax import image_tasks
from ldm_jax.diffusion import tiling
from ldm_jax.errors import JobError
from ldm_jax.first_stage import load_first_stage
from ldm_jax.inference import Pipeline, load_pipeline
from ldm_jax.ldm import LatentDiffusion
from tests.helpers import digit_source, pil_bicubic, tiny_ldm_config

ONE_DEVICE = Mesh(np.asarray(jax.devices()[:1]), ("data",))


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8).squeeze()).save(path)


def _read(path):
  return np.asarray(Image.open(path), np.float32)


# -- tiling ------------------------------------------------------------------------------------
def test_tiles_cover_the_grid_on_the_unets_multiple():
  origins, th, tw = tiling.tile_origins(20, 12, 8, multiple=4)
  assert (th, tw) == (8, 8)
  assert all(y % 4 == 0 and x % 4 == 0 for y, x in origins)
  covered = np.zeros((20, 12), bool)
  for y, x in origins:
    covered[y:y + th, x:x + tw] = True
  assert covered.all()


def test_tiled_model_equals_the_whole_for_a_pointwise_model_and_blends_a_local_one():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 20, 12, 3))
  concat = jax.random.normal(jax.random.PRNGKey(1), (2, 20, 12, 2))
  cond = {"concat": concat, "context": None}

  def pointwise(xt, t, c):
    return xt * 2.0 + c["concat"].sum(-1, keepdims=True) + t[:, None, None, None]

  t = jnp.array([3.0, 5.0])
  whole = pointwise(x, t, cond)
  tiled = tiling.tiled_model(pointwise, 8, multiple=4)(x, t, cond)
  np.testing.assert_allclose(tiled, whole, atol=1e-5)

  def blur(xt, t, c):   # sees its neighbours: tiles differ at their borders, blended smoothly
    del t, c
    return jax.image.resize(jax.image.resize(xt, (xt.shape[0], xt.shape[1] // 2,
                                                  xt.shape[2] // 2, 3), "linear"),
                            xt.shape, "linear")

  tiled = tiling.tiled_model(blur, 8, multiple=4)(x, t, cond)
  assert float(jnp.abs(tiled - blur(x, t, cond)).mean()) < 0.1


# -- upscale -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_sr(tiny_autoencoder):
  """A super-resolution pipeline with random weights (no training): the suite's tiny LDM on
  the lowres route, 16px from 8px (f=2); enough to check the job's mechanics."""
  config = tiny_ldm_config(tiny_autoencoder, "lowres", sample__steps=2)
  ldm = LatentDiffusion(config, load_first_stage(tiny_autoencoder))
  params = jax.jit(ldm.init_params)(jax.random.PRNGKey(0), {"image": jnp.zeros((1, 16, 16, 1)),
                                                   "lowres": jnp.zeros((1, 8, 8, 1))})
  return Pipeline(ldm, params, {"autoencoder": ldm.first.variables}, 1.0, "random sr")


def test_upscale_job_outputs_every_input_at_f_times_its_size_and_resumes(random_sr, tmp_path):
  rng = np.random.default_rng(0)
  shapes = {"a.png": (8, 8), "nested/b.png": (8, 8)}
  for name, shape in shapes.items():
    _save(str(tmp_path / "in" / name), rng.integers(0, 256, shape))
  _save(str(tmp_path / "wide" / "c.jpg"), rng.integers(0, 256, (8, 11)))
  job = image_tasks.FileJob("upscale", str(tmp_path / "in"), seed=3)
  out = str(tmp_path / "out")
  first = image_tasks.run(random_sr, job, out, ONE_DEVICE)
  assert first["generated"] == 2
  got = {n: _read(image_tasks.output_path(out, n)) for n in shapes}
  for name, (h, w) in shapes.items():
    assert got[name].shape == (2 * h, 2 * w), name
  assert np.abs(got["a.png"] - got["nested/b.png"]).mean() > 1.0
  # Back-projected onto the input (the default), the output downsampled nears the input, up to
  # clipping to the pixel range (these inputs are noise); the raw sample of a random model is
  # far from it.
  raw = image_tasks.run(random_sr, dataclasses.replace(job, consistency=0), str(tmp_path / "raw"),
                        ONE_DEVICE)
  assert raw["generated"] == 2
  given = _read(str(tmp_path / "in" / "a.png"))
  residual = {name: np.abs(pil_bicubic(_read(image_tasks.output_path(d, "a.png")), *given.shape)
                          - given).mean()
              for name, d in (("consistent", out), ("raw", str(tmp_path / "raw")))}
  assert residual["consistent"] < 0.25 * residual["raw"], residual   # measured 12.8 vs 71.0
  os.remove(image_tasks.output_path(out, "nested/b.png"))
  again = image_tasks.run(random_sr, job, out, ONE_DEVICE)
  assert again == dict(again, generated=1, skipped=1)
  np.testing.assert_array_equal(_read(image_tasks.output_path(out, "nested/b.png")),
                                got["nested/b.png"])     # a resumed output: the same pixels
  # Any size (8 x 11 is padded to the UNet's 8 x 12 and cropped back), denoised and decoded
  # in tiles of 4 latent pixels.
  tiled = image_tasks.run(random_sr, image_tasks.FileJob("upscale", str(tmp_path / "wide"),
                                                         tile=4), str(tmp_path / "t"),
                          ONE_DEVICE)
  assert tiled["generated"] == 1
  assert _read(image_tasks.output_path(str(tmp_path / "t"), "c.jpg")).shape == (16, 22)
  with pytest.raises(JobError, match="differs in .*tile"):   # another job's --out
    image_tasks.run(random_sr, dataclasses.replace(job, tile=4), out, ONE_DEVICE)
  with pytest.raises(JobError, match="--consistency: expected .* >= 0, got -1"):
    image_tasks.run(random_sr, dataclasses.replace(job, consistency=-1), out, ONE_DEVICE)


def test_a_job_records_consistency_and_seamless_only_where_they_act(random_sr):
  """Fields that do nothing for a job stay out of its spec, so they cannot block a resume."""
  def keys(task, mode, **kw):
    return set(image_tasks._spec(random_sr, image_tasks.FileJob(task, "in", **kw), [], mode))  # pylint: disable=protected-access
  assert "consistency" in keys("upscale", "sr") and "seamless" not in keys("upscale", "sr")
  assert "seamless" in keys("inpaint", "blend_inpaint")
  assert "consistency" not in keys("inpaint", "blend_inpaint")
  assert "seamless" not in keys("inpaint", "blend_inpaint", composite=False)
  assert "keep_known" in keys("inpaint", "concat_inpaint")
  assert "keep_known" not in keys("inpaint", "blend_inpaint")
  assert not {"seamless", "consistency", "keep_known"} & keys("semantic", "semantic")


@pytest.mark.parametrize("mode,keep_known,blends", [
    ("concat_inpaint", True, True), ("concat_inpaint", False, False),
    ("blend_inpaint", False, True), ("sr", True, False)])
def test_keep_known_makes_an_inpainting_models_job_mask_blend(mode, keep_known, blends):
  """--keep_known (default on) asks the sampler to keep the known latents for an inpainting
  model's job too (what that does is tested on the sampler and in the blend-inpainting job)."""
  asked = {}

  class Recorder:
    params = frozen = {}

    def make_generate(self, **kw):
      asked.update(kw)
      return lambda *a: None

  job = image_tasks.FileJob("inpaint", "in", keep_known=keep_known)
  image_tasks._compile(Recorder(), job, mode, ONE_DEVICE)  # pylint: disable=protected-access
  assert asked["inpaint"] is blends


def test_upscale_refuses_a_model_that_is_not_super_resolution(class_ldm, tmp_path):
  pipeline = load_pipeline(class_ldm[1])
  _save(str(tmp_path / "in" / "a.png"), np.zeros((8, 8)))
  with pytest.raises(JobError, match="not a super-resolution model"):
    image_tasks.run(pipeline, image_tasks.FileJob("upscale", str(tmp_path / "in")),
                    str(tmp_path / "out"), ONE_DEVICE)


# -- inpaint -----------------------------------------------------------------------------------
def _inpaint_inputs(tmp_path, n=2):
  digits = digit_source()
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 8:] = 255
  for i in range(n):
    image = np.asarray(Image.fromarray(digits[i]["image"][..., 0]).resize((16, 16)))
    _save(str(tmp_path / "in" / f"{i}.png"), image)
    _save(str(tmp_path / "masks" / f"{i}.png"), mask)
  return mask > 0


def test_blend_inpainting_keeps_the_known_region_and_fills_the_mask(class_ldm, tmp_path):
  pipeline = load_pipeline(class_ldm[1])
  fill = _inpaint_inputs(tmp_path)
  job = image_tasks.FileJob("inpaint", str(tmp_path / "in"), str(tmp_path / "masks"), label=3)
  image_tasks.run(pipeline, job, str(tmp_path / "out"), ONE_DEVICE)
  sources = [_read(str(tmp_path / "in" / f"{i}.png")) for i in range(2)]
  for i, source in enumerate(sources):
    out = _read(image_tasks.output_path(str(tmp_path / "out"), f"{i}.png"))
    np.testing.assert_array_equal(out[~fill], source[~fill])   # composite: exactly the input
    assert np.abs(out[fill] - source[fill]).mean() > 1.0       # the fill is new content
  # Pasted as sampled (--noseamless), the same fill meets the known pixels with a larger jump
  # across the mask's edge than Poisson-blended (the default).
  image_tasks.run(pipeline, dataclasses.replace(job, seamless=False), str(tmp_path / "pasted"),
                  ONE_DEVICE)
  edge = fill & ~np.roll(fill, 1, axis=1)                      # fill pixels with a known left
  for i in range(2):
    jumps = [np.abs(o[edge] - o[np.roll(edge, -1, axis=1)]).mean() for o in (
        _read(image_tasks.output_path(str(tmp_path / d), f"{i}.png")) for d in ("out", "pasted"))]
    assert jumps[0] < 0.8 * jumps[1], jumps       # measured 80 vs 168 and 97 vs 140
  # Under the composite, mask-blend sampling keeps the known latents exactly: a latent pixel
  # is regenerated only where one of its f x f pixels is to be filled.
  ldm, ae = pipeline.ldm, pipeline.frozen["autoencoder"]
  images = jnp.asarray(np.stack(sources) / 127.5 - 1.0)[..., None]
  masks = jnp.asarray(np.broadcast_to(fill, (2, 16, 16))[..., None], jnp.float32)
  keep = ldm.known_region(ae, pipeline.scale_factor, images, masks)
  assert float(keep.mask.sum()) == 2 * (64 - 4 * 4)          # an 8x8 latent; 4x4 of it filled
  x_T = jax.random.normal(jax.random.PRNGKey(0), keep.known.shape)
  z = ldm.sample(pipeline.params, ae, pipeline.scale_factor,
                 {"label": jnp.array([3, 3])}, x_T, jax.random.PRNGKey(1), mask=keep)
  kept = np.asarray(keep.mask, bool)[..., 0]
  np.testing.assert_array_equal(np.asarray(z)[kept], np.asarray(keep.known)[kept])
  assert np.abs(np.asarray(z)[~kept] - np.asarray(keep.known)[~kept]).mean() > 0.1


def test_inpainting_inputs_are_checked_before_any_compute(class_ldm, tmp_path):
  pipeline = load_pipeline(class_ldm[1])
  _inpaint_inputs(tmp_path)
  _save(str(tmp_path / "masks" / "1.png"), np.zeros((12, 16)))          # wrong size
  job = image_tasks.FileJob("inpaint", str(tmp_path / "in"), str(tmp_path / "masks"), label=3)
  with pytest.raises(JobError, match=r"--masks: '.*1\.png' is 16x12, but its image .* 16x16"):
    image_tasks.run(pipeline, job, str(tmp_path / "out"), ONE_DEVICE)
  os.remove(tmp_path / "masks" / "1.png")
  with pytest.raises(JobError, match=r"--masks: no mask '.*1\.png'"):
    image_tasks.run(pipeline, job, str(tmp_path / "out"), ONE_DEVICE)
  _save(str(tmp_path / "masks" / "1.png"), np.zeros((16, 16)))
  (tmp_path / "in" / "2.png").write_bytes(b"not a png")
  with pytest.raises(JobError, match=r"--inputs: cannot read image '.*2\.png'"):
    image_tasks.run(pipeline, job, str(tmp_path / "out"), ONE_DEVICE)
  no_label = image_tasks.FileJob("inpaint", str(tmp_path / "in"), str(tmp_path / "masks"))
  with pytest.raises(JobError, match="--classes"):
    image_tasks.run(pipeline, no_label, str(tmp_path / "out"), ONE_DEVICE)
  with pytest.raises(JobError, match="--out: .* lies inside --inputs"):
    image_tasks.run(pipeline, job, str(tmp_path / "in" / "out"), ONE_DEVICE)
  os.remove(tmp_path / "in" / "2.png")
  _save(str(tmp_path / "in" / "0.jpg"), np.zeros((16, 16)))
  with pytest.raises(JobError, match=r"--inputs: '0\.jpg' and '0\.png' would both be written"):
    image_tasks.run(pipeline, job, str(tmp_path / "out"), ONE_DEVICE)
  assert not os.path.exists(tmp_path / "out" / "images")
