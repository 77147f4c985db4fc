"""unet.py (VAE, UNet, loaders) against diffusers, fp32 on CPU.

Small random diffusers models (weights re-drawn so that norms, biases and attention all matter) are
saved with save_pretrained and loaded by ours; original single-file checkpoints are synthesized by
renaming those weights into the CompVis LDM layout, and checked against diffusers' own conversion.
Parity figures are printed (run with -s): max|ours - diffusers| / max|diffusers|.
"""
import copy
import json
import math
import re
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers import AutoencoderKL, UNet2DConditionModel  # the reference, a test-only dependency
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

import unet
from plumbing.checkpoint import CheckpointError
from weights import convert

TOL = 1e-4

# Three levels, two layers per block. sd2: linear proj_in/out, heads per level; sd1: 1x1 convs, one head
# count; variants: the options SD leaves at their defaults (sin-first embedding, freq_shift, deeper
# transformers, upcast attention).
_LEVELS = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=16,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
UNET_KINDS = {
    "sd2": dict(_LEVELS, attention_head_dim=(2, 4, 4), cross_attention_dim=24, use_linear_projection=True),
    "sd1": dict(_LEVELS, attention_head_dim=4, cross_attention_dim=24),
    "variants": dict(_LEVELS, attention_head_dim=(4, 2, 2), cross_attention_dim=24, use_linear_projection=True,
                     flip_sin_to_cos=False, freq_shift=1, transformer_layers_per_block=2, upcast_attention=True),
}
VAE_CONFIG = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                  sample_size=32, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model, seed):
    """Weights ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.2^2); biases N(0, 0.2^2): nothing is left at 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_((name.endswith("weight")) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def unet_ref(tmp_path_factory):
    """kind -> (diffusers model, its save_pretrained folder), built once per kind."""
    made = {}

    def get(kind):
        if kind not in made:
            model = randomize(UNet2DConditionModel(**UNET_KINDS[kind]), seed=len(made))
            folder = tmp_path_factory.mktemp(f"unet_{kind}")
            model.save_pretrained(folder)
            made[kind] = model, folder
        return made[kind]
    return get


@pytest.fixture(scope="module")
def vae_ref(tmp_path_factory):
    model = randomize(AutoencoderKL(**VAE_CONFIG), seed=10)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


def same_state(ours, theirs):
    a, b = ours.state_dict(), dict(theirs)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------
# Parity

@pytest.mark.parametrize("kind", list(UNET_KINDS))
def test_unet_matches_diffusers(unet_ref, kind):
    ref, folder = unet_ref(kind)
    ours = unet.load_unet(folder)
    g = torch.Generator().manual_seed(0)
    cases = [  # (sample shape, timestep, context length)
        ((2, 4, 16, 16), torch.tensor([3, 951]), 7),      # a batch with different timesteps, text-like context
        ((2, 4, 16, 16), 500, 64),                        # an int timestep, 64 dream queries
        ((1, 4, 10, 14), torch.tensor(17), 7),           # 0-d timestep; sizes not divisible by 4
    ]
    for shape, t, S in cases:
        x, ctx = torch.randn(shape, generator=g), torch.randn(shape[0], S, 24, generator=g)
        with torch.no_grad():
            a, b = ours(x, t, ctx), ref(x, t, ctx).sample
        err = rel_err(a, b)
        print(f"PARITY unet-{kind} {list(shape)} t={t.tolist() if torch.is_tensor(t) else t} S={S}: {err:.2e}")
        assert a.shape == b.shape and err <= TOL


def test_unet_is_sensitive_to_what_it_should_be(unet_ref):
    # the parity test can fail: the wrong heads, a swapped timestep embedding or other timesteps show
    ref, folder = unet_ref("sd2")
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 24), torch.tensor([3, 951])
    with torch.no_grad():
        b = ref(x, t, ctx).sample
        good = unet.load_unet(folder)
        for wrong in (dict(n_heads=(4, 8, 8)), dict(flip_sin_to_cos=False)):
            model = unet.UNet(replace(good.config, **wrong)).eval()
            model.load_state_dict(good.state_dict())
            assert rel_err(model(x, t, ctx), b) > 1e-2, wrong
        assert rel_err(good(x, t.flip(0), ctx), b) > 1e-2


def test_vae_matches_diffusers(vae_ref):
    ref, folder = vae_ref
    ours = unet.load_vae(folder)
    assert ours.scaling_factor == 0.18215
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        posterior = ref.encode(x).latent_dist
        image, ref_image = ours.decode(z), ref.decode(z).sample
    for name, a, b in (("mean", mean, posterior.mean), ("logvar", logvar, posterior.logvar), ("decode", image, ref_image)):
        err = rel_err(a, b)
        print(f"PARITY vae-{name} {list(b.shape)}: {err:.2e}")
        assert a.shape == b.shape and err <= TOL
    # logvar is clamped to [-30, 20] as diffusers does
    ref = copy.deepcopy(ref)  # the fixture's model stays as saved
    for model in (ours, ref):
        with torch.no_grad():
            model.quant_conv.bias[4:] += 100
    with torch.no_grad():
        assert ours.encode(x)[1].max() == 20 == ref.encode(x).latent_dist.logvar.max()


def test_tiny_preset_runs_and_has_diffusers_keys():
    config = unet.PRESETS["tiny"]["unet"]
    assert unet.UNetConfig.from_diffusers(json.loads(json.dumps(config.to_diffusers()))) == config
    model = unet.build_unet(unet.PRESETS["tiny"])  # a preset entry works as well as its name
    with torch.device("meta"):
        ref = UNet2DConditionModel(**{k: v for k, v in config.to_diffusers().items() if k[0] != "_"})
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), torch.randn(2, 64, config.context_dim))
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    vae_config = unet.PRESETS["tiny"]["vae"]
    assert unet.VAEConfig.from_diffusers(json.loads(json.dumps(vae_config.to_diffusers()))) == vae_config
    with torch.device("meta"):
        ref = AutoencoderKL(**{k: v for k, v in vae_config.to_diffusers().items() if k[0] != "_"})
    vae = unet.build_vae("tiny")
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    mean, logvar = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert mean.shape == logvar.shape == (1, 4, 16, 16) and vae.decode(mean).shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------------------------
# Folder formats

def test_weight_formats(unet_ref, tmp_path):
    ref, folder = unet_ref("sd1")
    # fp16 variant, read into fp32
    half = copy.deepcopy(ref).half()
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    same_state(unet.load_unet(tmp_path / "fp16"), {k: v.float() for k, v in half.state_dict().items()})
    # pickled .bin (read with weights_only=True)
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    same_state(unet.load_unet(tmp_path / "bin"), ref.state_dict())
    # the folder of a whole pipeline, and a dtype on load; nothing is left on the meta device
    shutil.copytree(folder, tmp_path / "pipe" / "unet")
    model = unet.load_unet(tmp_path / "pipe", dtype=torch.bfloat16)
    same_state(model, {k: v.bfloat16() for k, v in ref.state_dict().items()})
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_vae_old_attention_names(vae_ref, tmp_path):
    ref, folder = vae_ref
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    renamed = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
               for k, v in state.items()}
    assert sum(bool(re.search(r"\.(query|key|value|proj_attn)\.", k)) for k in renamed) == 16  # 2 x 4 x (w, b)
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    same_state(unet.load_vae(tmp_path), ref.state_dict())


# ---------------------------------------------------------------------------------------------------
# Original single-file checkpoints. The renaming diffusers -> LDM below is the test's own (written
# in the other direction from unet.py's); diffusers' conversion of its output must give back the model.

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP_TO_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_unet_key(key, config):
    L = config["layers_per_block"]
    head, _, tail = key.rpartition(".")  # tail: weight / bias
    for ours, theirs in _UNET_TOP_TO_LDM.items():
        if head == ours:
            return f"{theirs}.{tail}"
    m = re.fullmatch(r"(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", head)
    where, b, kind, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    if kind == "resnets":
        rest = _RESNET_TO_LDM[rest]
    if where == "mid_block":
        return f"middle_block.{ {'resnets': 2 * j, 'attentions': 1}[kind] }.{rest}.{tail}"
    if where == "down_blocks":
        i = 1 + b * (L + 1) + (L if kind == "downsamplers" else j)
        return {"resnets": f"input_blocks.{i}.0.{rest}", "attentions": f"input_blocks.{i}.1.{rest}",
                "downsamplers": f"input_blocks.{i}.0.op"}[kind] + f".{tail}"
    i = b * (L + 1) + (L if kind == "upsamplers" else j)
    up_slot = 2 if config["up_block_types"][b].startswith("CrossAttn") else 1
    return {"resnets": f"output_blocks.{i}.0.{rest}", "attentions": f"output_blocks.{i}.1.{rest}",
            "upsamplers": f"output_blocks.{i}.{up_slot}.conv"}[kind] + f".{tail}"


def ldm_vae_item(key, value, n_levels):
    key = re.sub(r"down_blocks\.(\d+)\.resnets", r"down.\1.block", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets", lambda m: f"up.{n_levels - 1 - int(m[1])}.block", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{n_levels - 1 - int(m[1])}.upsample", key)
    for ours, theirs in (("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                         ("mid_block.attentions.0", "mid.attn_1"), ("conv_norm_out", "norm_out"),
                         ("conv_shortcut", "nin_shortcut"), ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
                         ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(ours, theirs)
    if ".attn_1." in key and value.ndim == 2:
        value = value[:, :, None, None]  # 1x1 convs in the original
    return key, value


def write_original_checkpoint(path, unet_model, vae_model):
    state = {f"model.diffusion_model.{ldm_unet_key(k, unet_model.config)}": v for k, v in unet_model.state_dict().items()}
    n = len(vae_model.config.block_out_channels)
    state.update(("first_stage_model." + k, v) for k, v in
                 (ldm_vae_item(k, v, n) for k, v in vae_model.state_dict().items()))
    # what the real files also hold: schedule buffers and the text encoder, to be ignored
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(10, 4)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return state


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_checkpoint(unet_ref, vae_ref, tmp_path, kind):
    ref_unet, _ = unet_ref(kind)
    ref_vae, _ = vae_ref
    path = tmp_path / "v-pruned-emaonly.safetensors"
    original = write_original_checkpoint(path, ref_unet, ref_vae)
    # the file has the original layout: diffusers' own single-file conversion gives the models back
    theirs_unet = convert_ldm_unet_checkpoint(dict(original), ref_unet.config)
    theirs_vae = convert_ldm_vae_checkpoint(dict(original), ref_vae.config)
    for converted, model in ((theirs_unet, ref_unet), (theirs_vae, ref_vae)):
        assert converted.keys() == model.state_dict().keys()
        assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
    # ours reads it into exactly diffusers' conversion
    ours_unet, ours_vae = convert.load_sd_checkpoint(path, dict(ref_unet.config), dict(ref_vae.config))
    same_state(ours_unet, theirs_unet)
    same_state(ours_vae, theirs_vae)


# ---------------------------------------------------------------------------------------------------
# Full-size presets: exactly the keys and shapes of diffusers' models, built on the meta device from
# the official config.json files (as the Hugging Face repos ship them).

_OFFICIAL_UNET_COMMON = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05,
    norm_num_groups=32, out_channels=4, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
_OFFICIAL_SD2_UNET = dict(_OFFICIAL_UNET_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                          dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
                          use_linear_projection=True)
_OFFICIAL_VAE = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
                     down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4, layers_per_block=2,
                     norm_num_groups=32, out_channels=3, up_block_types=["UpDecoderBlock2D"] * 4)
OFFICIAL = {
    "sd-1.5": (dict(_OFFICIAL_UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
               dict(_OFFICIAL_VAE, sample_size=512)),
    "sd-2.1-base": (dict(_OFFICIAL_SD2_UNET, sample_size=64), dict(_OFFICIAL_VAE, sample_size=768)),
    "sd-2.1": (dict(_OFFICIAL_SD2_UNET, sample_size=96, upcast_attention=True), dict(_OFFICIAL_VAE, sample_size=768)),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_presets_match_diffusers_full_size(name):
    unet_json, vae_json = OFFICIAL[name]
    assert unet.UNetConfig.from_diffusers(unet_json) == unet.PRESETS[name]["unet"]
    assert unet.VAEConfig.from_diffusers(vae_json) == unet.PRESETS[name]["vae"]
    with torch.device("meta"):
        pairs = [(unet.build_unet(name), UNet2DConditionModel.from_config(unet_json)),
                 (unet.build_vae(vae_json), AutoencoderKL.from_config(vae_json))]
    for ours, theirs in pairs:
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in pairs[0][0].parameters()) == (859_520_964 if name == "sd-1.5" else 865_910_724)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, naming the file and the problem

def error_of(fn, *args):
    with pytest.raises(CheckpointError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_folders(unet_ref, vae_ref, tmp_path):
    _, folder = unet_ref("sd1")
    assert "absent: no such folder" in error_of(unet.load_unet, tmp_path / "absent")

    (tmp_path / "noconfig").mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "noconfig")
    assert "noconfig/config.json: missing" in error_of(unet.load_unet, tmp_path / "noconfig")

    shutil.copytree(folder, tmp_path / "truncated")
    weights = tmp_path / "truncated" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = error_of(unet.load_unet, tmp_path / "truncated")
    assert str(weights) in message and "cannot be read" in message

    shutil.copytree(folder, tmp_path / "wrong")  # a config of another size beside these weights
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(dict(config, block_out_channels=[32, 64, 128])))
    message = error_of(unet.load_unet, tmp_path / "wrong")
    assert "wrong/diffusion_pytorch_model.safetensors: does not match" in message and "wrong shapes" in message

    (tmp_path / "wrong" / "config.json").write_text(json.dumps(dict(config, class_embed_type="timestep")))
    message = error_of(unet.load_unet, tmp_path / "wrong")
    assert "wrong/config.json" in message and "class_embed_type='timestep' is not supported" in message

    shutil.copytree(folder, tmp_path / "vae_weights")  # UNet weights where a VAE is expected
    (tmp_path / "vae_weights" / "config.json").write_text(json.dumps(VAE_CONFIG))
    assert "missing keys" in error_of(unet.load_vae, tmp_path / "vae_weights")
    _, vae_folder = vae_ref  # a VAE folder where a UNet is expected
    assert "config.json: _class_name is 'AutoencoderKL': the config of another model, not UNet2DConditionModel" in error_of(unet.load_unet, vae_folder)


def test_bad_single_files(unet_ref, vae_ref, tmp_path):
    (ref_unet, folder), (ref_vae, _) = unet_ref("sd2"), vae_ref
    assert "absent.safetensors: no such file" in error_of(
        convert.load_sd_checkpoint, tmp_path / "absent.safetensors", dict(ref_unet.config), dict(ref_vae.config))
    diffusers_file = folder / "diffusion_pytorch_model.safetensors"
    assert "not an original Stable Diffusion checkpoint" in error_of(
        convert.load_sd_checkpoint, diffusers_file, dict(ref_unet.config), dict(ref_vae.config))
    write_original_checkpoint(tmp_path / "sd2.safetensors", ref_unet, ref_vae)
    sd1_config = UNET_KINDS["sd1"]  # conv proj_in where the file has Linear
    message = error_of(convert.load_sd_checkpoint, tmp_path / "sd2.safetensors", sd1_config, dict(ref_vae.config))
    assert "sd2.safetensors (model.diffusion_model.*): does not match" in message and "proj_in.weight" in message


@pytest.mark.parametrize("change", [dict(class_embed_type="timestep"), dict(addition_embed_type="text_time"),
                                    dict(num_attention_heads=8), dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
                                    dict(down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
                                    dict(up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")),
                                    dict(layers_per_block=[1, 2, 2])])
def test_unsupported_unet_configs_are_rejected(change):
    key = next(iter(change))
    with pytest.raises(ValueError, match=key):
        unet.build_unet(dict(UNET_KINDS["sd1"], **change))
