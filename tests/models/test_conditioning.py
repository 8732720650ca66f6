"""Conditioning encoders and tokenizers: null conditions, padding masks, rescaling, vocab files."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data.sources import DataError
from ldm_jax.data.text import PAD_ID, TextTokenizer, train_wordpiece
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler, TextTransformer

KEY = jax.random.PRNGKey(0)


def test_class_embedder_null_rows():
  emb = ClassEmbedder(num_classes=5, embed_dim=8, null="learned")
  labels = jnp.array([0, 4, 2])
  variables = emb.init(KEY, labels)
  table = variables["params"]["embedding"]["embedding"]
  assert table.shape == (6, 8)  # one extra row: the learned unconditional class
  out = emb.apply(variables, labels, jnp.array([False, True, False]))
  assert out.shape == (3, 1, 8)
  np.testing.assert_array_equal(out[0, 0], table[0])
  np.testing.assert_array_equal(out[1, 0], table[5])
  np.testing.assert_array_equal(out[2, 0], table[2])
  zeros = ClassEmbedder(5, 8, null="zeros")
  zv = zeros.init(KEY, labels)
  np.testing.assert_array_equal(zeros.apply(zv, labels, jnp.array([True, False, True]))[0], 0)


def test_text_transformer_ignores_padding_and_uses_null():
  model = TextTransformer(vocab_size=20, max_length=6, width=16, depth=2, heads=2)
  tokens = jnp.array([[2, 7, 9, 3, PAD_ID, PAD_ID]])
  variables = jax.jit(model.init)(KEY, tokens)
  apply = jax.jit(model.apply)
  context, mask = apply(variables, tokens)
  assert context.shape == (1, 6, 16)
  np.testing.assert_array_equal(mask, [[True, True, True, True, False, False]])
  # A different padding token value at masked positions leaves real tokens' features alone.
  other = tokens.at[0, 5].set(PAD_ID)
  np.testing.assert_allclose(apply(variables, other)[0][0, :4], context[0, :4], rtol=1e-6)
  changed, _ = apply(variables, tokens.at[0, 1].set(8))
  assert float(jnp.max(jnp.abs(changed[0, 0] - context[0, 0]))) > 1e-4  # words interact
  null_ctx, null_mask = apply(variables, tokens, jnp.array([True]))
  np.testing.assert_allclose(null_ctx[0], variables["params"]["null_context"], rtol=1e-6)
  assert bool(null_mask.all())


def test_spatial_rescaler_halves_per_stage_and_maps_channels():
  seg = jax.nn.one_hot(jnp.zeros((1, 16, 16), jnp.int32).at[0, :8].set(3), 5)
  rescaler = SpatialRescaler(n_stages=2, multiplier=0.5, out_channels=3)
  variables = rescaler.init(KEY, seg)
  out = rescaler.apply(variables, seg)
  assert out.shape == (1, 4, 4, 3)
  plain = SpatialRescaler(n_stages=1).apply({}, seg)
  np.testing.assert_allclose(plain[0, 0, 0], [0, 0, 0, 1, 0], atol=1e-6)  # top half is class 3
  np.testing.assert_allclose(plain[0, 7, 0], [1, 0, 0, 0, 0], atol=1e-6)


def test_bert_vocab_tokenizer(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "digit",
                              "seven", "##s"]) + "\n")
  tok = TextTokenizer(str(vocab), max_length=8)
  assert tok.vocab_size == 9
  ids = tok.encode(["A digit sevens", ""])
  np.testing.assert_array_equal(ids, [[2, 5, 6, 7, 8, 3, 0, 0], [2, 3, 0, 0, 0, 0, 0, 0]])
  with pytest.raises(DataError, match="tokenizer file '.*missing.txt' does not exist"):
    TextTokenizer(str(tmp_path / "missing.txt"), 8)


def test_trained_wordpiece_tokenizer(tmp_path):
  captions = ["a red car on a road", "two red cars", "a dog on the road", "the dog runs"] * 5
  path = train_wordpiece(captions, vocab_size=60, path=str(tmp_path / "tokenizer.json"))
  tok = TextTokenizer(path, max_length=6)
  ids = tok.encode(["a red dog", "the road runs on and on and on"])
  assert ids.shape == (2, 6) and ids.dtype == np.int32
  assert ids[0, 0] == 2 and ids[0, 4] == 3 and ids[0, 5] == PAD_ID  # [CLS] a red dog [SEP]
  assert ids[1, -1] == 3  # truncated, still ends with [SEP]
  assert len(set(ids[0, 1:4])) == 3 and 1 not in ids[0]  # known words, no [UNK]


def test_spatial_rescaler_halving_is_torch_bilinear_unless_antialiased():
  """Without antialias a x0.5 bilinear halving averages each 2x2 cell, as torch's
  F.interpolate(mode='bilinear', align_corners=False); jax's antialiasing filter reaches
  further."""
  x = jnp.arange(64.0).reshape(1, 8, 8, 1) ** 1.5
  cells = np.asarray(x).reshape(1, 4, 2, 4, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(SpatialRescaler(n_stages=1).apply({}, x), cells, rtol=1e-6)
  antialiased = SpatialRescaler(n_stages=1, antialias=True).apply({}, x)
  assert float(jnp.max(jnp.abs(antialiased - cells))) > 0.1


def test_conditioner_segmentation_mapper_and_configs_from_before_it():
  """cond.rescaler_channels > 0: a learned bias-free 1x1 conv under params['cond']['rescaler']
  and that many concat channels; configs saved before the fields existed keep their model (no
  mapper, antialiased halvings)."""
  import types  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ldm_jax.conditioner import Conditioner  # pylint: disable=g-import-not-at-top
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("tiny_ldm", "class")
  config.cond.update({"type": "concat", "concat": "segmentation", "seg_classes": 5,
                      "rescaler_stages": 1})
  first = types.SimpleNamespace(downsample_factor=2, channels=3, latent_channels=4)
  seg = jnp.asarray(np.random.default_rng(0).integers(0, 5, (2, 16, 16)), jnp.int32)
  batch = {"image": jnp.zeros((2, 16, 16, 3)), "segmentation": seg}
  plain = Conditioner(config, first, 0, 0)
  assert plain.concat_channels == 5 and plain.init(KEY, batch) == {}
  cells = np.asarray(jax.nn.one_hot(seg, 5)).reshape(2, 8, 2, 8, 2, 5).mean(axis=(2, 4))
  np.testing.assert_allclose(plain.concat_input(batch, None, 1.0, {}), cells, atol=1e-6)
  config.cond.rescaler_channels = 3
  mapped = Conditioner(config, first, 0, 0)
  params = mapped.init(KEY, batch)
  kernel = params["rescaler"]["channel_mapper"]["kernel"]
  assert mapped.concat_channels == 3 and kernel.shape == (1, 1, 5, 3)
  np.testing.assert_allclose(mapped.concat_input(batch, None, 1.0, params),
                             cells @ np.asarray(kernel[0, 0]), rtol=1e-5, atol=1e-6)
  old = config.to_dict()
  for field in ("rescaler_channels", "rescaler_antialias"):
    old["cond"].pop(field)
  before = Conditioner(ml_collections.ConfigDict(old), first, 0, 0)
  assert (before.rescaler.out_channels, before.rescaler.antialias) == (0, True)
  assert before.concat_channels == 5


def test_layout_object_binding_pairs_each_box_with_its_class():
  """bind_objects: a box's corner tokens carry its class (object_features repeats each box's
  class id and corner features over its three tokens); without it, and with no transformer
  layer to pair them, a corner token's context does not depend on the class at all."""
  from ldm_jax.models.conditioning import grid_fourier_features, object_features
  grid, offset = 4, 2 + 10
  # start; box (class 3, corners 5 and 15); box (class 7, corners 0 and 10); one padding box.
  tokens = jnp.array([[1, 5, offset + 5, offset + 15, 9, offset, offset + 10, 0, 0, 0]])
  corners = grid_fourier_features(tokens, offset, grid)
  ids, box = object_features(tokens, corners)
  np.testing.assert_array_equal(ids, [[0, 5, 5, 5, 9, 9, 9, 0, 0, 0]])
  box0 = jnp.concatenate([corners[0, 2], corners[0, 3]])
  box1 = jnp.concatenate([corners[0, 5], corners[0, 6]])
  for i in (1, 2, 3):
    np.testing.assert_array_equal(box[0, i], box0)
    np.testing.assert_array_equal(box[0, i + 3], box1)
  np.testing.assert_array_equal(box[0, 0], 0.0)
  np.testing.assert_array_equal(box[0, 7:], 0.0)

  swapped = tokens.at[0, 1].set(9).at[0, 4].set(5)     # the two boxes' classes exchanged
  for bind in (False, True):
    model = TextTransformer(vocab_size=offset + grid * grid, max_length=10, width=16, depth=0,
                            heads=2, corner_grid=grid, corner_offset=offset, bind_objects=bind)
    variables = model.init(KEY, tokens)
    a, _ = model.apply(variables, tokens)
    b, _ = model.apply(variables, swapped)
    corner_tokens = jnp.array([2, 3, 5, 6])
    changed = float(jnp.max(jnp.abs(a[0, corner_tokens] - b[0, corner_tokens])))
    assert (changed > 1e-3) == bind, (bind, changed)


def test_pixel_centres_and_layout_corners_share_one_xy_convention():
  """unet.attention_coords' pixel features and the corner tokens' features agree on what x and
  y are: a corner on a pixel's centre has exactly that pixel's features (on a 4x4 map the
  centres are odd eighths, which a 9-point lattice holds), and no other pixel's."""
  from ldm_jax.models.conditioning import grid_fourier_features, layout_tokens
  from ldm_jax.models.layers import fourier_features, pixel_centres
  h = w = 4
  grid, classes = 9, 10
  centres = pixel_centres(h, w)
  np.testing.assert_allclose(centres[2 * w + 3], [3.5 / w, 2.5 / h])   # row 2, column 3
  pixels = fourier_features(centres)
  for col, row in ((3, 0), (0, 2), (1, 3)):
    x, y = (col + 0.5) / w, (row + 0.5) / h
    tokens = layout_tokens(jnp.array([[[x, y, 1.0, 1.0]]]), jnp.array([[3]]), classes, grid)
    corner = grid_fourier_features(tokens, 2 + classes, grid)[0, 2]   # the top-left corner
    distance = jnp.abs(pixels - corner).max(-1)
    assert int(jnp.argmin(distance)) == row * w + col
    assert float(distance[row * w + col]) < 1e-5 < float(jnp.sort(distance)[1])
