"""Every conditioning route trains through the real training loop on real digits and samples
through the path sample.py uses, with the condition changing the sample; routes that can train
from a latent cache do, and the one that cannot is refused at start-up.

The data are tests.helpers.digit_source(): real digits, a caption naming each, and a map of the
digit's binarised shape labelled with its class. The model is the suite's one tiny LDM
(tests.helpers.tiny_ldm_config); the class route reuses the session's trained `class_ldm`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data import conditions
from ldm_jax.errors import ConfigError
from ldm_jax.inference import load_pipeline
from ldm_jax.training import loop
from tests.helpers import DIGITS, ROUTES, digit_source, tiny_ldm_config

CACHEABLE = ("lowres", "segmentation")   # label/caption caches: tests/training/test_stage2.py
N = DIGITS


@pytest.fixture
def autoencoder(tiny_autoencoder):
  return tiny_autoencoder


@pytest.fixture(autouse=True)
def captioned_digits(monkeypatch):
  source = digit_source()
  monkeypatch.setattr(loop, "open_source", lambda data_config, split, **kw: source)
  return source


def route_config(autoencoder, route, **first_stage):
  return tiny_ldm_config(autoencoder, route,
                         **{f"first_stage__{k}": v for k, v in first_stage.items()})


def generate_pair(pipeline, source, a: int, b: int):
  """Two samples from the same noise (index 0) under the conditions of examples a and b,
  through the pipeline's generate function (what sample.py jits)."""
  ex = [source[a], source[b]]
  kwargs = {}
  if pipeline.ldm.cond.context == "class" or pipeline.ldm.cond.adm:
    kwargs["labels"] = [e["label"] for e in ex]
  if pipeline.ldm.cond.context == "text":
    kwargs["prompts"] = [e["caption"] for e in ex]
  if pipeline.ldm.cond.concat:
    kwargs["images"] = [e["image"] for e in ex]
    if pipeline.ldm.cond.concat == "segmentation":
      kwargs["masks"] = [e["segmentation"] for e in ex]
    if pipeline.ldm.cond.concat == "inpaint":
      half = np.zeros((16, 16), np.float32)
      half[:, 8:] = 1.0
      kwargs["masks"] = [half, half]
  batch = pipeline.condition_batch(2, **kwargs)
  generate = jax.jit(pipeline.make_generate())
  return np.asarray(generate(pipeline.params, pipeline.frozen, jax.random.PRNGKey(0),
                             jnp.zeros((2,), jnp.int32), batch))


# The class route in the default run (it reuses the session's trained class_ldm, which the
# sampling and stage-2 tests share); the others each compile their own model (~50 s on 2 cores)
# and run with -m slow. The segmentation alignment fix is also checked without a model in
# tests/data/test_conditions.py.
DEFAULT_ROUTES = ("class",)


def _routes(names):
  return [pytest.param(r, marks=() if r in DEFAULT_ROUTES else pytest.mark.slow) for r in names]


@pytest.mark.parametrize("route", _routes(ROUTES))
def test_route_trains_and_its_condition_changes_the_sample(autoencoder, captioned_digits,
                                                          route, tmp_path, request):
  if route == "class":   # the session's shared run of this very config
    history, workdir = request.getfixturevalue("class_ldm")
  else:
    workdir = str(tmp_path)
    history = loop.train_and_evaluate(route_config(autoencoder, route), workdir,
                                      devices=jax.devices()[:1])
  assert len(history) == 3 and np.all(np.isfinite([h["loss"] for h in history]))
  pipeline = load_pipeline(workdir)
  # Examples 0 and 1 are a 7 and a 2: different labels, captions, images and maps.
  images = generate_pair(pipeline, captioned_digits, 0, 1)
  assert images.shape == (2, 16, 16, 1) and np.all(np.isfinite(images))
  assert np.abs(images[0] - images[1]).max() > 1e-4, f"{route}: the condition is ignored"


@pytest.mark.parametrize("route", _routes(CACHEABLE))
def test_route_trains_from_a_latent_cache_holding_its_conditions(autoencoder, captioned_digits,
                                                                 route, tmp_path):
  config = route_config(autoencoder, route, precompute_latents=True)
  history = loop.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert np.all(np.isfinite([h["loss"] for h in history]))
  cache = sources_of_cache(tmp_path / "latents")
  assert len(cache) == N and "latent" in cache[0]
  concat = conditions.concat_kind(config.cond)
  expected = conditions.cache_example_fn(config, latent_size=8)(captioned_digits[5], None)
  for key in conditions.CACHED_CONDITIONS.get(concat, ()):
    assert key in cache[5], f"the cache of route {route} lacks '{key}'"
    np.testing.assert_array_equal(cache[5][key], expected[key])
  pipeline = load_pipeline(str(tmp_path))
  images = generate_pair(pipeline, captioned_digits, 0, 1)
  assert np.abs(images[0] - images[1]).max() > 1e-4


def sources_of_cache(directory):
  from ldm_jax.data.latent_cache import LatentCacheSource  # pylint: disable=g-import-not-at-top
  return LatentCacheSource(str(directory))


def test_inpainting_refuses_a_latent_cache_at_start_up(autoencoder, tmp_path):
  config = route_config(autoencoder, "inpaint", precompute_latents=True)
  with pytest.raises(ConfigError, match="first_stage.precompute_latents"):
    loop.Trainer(config, str(tmp_path), devices=jax.devices()[:1])


def test_start_up_checks_that_need_the_first_stage_name_the_field(autoencoder):
  """rescaler_stages must reach the first stage's latent grid; adm has no zeros null label."""
  from ldm_jax.first_stage import load_first_stage  # pylint: disable=g-import-not-at-top
  from ldm_jax.ldm import LatentDiffusion  # pylint: disable=g-import-not-at-top
  first = load_first_stage(autoencoder)   # f = 2: 16 px images, 8 px latents
  config = route_config(autoencoder, "segmentation")
  config.cond.rescaler_stages = 2
  with pytest.raises(ConfigError, match=r"cond.rescaler_stages: 2 halvings take the 16px map to "
                     r"4px, but the first stage's latents are 8px \(f=2\); set "
                     r"cond.rescaler_stages=1"):
    LatentDiffusion(config, first)
  config = route_config(autoencoder, "adm")
  config.cond.null = "zeros"
  with pytest.raises(ConfigError, match=r"cond.null: 'zeros' has no null label"):
    LatentDiffusion(config, first, num_classes=10)
  with pytest.raises(ConfigError, match=r"cond.num_classes: cond.type='adm' needs class labels"):
    LatentDiffusion(route_config(autoencoder, "adm"), first, num_classes=0)
