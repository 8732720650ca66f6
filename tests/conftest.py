"""Test set-up: 8 CPU devices for real sharding, a compilation cache, shared fixtures."""
import os

# Must happen before JAX initialises its backends. (--xla_backend_optimization_level=0 would
# cut compile time ~40%, but it moved a stage-1 gradient 2% away from jax.grad's: not used.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ldm_jax  # noqa: E402,F401  (XLA's CPU kernels, chosen before JAX starts: ldm_jax/xla_cpu.py)
import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Identical programs compiled by different tests (same tiny model, same mesh) hit this cache.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("LDM_JAX_TEST_CACHE", "/tmp/ldm_jax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def load_config(name: str, variant: str | None = None):
  """configs/<name>.py's get_config(variant), unlocked for tests to adjust."""
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  config.unlock()
  return config


@pytest.fixture
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared test data not found at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
  """A folder holding train/<class>/*.jpg: 20 CIFAR-10 training images of each of 10 classes."""
  import tarfile  # pylint: disable=g-import-not-at-top
  archive = SHARED_DATA / "cifar10" / "cifar10-train-jpeg.tar.gz"
  if not archive.exists():
    pytest.skip(f"{archive} not found")
  out = tmp_path_factory.mktemp("cifar")
  counts = {}
  with tarfile.open(archive) as tar:
    for member in tar:
      if not member.isfile():
        continue
      parts = pathlib.PurePosixPath(member.name).parts
      cls = parts[-2]
      if counts.get(cls, 0) >= 20:
        if len(counts) == 10 and all(v >= 20 for v in counts.values()):
          break
        continue
      counts[cls] = counts.get(cls, 0) + 1
      tar.extract(member, out, filter="data")
  return out


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory):
  """A random tiny KL autoencoder (16px images, f = 2) exported for stage 2."""
  from tests.helpers import export_random_autoencoder  # pylint: disable=g-import-not-at-top
  return export_random_autoencoder(tmp_path_factory.mktemp("ae") / "export", "kl",
                                   image_size=16, ch_mult=(1, 2))


@pytest.fixture(scope="session")
def class_ldm(tiny_autoencoder, tmp_path_factory):
  """The tiny class-conditional LDM trained 3 steps on digits: (history, workdir). Shared by
  the route, sampling and stage-2 tests; read it, never write into it."""
  from tests.helpers import tiny_ldm_config, train_on_digits  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("class_ldm")
  return train_on_digits(tiny_ldm_config(tiny_autoencoder), workdir), str(workdir)


@pytest.fixture(scope="session")
def tiny_ae_six_steps(tmp_path_factory):
  """The training harness's tiny autoencoder, six steps on one device (checkpoints 3 and 6):
  (history, workdir). Shared by the harness and fault tests; copy it before writing into it."""
  from tests.training.test_harness import run  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("tiny_ae_six")
  return run(workdir), workdir
