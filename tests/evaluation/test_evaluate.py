"""python -m ldm_jax.evaluate on real images: one JSON line, cached reference statistics, the
published mu/sigma format, and extraction sharded over 8 devices equal to one device."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from ldm_jax.data.sources import ArraySource
from ldm_jax.errors import DataError
from ldm_jax.evaluate import main as evaluate_main
from ldm_jax.evaluation import features, inception


@pytest.fixture(scope="module")
def cifar(cifar_folder, tmp_path_factory):
  """Two folders of 8 CIFAR-10 JPEGs (links into the shared cifar_folder): 'a' holds the
  first 8 by sorted path, 'b' the next 8."""
  root = tmp_path_factory.mktemp("fid")
  files = sorted(cifar_folder.rglob("*.jpg"))[:16]
  for n, path in enumerate(files):
    folder = root / ("a" if n < 8 else "b")
    folder.mkdir(exist_ok=True)
    (folder / f"{n:02d}.jpg").symlink_to(path)
  return root


def _run(args, capsys):
  evaluate_main(args)
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow   # evaluation end to end: ~25 s each
def test_cli_scores_folders_caches_the_reference_and_reads_published_stats(
    cifar, inception_weights, tmp_path, capsys, caplog):
  common = ["--weights", inception_weights, "--cache_dir", str(tmp_path / "cache"),
            "--batch_size", "8"]
  same = _run(["--samples", str(cifar / "a"), "--reference", str(cifar / "a"),
               "--out", str(tmp_path / "same")] + common, capsys)
  other = _run(["--samples", str(cifar / "b"), "--reference", str(cifar / "a"),
                "--out", str(tmp_path / "other")] + common, capsys)
  assert abs(same["fid"]) < 1e-3 and other["fid"] > 50.0   # a set against itself: 0
  assert same["precision"] == same["recall"] == 1.0 and same["num_samples"] == 8
  assert "kid" in other and "inception_score" not in other   # default_1 has no logits
  assert json.loads((tmp_path / "other" / "metrics.json").read_text())["fid"] == other["fid"]
  assert any("reference statistics from" in r.getMessage() for r in caplog.records)  # cached
  # A published-style statistics file (mu, sigma only) gives the same FID.
  cached = next((tmp_path / "cache").glob("reference-*.npz"))
  with np.load(cached) as data:
    np.savez(tmp_path / "stats.npz", mu=data["mu"], sigma=data["sigma"])
  published = _run(["--samples", str(cifar / "b"), "--reference", str(tmp_path / "stats.npz"),
                    "--out", str(tmp_path / "published")] + common, capsys)
  assert published["fid"] == pytest.approx(other["fid"], rel=1e-9)
  assert "kid" not in published


def test_extraction_sharded_over_8_devices_equals_one_device(cifar, inception_weights):
  images = np.stack([np.asarray(Image.open(p).convert("RGB"))
                     for p in sorted((cifar / "b").iterdir())])
  source = ArraySource(images[:5])          # 5 images: padded to the batch of 8
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  sharded = features.extract(source, inception.FeatureExtractor(
      inception_weights, NamedSharding(mesh, P("batch"))), batch_size=8)["pool"]
  one = inception.FeatureExtractor(inception_weights)(
      np.stack([features.resize_299(im) for im in images[:5]]))["pool"]
  assert jax.device_count() == 8 and sharded.shape == (5, 2048)
  np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_one_line(tmp_path, inception_weights):
  with pytest.raises(SystemExit) as exit_info:
    evaluate_main(["--samples", str(tmp_path / "missing"), "--reference", str(tmp_path),
                   "--weights", inception_weights, "--out", str(tmp_path / "o")])
  assert exit_info.value.code == 2
  with pytest.raises(DataError, match="no 'mu' and 'sigma'"):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    features.read_statistics(str(tmp_path / "x.npz"))
  assert os.path.exists(inception_weights)


@pytest.mark.slow   # evaluation end to end: ~25 s each
def test_training_fid_is_zero_for_the_images_themselves_and_grows_with_damage(
    cifar, inception_weights):
  """training/fid.py on 16 held-out images, 8 CPU devices: a 'generator' returning the batch
  itself scores 0; a damaged copy scores more, a worse one more still; the real statistics are
  computed once."""
  from ldm_jax.data.preprocess import model_inputs
  from ldm_jax.data.sources import ImageFolderSource
  from ldm_jax.training.fid import TrainingFid
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  source = ImageFolderSource(str(cifar), 3)   # a and b: 16 images
  fid = TrainingFid(inception_weights, mesh, source, lambda e, rng: {"image": e["image"]},
                    batch_size=8, num_samples=16, seed=0)

  def generator(noise):
    def generate(state, batch, frozen):
      x = model_inputs(batch)["image"]
      damaged = x + noise * jax.random.normal(jax.random.PRNGKey(1), x.shape)
      return x, damaged
    return generate

  assert abs(fid(generator(0.0), None, None)) < 1e-3
  real = fid.real_stats
  small, large = fid(generator(0.1), None, None), fid(generator(0.4), None, None)
  assert fid.real_stats is real and 1.0 < small < large


@pytest.mark.slow   # evaluation end to end: ~25 s each
def test_checkpoint_is_sampled_by_the_resumable_job_then_scored(class_ldm, inception_weights,
                                                                  cifar, tmp_path, capsys):
  """--checkpoint: the tiny class LDM's sampling job writes <out>/samples (grey 16 px digits,
  one per class), which are scored against a folder; a rerun resumes the finished job."""
  _, workdir = class_ldm
  args = ["--checkpoint", workdir, "--per_class", "1", "--steps", "2", "--sample_batch_size",
          "8", "--reference", str(cifar / "a"), "--weights", inception_weights, "--out",
          str(tmp_path / "eval"), "--batch_size", "8", "--metrics", "fid,pr"]
  first = _run(args, capsys)
  assert first["num_samples"] == 10 and np.isfinite(first["fid"]) and "kid" not in first
  assert len(list((tmp_path / "eval" / "samples" / "images").glob("*.png"))) == 10
  assert _run(args, capsys)["fid"] == pytest.approx(first["fid"], rel=1e-9)
