"""CompVis checkpoints: parity with the PyTorch outputs, EMA weights, exports that sample.py
loads, a guided DDIM trajectory equal to diffusers' DDIMScheduler's, the concat-conditioned
task models' layouts (super-resolution, inpainting, semantic synthesis) on ldm_jax's routes, and
first stages without attention (inpainting_big's attn_type 'none')."""
import dataclasses
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ldm_jax.diffusion import samplers
from ldm_jax.first_stage import load_first_stage
from ldm_jax.inference import load_pipeline
from ldm_jax.interop import (ConversionError, UnsupportedError, load_compvis,
                             load_compvis_unet, load_diffusers_unet, load_diffusers_vae,
                             read_state_dict)
from ldm_jax.interop.compvis import load_compvis_autoencoder, load_compvis_cond
from ldm_jax.interop.convert import main as convert_main
from ldm_jax.models.conditioning import SpatialRescaler
from tests.interop.helpers import assert_same_tree, rel_err

TOL = 1e-5


def _unet_eps(module, variables, outputs):
  return jax.jit(lambda v, x, t, c: module.apply(v, x, t, c))(
      variables, outputs["unet/x"], outputs["unet/t"], outputs["unet/context"])


def test_cin_layout_converts_with_ema_weights(compvis_files, outputs):
  """cin256-v2's layout: VQ first stage, UNet (EMA copy), ClassEmbedder with a null row."""
  ckpt, yaml = compvis_files["cin"]
  model = load_compvis(ckpt, yaml)
  assert model.unsupported == {} and "UNet: EMA weights (model_ema.*)" in model.notes
  unet, unet_vars = model.unet
  assert rel_err(_unet_eps(unet, unet_vars, outputs), outputs["unet_linear/eps"]) < TOL
  ae, ae_vars = model.autoencoder
  h = jax.jit(lambda v, x: ae.apply(v, x, method="encode"))(ae_vars, outputs["image"])
  decoded = jax.jit(lambda v, z: ae.apply(v, z, method="decode"))(ae_vars, outputs["vq/h"])
  assert rel_err(h, outputs["vq/h"]) < TOL and rel_err(decoded, outputs["vq/decoded"]) < TOL
  embedder, cond_vars = model.cond
  assert (embedder.num_classes, embedder.null, model.num_classes) == (5, "learned", 5)
  assert cond_vars["params"]["embedding"]["embedding"].shape == (6, 24)
  c = model.config
  assert (c.cond.type, c.cond.num_classes, c.cond.embed_dim) == ("class", 5, 24)
  assert (c.diffusion.linear_start, c.diffusion.linear_end, c.diffusion.scale_factor) == (
      0.0015, 0.0195, 0.75)
  assert (c.unet.num_heads, c.unet.use_linear_proj, c.unet.transformer_depth) == (2, True, 2)
  assert c.data.image_size == 16 and model.autoencoder_config.model.type == "vq"
  # Without EMA the (perturbed) raw weights are taken.
  _, raw = load_compvis_unet(ckpt, yaml, use_ema=False)
  assert not np.allclose(raw["params"]["out_conv"]["kernel"],
                         unet_vars["params"]["out_conv"]["kernel"])


def test_cin_export_samples_like_diffusers_ddim(compvis_files, outputs, tmp_path):
  """CLI export -> load_pipeline -> 10-step guided DDIM == the torch loop over diffusers'
  DDIMScheduler (leading spacing, steps_offset 1, alpha_prev of the last step alphas[0])."""
  ckpt, yaml = compvis_files["cin"]
  export = str(tmp_path / "cin")
  convert_main(["compvis", "--ckpt", ckpt, "--yaml", yaml, "--out", export])
  pipeline = load_pipeline(export)
  assert pipeline.num_classes == 5 and pipeline.scale_factor == 0.75
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 10)[::-1], outputs["ddim/timesteps"])
  ldm, frozen, scale = pipeline.ldm, pipeline.frozen, pipeline.scale_factor
  batch = pipeline.condition_batch(2, labels=outputs["ddim/labels"])

  @jax.jit
  def guided_ddim(params, frozen, x_T):
    keep = jnp.zeros((2,), bool)
    inputs = ldm.conditions(params, batch, frozen["autoencoder"], keep, scale)
    null = ldm.conditions(params, batch, frozen["autoencoder"], ~keep, scale)
    z, states = samplers.ddim_sample(
        ldm.model_fn(params), ldm.schedule, x_T, inputs, jax.random.PRNGKey(0),
        steps=10, eta=0.0, guidance=samplers.Guidance(float(outputs["ddim/guidance"]), null),
        return_intermediates=True)
    return states, ldm.decode(frozen["autoencoder"], z, scale)

  states, decoded = guided_ddim(pipeline.params, frozen, outputs["ddim/x_T"])
  errors = [rel_err(s, ref) for s, ref in zip(states, outputs["ddim/states"])]
  assert max(errors) < 1e-4, errors
  assert rel_err(decoded, outputs["ddim/decoded"]) < 1e-4
  # sample.py's path: the pipeline's own generate function.
  generate = jax.jit(pipeline.make_generate(sampler="ddim", steps=2, guidance_scale=2.0))
  images = generate(pipeline.params, frozen, jax.random.PRNGKey(0), jnp.arange(2), batch)
  assert images.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(images)))
  # And back out to diffusers folders, weights unchanged.
  convert_main(["to-diffusers", "--export", export, "--out", str(tmp_path / "hf")])
  unet, unet_vars = load_diffusers_unet(str(tmp_path / "hf" / "unet"))
  vae, vae_vars = load_diffusers_vae(str(tmp_path / "hf" / "vae"))
  assert unet == ldm.unet and vae == ldm.first.module
  assert_same_tree(unet_vars["params"], pipeline.params["unet"])
  assert_same_tree(vae_vars["params"], frozen["autoencoder"]["params"])
  table = load_file(str(tmp_path / "hf" / "class_embeddings.safetensors"))["embedding.weight"]
  np.testing.assert_array_equal(table, pipeline.params["cond"]["class"]["embedding"]["embedding"])


def test_sd_layout_without_its_text_encoder_converts_the_rest(compvis_files, outputs, tmp_path,
                                                              capsys):
  """An SD checkpoint whose CLIP weights were left out (tests/interop/test_stable_diffusion.py
  converts whole ones): the autoencoder and the UNet still convert."""
  ckpt, yaml = compvis_files["sd"]
  model = load_compvis(ckpt, yaml)
  assert set(model.unsupported) == {"cond"} and model.config is None
  assert "no text encoder weights (cond_stage_model.transformer.*)" in model.unsupported["cond"]
  assert model.scale_factor == pytest.approx(0.18215)
  unet, unet_vars = model.unet
  assert rel_err(_unet_eps(unet, unet_vars, outputs), outputs["unet_linear/eps"]) < TOL
  ae, ae_vars = model.autoencoder
  posterior = jax.jit(lambda v, x: ae.apply(v, x, method="encode"))(ae_vars, outputs["image"])
  assert rel_err(posterior.mean, outputs["vae_kl/mean"]) < TOL
  assert rel_err(posterior.logvar, outputs["vae_kl/logvar"]) < TOL
  # The CLI names the component it cannot convert ...
  with pytest.raises(SystemExit):
    convert_main(["compvis", "--ckpt", ckpt, "--yaml", yaml, "--out", str(tmp_path / "sd")])
  err = capsys.readouterr().err
  assert "no text encoder weights" in err
  # ... and exports the first stage for stage 2.
  convert_main(["compvis", "--ckpt", ckpt, "--yaml", yaml, "--out", str(tmp_path / "ae"),
                "--part", "autoencoder"])
  first = load_first_stage(str(tmp_path / "ae"))
  assert first.config.model.type == "kl" and first.latent_channels == 4


def test_autoencoder_checkpoint_drops_its_loss_weights(compvis_files, outputs):
  ckpt, yaml = compvis_files["kl_ae"]
  assert any(k.startswith("loss.") for k in read_state_dict(ckpt))
  model = load_compvis(ckpt, yaml)
  assert model.unet is None and model.config is None
  ae, ae_vars = model.autoencoder
  decoded = jax.jit(lambda v, z: ae.apply(v, z, method="decode"))(ae_vars, outputs["vae_kl/z"])
  assert rel_err(decoded, outputs["vae_kl/decoded"]) < TOL


def test_a_file_that_is_not_a_checkpoint_is_one_clear_line(tmp_path, monkeypatch):
  path = tmp_path / "model.ckpt"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)     # torch plays no part in reading
  with pytest.raises(ConversionError, match=r"model.ckpt.*not a PyTorch checkpoint"):
    read_state_dict(str(path))


def test_yaml_of_another_checkpoint_is_caught(compvis_files, tmp_path):
  ckpt, yaml = compvis_files["cin"]
  wrong = tmp_path / "wrong.yaml"
  wrong.write_text(open(yaml, encoding="utf-8").read().replace("0.0195", "0.012"))
  with pytest.raises(ConversionError, match="betas differ from the config's 'linear' schedule"):
    load_compvis(ckpt, str(wrong))


def test_unsupported_first_stage_is_named(compvis_files, tmp_path):
  ckpt, yaml = compvis_files["kl_ae"]
  linear = _edited(yaml, tmp_path, "ddconfig:\n", "ddconfig:\n      attn_type: linear\n")
  with pytest.raises(UnsupportedError, match="attn_type 'linear' is not supported"):
    load_compvis(ckpt, linear)


def test_inpainting_big_layout_converts_completely(compvis_files, outputs_noattn, tmp_path):
  """inpainting_big's first stage has no attention (ddconfig.attn_type 'none'): it converts to
  an autoencoder with model.mid_attention=False that encodes and decodes as torch's does, the
  whole checkpoint converts, and its export builds CompVis' inpainting condition through it."""
  ckpt, yaml = compvis_files["inpaint_noattn"]
  o = outputs_noattn
  model = load_compvis(ckpt, yaml)
  assert model.unsupported == {} and model.config is not None
  assert model.autoencoder_config.model.mid_attention is False
  ae, ae_vars = model.autoencoder
  assert not ae.mid_attention and ae.attn_resolutions == ()
  assert not [n for part in ("encoder", "decoder") for n in ae_vars["params"][part] if "attn" in n]
  h = jax.jit(lambda v, x: ae.apply(v, x, method="encode"))(ae_vars, o["image"])
  decoded = jax.jit(lambda v, z: ae.apply(v, z, method="decode"))(ae_vars, o["noattn/h"])
  assert rel_err(h, o["noattn/h"]) < TOL and rel_err(decoded, o["noattn/decoded"]) < TOL
  export = str(tmp_path / "inpaint")
  convert_main(["compvis", "--ckpt", ckpt, "--yaml", yaml, "--out", export])
  pipeline = load_pipeline(export)
  ldm = pipeline.ldm
  assert ldm.first.module == ae
  condition = jax.jit(lambda params, frozen, batch: ldm.conditions(
      params, batch, frozen["autoencoder"], jnp.zeros((2,), bool), pipeline.scale_factor))(
          pipeline.params, pipeline.frozen, {"image": o["image"], "mask": o["inpaint/mask"]})
  assert rel_err(condition["concat"], o["inpaint/concat"]) < 1e-4


def test_attn_type_none_has_no_level_attention_either(compvis_files, tmp_path):
  """CompVis' make_attn makes every attention of an attn_type 'none' coder an Identity, so the
  levels its attn_resolutions list get none."""
  ckpt, yaml = compvis_files["inpaint_noattn"]
  listed = _edited(yaml, tmp_path, "attn_resolutions: []", "attn_resolutions: [8]")
  module, _ = load_compvis_autoencoder(ckpt, listed)
  assert module.attn_resolutions == () and not module.mid_attention


def test_mid_attention_that_does_not_fit_the_checkpoint_is_one_line(compvis_files, tmp_path):
  ckpt, yaml = compvis_files["kl_ae"]          # with encoder/decoder.mid.attn_1.* weights
  none = _edited(yaml, tmp_path, "ddconfig:\n", "ddconfig:\n      attn_type: none\n")
  with pytest.raises(ConversionError, match=r"^CompVis checkpoint 'kl_ae.safetensors': "
                     r"ddconfig.attn_type 'none' means no mid-block attention, but the checkpoint "
                     r"has its 20 weights \(e\.g\. decoder\.mid\.attn_1\.k\.bias\); set "
                     r"ddconfig.attn_type 'vanilla', or use the config") as e:
    load_compvis(ckpt, none)
  assert "\n" not in str(e.value)
  ckpt, yaml = compvis_files["inpaint_noattn"]  # without them
  vanilla = _edited(yaml, tmp_path, "attn_type: none", "attn_type: vanilla")
  with pytest.raises(ConversionError, match=r"^CompVis checkpoint 'inpaint_noattn.safetensors' "
                     r"first stage \(first_stage_model\.\*\): ddconfig.attn_type 'vanilla' means "
                     r"a mid-block attention, but the checkpoint has none of its weights \(no "
                     r"encoder\.mid\.attn_1\.\*, decoder\.mid\.attn_1\.\*\); set "
                     r"ddconfig.attn_type 'none'") as e:
    load_compvis(ckpt, vanilla)
  assert "\n" not in str(e.value)


# name -> (config.cond fields, UNet in_channels, the batch the conditioner reads, torch's
# condition): the layouts of bsr_sr, inpainting_big and semantic_synthesis256 at fixture size.
TASKS = {
    "sr": ({"concat": "lowres"}, 7, lambda o: {"lowres": o["sr/lowres"]}, "sr/lowres"),
    "inpaint": ({"concat": "inpaint", "inpaint_convention": "compvis"}, 9,
                lambda o: {"image": o["inpaint/image"], "mask": o["inpaint/mask"]},
                "inpaint/concat"),
    "semantic": ({"concat": "segmentation", "seg_classes": 5, "rescaler_stages": 1,
                  "rescaler_channels": 3, "rescaler_antialias": False}, 7,
                 lambda o: {"segmentation": o["semantic/map"]}, "semantic/concat"),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_concat_task_layouts_convert_onto_the_concat_routes(name, compvis_files, outputs_concat,
                                                            tmp_path):
  """The converted UNet on torch's [z | condition] gives torch's eps; the export loads as a
  Pipeline whose conditioner builds torch's condition from the raw inputs (CompVis' inpaint
  script's mask and fill values, the rescaler's halving and channel mapper) and whose model
  then gives torch's eps."""
  ckpt, yaml = compvis_files[name]
  fields, in_channels, batch, condition = TASKS[name]
  o = outputs_concat
  model = load_compvis(ckpt, yaml)
  assert model.unsupported == {} and model.num_classes == 0
  c = model.config
  assert (c.cond.type, c.cond.p_uncond, c.data.image_size) == ("concat", 0.0, 16)
  assert {k: c.cond[k] for k in fields} == fields
  # (sr lists attention at factor 4 too, which its 2 levels lack: bsr_sr lists 16 for 4 levels)
  assert tuple(c.unet.attention_resolutions) == (2,)
  unet, unet_vars = model.unet
  assert unet.in_channels == in_channels and not unet.use_spatial_transformer
  x = jnp.concatenate([o["concat/z"], o[condition]], axis=-1)
  eps = jax.jit(lambda v, x, t: unet.apply(v, x, t))(unet_vars, x, o["concat/t"])
  assert rel_err(eps, o[f"{name}/eps"]) < TOL
  export = str(tmp_path / name)
  convert_main(["compvis", "--ckpt", ckpt, "--yaml", yaml, "--out", export])
  pipeline = load_pipeline(export)
  assert set(pipeline.params["cond"]) == ({"rescaler"} if name == "semantic" else set())
  ldm = pipeline.ldm

  @jax.jit
  def conditioned_eps(params, frozen, batch):
    cond = ldm.conditions(params, batch, frozen["autoencoder"], jnp.zeros((2,), bool),
                          pipeline.scale_factor)
    return cond["concat"], ldm.model_fn(params)(o["concat/z"], o["concat/t"], cond)

  concat, eps = conditioned_eps(pipeline.params, pipeline.frozen, batch(o))
  assert rel_err(concat, o[condition]) < 1e-4
  assert rel_err(eps, o[f"{name}/eps"]) < 1e-4


def test_spatial_rescaler_matches_torch_interpolate(compvis_files, outputs_concat):
  """semantic_synthesis' SpatialRescaler: F.interpolate(bilinear, x0.5) per stage, then the
  channel mapper; jax.image.resize's antialiasing (old segmentation configs) is another map."""
  ckpt, yaml = compvis_files["semantic"]
  module, variables = load_compvis_cond(ckpt, yaml)
  assert isinstance(module, SpatialRescaler) and not module.antialias
  assert variables["params"]["channel_mapper"]["kernel"].shape == (1, 1, 5, 3)
  onehot = jax.nn.one_hot(outputs_concat["semantic/map"], 5)
  for stages, want in ((1, "semantic/concat"), (2, "semantic/rescaled_2_stages")):
    rescaler = module.clone(n_stages=stages)
    assert rel_err(rescaler.apply(variables, onehot), outputs_concat[want]) < TOL
  antialiased = module.clone(n_stages=2, antialias=True).apply(variables, onehot)
  assert rel_err(antialiased, outputs_concat["semantic/rescaled_2_stages"]) > 0.05


def _edited(yaml, tmp_path, old, new):
  text = open(yaml, encoding="utf-8").read()
  assert old in text
  path = tmp_path / "edited.yaml"
  path.write_text(text.replace(old, new))
  return str(path)


def test_a_unet_that_does_not_fit_the_concat_condition_is_one_line(compvis_files, tmp_path):
  ckpt, yaml = compvis_files["sr"]
  inpaint = _edited(yaml, tmp_path, "cond_stage_config:\n      target: torch.nn.Identity",
                    "cond_stage_config: __is_first_stage__")
  with pytest.raises(ConversionError, match=r"^CompVis checkpoint 'sr.safetensors': the UNet "
                     r"takes 7 input channels, but the first stage's 4 latent channels \+ 5 of "
                     r"the 'inpaint' condition make 9; is this the YAML") as e:
    load_compvis(ckpt, inpaint)
  assert "\n" not in str(e.value)
  ckpt, yaml = compvis_files["semantic"]
  with pytest.raises(ConversionError, match=r"SpatialRescaler's n_stages=2 halvings do not take "
                     r"the map to the first stage's latent grid \(f=2\)"):
    load_compvis(ckpt, _edited(yaml, tmp_path, "n_stages: 1", "n_stages: 2"))


@pytest.mark.parametrize("name,old,new,message", [
    ("semantic", "n_stages: 1", "n_stages: 1\n        method: bicubic",
     r"SpatialRescaler method='bicubic' multiplier=0.5 is not supported"),
    ("semantic", "n_stages: 1", "n_stages: 1\n        bias: true",
     r"SpatialRescaler bias=True is not supported"),
    ("semantic", "concat_mode: true", "conditioning_key: crossattn",
     r"cond_stage_model \(SpatialRescaler\) is not supported: conditioning_key 'crossattn'"),
    ("sr", "cond_stage_key: LR_image", "cond_stage_key: caption",
     r"an Identity condition read from 'caption' is not supported"),
])
def test_unsupported_concat_variants_are_named(compvis_files, tmp_path, name, old, new, message):
  """The autoencoder and the UNet still convert; the conditioning is named with the reason."""
  ckpt, yaml = compvis_files[name]
  model = load_compvis(ckpt, _edited(yaml, tmp_path, old, new))
  assert set(model.unsupported) == {"cond"} and model.config is None
  assert model.unet is not None and model.autoencoder is not None
  assert re.search(message, model.unsupported["cond"]), model.unsupported["cond"]


def _group_norm(x, scale, bias, groups=32, eps=1e-5):
  b, c, t = x.shape
  g = x.reshape(b, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  return g.reshape(b, c, t) * scale[:, None] + bias[:, None]


def _rerooted(entry):
  """A middle_block_1 entry re-rooted at the block itself."""
  return dataclasses.replace(entry, flax=entry.flax[1:],
                             torch=entry.torch[len("middle_block.1."):])


@pytest.mark.parametrize("new_order", [False, True])
def test_compvis_attention_block_matches_its_definition(new_order):
  """openaimodel's AttentionBlock (unconditional CompVis LDMs), computed here in numpy from its
  definition on torch-layout weights: conv1d qkv split per head as [q|k|v] (legacy) or as
  [q of all heads | k | v] (use_new_attention_order)."""
  from ldm_jax.interop import build, names
  from ldm_jax.models.unet import UNet
  from ldm_jax.interop.weights import state_to_params
  from ldm_jax.models.attention import AttentionBlock
  c, heads, d = 64, 4, 16
  rng = np.random.default_rng(0)
  state = {"norm.weight": 1 + 0.3 * rng.normal(size=c), "norm.bias": 0.1 * rng.normal(size=c),
           "qkv.weight": rng.normal(size=(3 * c, c, 1)) / 8, "qkv.bias": rng.normal(size=3 * c),
           "proj_out.weight": rng.normal(size=(c, c, 1)) / 8,
           "proj_out.bias": rng.normal(size=c)}
  state = {k: v.astype(np.float32) for k, v in state.items()}
  x = rng.normal(size=(2, 4, 4, c)).astype(np.float32)
  # Reference.
  xt = x.reshape(2, 16, c).transpose(0, 2, 1).astype(np.float64)
  qkv = np.einsum("oi,bit->bot", state["qkv.weight"][:, :, 0], _group_norm(
      xt, state["norm.weight"], state["norm.bias"])) + state["qkv.bias"][:, None]
  if new_order:
    q, k, v = (a.reshape(2 * heads, d, 16) for a in np.split(qkv, 3, axis=1))
  else:
    q, k, v = np.split(qkv.reshape(2 * heads, 3 * d, 16), 3, axis=1)
  logits = np.einsum("bct,bcs->bts", q, k) / np.sqrt(d)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bts,bcs->bct", w, v).reshape(2, c, 16)
  ref = xt + np.einsum("oi,bit->bot", state["proj_out.weight"][:, :, 0], a) + \
      state["proj_out.bias"][:, None]
  ref = ref.transpose(0, 2, 1).reshape(x.shape)
  # ldm_jax, through the CompVis name map of a UNet with it (its middle attention block).
  unet = UNet(model_channels=c, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
              num_heads=heads, use_spatial_transformer=False)
  entries = names.unet_entries(build.unet_shapes(unet, None), names.COMPVIS, levels=1,
                               num_res_blocks=1,
                               new_attention_heads=(lambda level: heads) if new_order else None)
  block = [_rerooted(e) for e in entries if e.flax[0] == "middle_block_1"]
  module = AttentionBlock(heads)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))
  params = state_to_params(state, block, abstract["params"], "attention block")
  assert rel_err(module.apply({"params": params}, x), ref) < TOL
