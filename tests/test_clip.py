"""clip.py against Hugging Face transformers (a test-only dependency), CPU, fp32.

Small random CLIP models are built with transformers, their weights scaled up (std 0.2, so that a
wrong formula shows), saved in the official layouts and loaded with clip.load. Run with `-rP` to see
the measured differences, max|ours - ref| / max|ref|.
"""
import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

import clip
from plumbing.checkpoint import CheckpointError

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              image_size=30, patch_size=10)
TEXT = dict(hidden_size=24, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            vocab_size=99, max_position_embeddings=12, bos_token_id=97, pad_token_id=1)


def rel(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def scale_up(model, seed=0):  # random weights of std 0.2; norms' weights around 1
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = name.endswith("weight") and ("norm" in name or "layrnorm" in name)
            p.copy_(float(one) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def pooled(out):  # transformers 5 returns a model output whose pooler_output is the projection
    return getattr(out, "pooler_output", out)


def text_batch(eos, vocab=99, T=10, seed=0):
    # rows: full, right-padded, left-padded (the padding mask matters only there: with right padding
    # the causal mask already hides the pads from the EOS token), and eos twice (pool at the first)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 3, (4, T), generator=g)
    ids[ids == eos] = 5
    mask = torch.ones(4, T, dtype=torch.long)
    ids[0, -1] = eos
    ids[1, 6], ids[1, 7:], mask[1, 7:] = eos, TEXT["pad_token_id"], 0
    ids[2, -1], ids[2, :3], mask[2, :3] = eos, TEXT["pad_token_id"], 0
    ids[3, 3], ids[3, 5], ids[3, 6:], mask[3, 6:] = eos, eos, TEXT["pad_token_id"], 0
    return ids, mask


def save(model, folder, fmt):
    if fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif fmt == "bin":  # transformers 5 writes safetensors only: write the old pickle layout ourselves
        model.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)


@pytest.mark.parametrize("act,eos,fmt", [("quick_gelu", 2, "single"), ("gelu", 98, "sharded"),
                                         ("gelu", 2, "bin"), ("quick_gelu", 98, "single")])
def test_clip_model_equals_transformers(tmp_path, act, eos, fmt):
    cfg = CLIPConfig(text_config=dict(TEXT, hidden_act=act, eos_token_id=eos),
                     vision_config=dict(VISION, hidden_act=act), projection_dim=16)
    ref = scale_up(CLIPModel(cfg))
    save(ref, tmp_path, fmt)
    ours = clip.load(tmp_path)
    assert ours.config.text.eos_token_id == eos and ours.config.vision.act == act

    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    ids, mask = text_batch(eos)
    with torch.no_grad():
        hs = ref.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        errs = {f"layer {i}": rel(ours.image_features(x, layer=i), hs[i]) for i in (0, 1, -2, -1)}
        errs["encode_image"] = rel(ours.encode_image(x), pooled(ref.get_image_features(pixel_values=x)))
        ref_text = pooled(ref.get_text_features(input_ids=ids, attention_mask=mask))
        errs["encode_text"] = rel(ours.encode_text(ids, mask), ref_text)
        # the first row has no padding: without a mask it must give the same answer
        errs["encode_text, no mask"] = rel(ours.encode_text(ids[:1]), ref_text[:1])
        ref_logits = ref(input_ids=ids, pixel_values=x, attention_mask=mask).logits_per_image
        errs["logits"] = rel(ours(x, ids, mask), ref_logits)
    print(f"CLIPModel {act} eos={eos} {fmt}:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs


def test_image_features_runs_only_the_layers_it_needs():
    model = clip.build("clip-tiny-vision")
    ran = []
    for i, layer in enumerate(model.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    model.image_features(torch.randn(1, 3, 32, 32), layer=-2)
    assert ran == [0, 1, 2]
    with pytest.raises(IndexError):
        model.image_features(torch.randn(1, 3, 32, 32), layer=5)


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPVisionModelWithProjection", "legacy CLIPVisionModel"])
def test_vision_only_folders(tmp_path, kind):
    cfg = CLIPVisionConfig(**VISION, hidden_act="gelu", projection_dim=12)
    cls = CLIPVisionModel if kind.endswith("CLIPVisionModel") else CLIPVisionModelWithProjection
    ref = scale_up(cls(cfg))
    ref.save_pretrained(tmp_path)
    if kind.startswith("legacy"):  # transformers 4 wrote `vision_model.`-prefixed keys and position_ids
        state = {"vision_model." + k: v.contiguous() for k, v in ref.state_dict().items()}
        state["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
        save_file(state, tmp_path / "model.safetensors")
    ours = clip.load(tmp_path)
    assert ours.config.text is None

    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        errs = {f"layer {i}": rel(ours.image_features(x, layer=i), out.hidden_states[i]) for i in (0, -2, -1)}
        if cls is CLIPVisionModelWithProjection:
            errs["encode_image"] = rel(ours.encode_image(x), out.image_embeds)
        else:
            with pytest.raises(AttributeError):
                ours.encode_image(x)
    print(f"{kind}:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs


def test_old_checkpoint_with_position_ids_and_bf16(tmp_path):
    ref = scale_up(CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)))
    ref.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(12)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    save_file(state, tmp_path / "model.safetensors")
    ours = clip.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16} and not list(ours.buffers())
    x = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        assert rel(ours.encode_image(x).float(), pooled(ref.get_image_features(pixel_values=x))) < 0.1


def hf_official_config():
    # openai/clip-vit-large-patch14's config.json, abridged: old files carry `*_config_dict` too
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
            "logit_scale_init_value": 2.6592,
            "text_config": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_act": "quick_gelu",
                            "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                            "num_hidden_layers": 12, "layer_norm_eps": 1e-5, "max_position_embeddings": 77,
                            "vocab_size": 49408, "model_type": "clip_text_model"},
            "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                 "num_hidden_layers": 12, "projection_dim": 768},
            "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 224,
                              "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                              "patch_size": 14, "model_type": "clip_vision_model"},
            "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                   "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_preset_has_the_reference_keys_and_shapes():
    with torch.device("meta"):
        ref = CLIPModel(CLIPConfig.from_dict(hf_official_config()))
        ours = clip.build("clip-vit-large-patch14")
        from_dict = clip.build(hf_official_config())
        ref_vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**hf_official_config()["vision_config_dict"]))
        ours_vision = clip.build(dict(hf_official_config()["vision_config_dict"], model_type="clip_vision_model",
                                      architectures=["CLIPVisionModelWithProjection"]))
    assert shapes(ours) == shapes(ref) == shapes(from_dict)
    assert len(shapes(ref)) == 590 and shapes(ours)["vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    assert shapes(ours_vision) == shapes(ref_vision)
    assert all(p.is_meta for p in ours.parameters()) and not list(ours.buffers())


@pytest.mark.parametrize("variant", ["official", "no *_dict", "empty *_dict", "sparse", "vision-only"])
def test_config_reads_like_transformers(variant):
    d = hf_official_config()
    if variant == "no *_dict":
        del d["text_config_dict"], d["vision_config_dict"]
    elif variant == "empty *_dict":
        d["text_config_dict"] = {}
    elif variant == "sparse":  # every field missing takes transformers' default
        d = {"text_config": {"hidden_act": "gelu", "num_attention_heads": 4}, "vision_config": {"patch_size": 16}}
    elif variant == "vision-only":
        d = {"model_type": "clip_vision_model", "hidden_size": 48, "num_attention_heads": 4, "layer_norm_eps": 1e-6}
    ours = clip.CLIPConfig.from_hf(copy.deepcopy(d))
    if variant == "vision-only":
        towers, proj = [(ours.vision, CLIPVisionConfig.from_dict(d))], None
    else:
        ref = CLIPConfig.from_dict(copy.deepcopy(d))  # (transformers edits the dict it is given)
        towers, proj = [(ours.vision, ref.vision_config), (ours.text, ref.text_config)], ref.projection_dim
    assert ours.projection_dim == proj
    for t, r in towers:
        assert (t.width, t.n_layers, t.n_heads, t.mlp_width, t.act, t.eps) == (
            r.hidden_size, r.num_hidden_layers, r.num_attention_heads, r.intermediate_size, r.hidden_act,
            r.layer_norm_eps)
        if hasattr(r, "patch_size"):
            assert (t.image_size, t.patch_size, t.n_channels) == (r.image_size, r.patch_size, r.num_channels)
        else:
            assert (t.vocab_size, t.n_positions, t.eos_token_id) == (
                r.vocab_size, r.max_position_embeddings, r.eos_token_id)


def images():
    g = torch.Generator().manual_seed(3)

    def noise(w, h, c):  # smooth gradients plus noise: both the filter and the rounding show
        base = torch.linspace(0, 200, w)[None, :, None] + torch.linspace(0, 55, h)[:, None, None]
        return (base + 60 * torch.rand(h, w, c, generator=g)).clamp(0, 255).to(torch.uint8).squeeze(-1).numpy()
    yield "RGB 317x201", Image.fromarray(noise(317, 201, 3))
    yield "RGB 201x317", Image.fromarray(noise(201, 317, 3))
    yield "RGBA 255x301", Image.fromarray(noise(255, 301, 4), "RGBA")
    yield "L 300x199", Image.fromarray(noise(300, 199, 1), "L")
    yield "RGB 150x150 (upscaled)", Image.fromarray(noise(150, 150, 3))


@pytest.mark.parametrize("size", [224, 65])
def test_preprocess_equals_the_reference_processor(size):
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    proc = Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    errs = {}
    for name, im in images():
        ref = torch.as_tensor(proc(images=im, return_tensors="np")["pixel_values"][0])
        ours = clip.preprocess(im, size=size)
        assert ours.shape == ref.shape == (3, size, size) and ours.dtype == torch.float32
        errs[name] = (ours - ref).abs().max().item()
    print(f"preprocess size={size}: max abs diff", errs)
    assert max(errs.values()) < 1e-5, errs


def one_line(err, *words):
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_input(tmp_path):
    with pytest.raises(CheckpointError) as e:
        clip.load(tmp_path / "nowhere")
    one_line(e, "nowhere", "no such folder")

    ref = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    ref.save_pretrained(tmp_path / "ok")
    weights = (tmp_path / "ok" / "model.safetensors").read_bytes()

    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(weights)
    with pytest.raises(CheckpointError) as e:
        clip.load(tmp_path / "noconfig")
    one_line(e, "noconfig", "config.json", "missing")

    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError) as e:
        clip.load(tmp_path / "truncated")
    one_line(e, "truncated/model.safetensors", "truncated")

    (tmp_path / "wrong").mkdir()
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] = 48  # the config says 48 wide, the weights are 32
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "wrong" / "model.safetensors").write_bytes(weights)
    with pytest.raises(CheckpointError) as e:
        clip.load(tmp_path / "wrong")
    one_line(e, "wrong/model.safetensors", "wrong shapes", "vision_model.embeddings.class_embedding [32] != [48]")

    cfg["vision_config"]["hidden_size"], cfg["vision_config"]["hidden_act"] = 32, "swish"
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        clip.load(tmp_path / "wrong")
    one_line(e, "wrong/config.json", "swish")
