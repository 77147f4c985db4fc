# clip.py's text-only folders: Stable Diffusion's text_encoder/ (a CLIPTextModel; SD 2.x's is OpenCLIP's
# ViT-H text tower: gelu, 23 layers) loads with clip.load and gives the reference's hidden states, which
# are SD's cross-attention context. Small random models saved by transformers in the official layout.
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import clip
from plumbing.checkpoint import CheckpointError

TEXT = dict(hidden_size=24, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, vocab_size=99,
            max_position_embeddings=12, bos_token_id=97, eos_token_id=2, pad_token_id=1, hidden_act="gelu")


def scale_up(model, seed=0):  # random weights of std 0.2 (norm weights around 1), so a wrong formula shows
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(float(name.endswith("weight") and "norm" in name) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def rel(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("kind", ["CLIPTextModel", "CLIPTextModelWithProjection", "legacy CLIPTextModel"])
def test_text_only_folders(tmp_path, kind):
    cls = CLIPTextModelWithProjection if kind.endswith("Projection") else CLIPTextModel
    ref = scale_up(cls(CLIPTextConfig(**TEXT, projection_dim=8)))
    ref.save_pretrained(tmp_path)
    if kind.startswith("legacy"):  # transformers 4 wrote `text_model.`-prefixed keys and position_ids
        state = {("" if k.startswith("text_model.") else "text_model.") + k: v.contiguous()
                 for k, v in ref.state_dict().items()}
        state["text_model.embeddings.position_ids"] = torch.arange(12)[None]
        save_file(state, tmp_path / "model.safetensors")
    ours = clip.load(tmp_path)
    assert ours.config.vision is None and not hasattr(ours, "vision_model")
    # SD's prompt layout: BOS, words, EOS, then padding tokens that the text tower reads as tokens (no mask)
    ids = torch.tensor([[97, 5, 6, 7, 2, 1, 1, 1, 1, 1, 1, 1], [97, 50, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = ref(input_ids=ids)
        errs = {"hidden states": rel(ours.text_hidden_states(ids), out.last_hidden_state)}
        if cls is CLIPTextModelWithProjection:
            errs["encode_text"] = rel(ours.encode_text(ids), out.text_embeds)
        else:
            errs["pooled"] = rel(ours.text_model(ids), out.pooler_output)
    print(kind, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= 1e-5, errs


def test_text_only_config_round_trips_and_reads_like_transformers():
    d = CLIPTextConfig(**TEXT).to_dict() | {"architectures": ["CLIPTextModel"]}
    c = clip.CLIPConfig.from_hf(d)
    assert c.vision is None and c.projection_dim is None and c.text.act == "gelu" and c.text.n_layers == 3
    assert clip.CLIPConfig.from_hf(c.to_hf()) == c
    with torch.device("meta"):
        ours, ref = clip.build(c), CLIPTextModel(CLIPTextConfig(**TEXT))
    ref_keys = {k if k.startswith("text_model.") else "text_model." + k for k in ref.state_dict()}
    assert set(ours.state_dict()) == ref_keys - {"text_model.embeddings.position_ids"}


def test_wrong_size_text_encoder_is_one_line(tmp_path):
    ref = CLIPTextModel(CLIPTextConfig(**TEXT))
    ref.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"hidden_size": 24', '"hidden_size": 32'))
    with pytest.raises(CheckpointError) as e:
        clip.load(tmp_path)
    assert "\n" not in str(e.value) and "wrong shapes" in str(e.value)
