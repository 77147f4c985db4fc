"""CLIP (Radford et al. 2021, arXiv 2103.00020): a ViT image tower and a causal text tower, from scratch.

DreamLLM reads images through the vision tower of CLIP ViT-L/14: `image_features(x, layer=-2)`, the
penultimate layer's 1 + 256 tokens, of which the caller drops the CLS token. The text tower and the
projections are here so that the whole official checkpoint loads and `encode_text` / `encode_image`
can be checked against Hugging Face transformers, whose key names (`pre_layrnorm` included) we keep.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from plumbing.checkpoint import CheckpointError, assign, check_types, read_config, read_state_dict, weight_files


@dataclass
class TowerConfig:
    width: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_width: int = 3072
    act: str = "quick_gelu"
    eps: float = 1e-5
    image_size: int = 224     # vision tower only
    patch_size: int = 32      # vision tower only
    n_channels: int = 3       # vision tower only
    vocab_size: int = 49408   # text tower only
    n_positions: int = 77     # text tower only
    eos_token_id: int = 49407  # text tower only; 2 in old configs, which means "pool at argmax(input_ids)"

    def __post_init__(self):
        check_types(self)

    @classmethod
    def from_hf(cls, d, text):
        # Fields missing from a config.json take transformers' CLIP{Text,Vision}Config defaults.
        width, heads = d.get("hidden_size", 512 if text else 768), d.get("num_attention_heads", 8 if text else 12)
        return cls(width=width, n_heads=heads, n_layers=d.get("num_hidden_layers", 12),
                   mlp_width=d.get("intermediate_size", 2048 if text else 3072),
                   act=d.get("hidden_act", "quick_gelu"), eps=d.get("layer_norm_eps", 1e-5),
                   image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32),
                   n_channels=d.get("num_channels", 3), vocab_size=d.get("vocab_size", 49408),
                   n_positions=d.get("max_position_embeddings", 77), eos_token_id=d.get("eos_token_id", 49407))

    def to_hf(self, text):  # the CLIP{Text,Vision}Config dict, every field from_hf reads
        d = dict(hidden_size=self.width, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                 intermediate_size=self.mlp_width, hidden_act=self.act, layer_norm_eps=self.eps)
        if text:
            return dict(d, model_type="clip_text_model", vocab_size=self.vocab_size,
                        max_position_embeddings=self.n_positions, eos_token_id=self.eos_token_id)
        return dict(d, model_type="clip_vision_model", image_size=self.image_size, patch_size=self.patch_size,
                    num_channels=self.n_channels)


@dataclass
class CLIPConfig:
    vision: TowerConfig | None = field(default_factory=TowerConfig)  # None: a text tower alone (CLIPTextModel)
    text: TowerConfig | None = field(default_factory=lambda: TowerConfig(width=512, n_heads=8, mlp_width=2048))
    projection_dim: int | None = 512  # None: a bare tower (CLIPVisionModel, CLIPTextModel), no projection
    logit_scale_init: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature

    def __post_init__(self):
        check_types(self)

    @classmethod
    def from_hf(cls, d):
        if d.get("model_type") == "clip_vision_model":  # a vision-only folder: fields at top level
            proj = any("WithProjection" in a for a in d.get("architectures") or [])
            return cls(TowerConfig.from_hf(d, text=False), None, d.get("projection_dim", 512) if proj else None)
        if d.get("model_type") == "clip_text_model":  # a text-only folder (SD's text_encoder/): the same
            proj = any("WithProjection" in a for a in d.get("architectures") or [])
            return cls(None, TowerConfig.from_hf(d, text=True), d.get("projection_dim", 512) if proj else None)
        # Old configs (openai/clip-vit-large-patch14 among them) also carry `text_config_dict`, which
        # transformers fills with its defaults and lays over `text_config`: so it wins, even when empty.
        sub = {k: d[k + "_dict"] if d.get(k + "_dict") is not None else d.get(k) or {}
               for k in ("text_config", "vision_config")}
        return cls(TowerConfig.from_hf(sub["vision_config"], text=False),
                   TowerConfig.from_hf(sub["text_config"], text=True),
                   d.get("projection_dim", 512), d.get("logit_scale_init_value", 2.6592))

    def to_hf(self):  # the config.json to save beside our own weights (a CLIPModel, or a vision-only one)
        if self.vision is None:
            arch = "CLIPTextModel" if self.projection_dim is None else "CLIPTextModelWithProjection"
            return dict(self.text.to_hf(text=True), architectures=[arch],
                        **({} if self.projection_dim is None else {"projection_dim": self.projection_dim}))
        if self.text is None:
            arch = "CLIPVisionModel" if self.projection_dim is None else "CLIPVisionModelWithProjection"
            return dict(self.vision.to_hf(text=False), architectures=[arch],
                        **({} if self.projection_dim is None else {"projection_dim": self.projection_dim}))
        return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=self.projection_dim,
                    logit_scale_init_value=self.logit_scale_init, text_config=self.text.to_hf(text=True),
                    vision_config=self.vision.to_hf(text=False))


PRESETS = {
    # openai/clip-vit-large-patch14, DreamLLM's image reader: 224px / 14 = 16 x 16 = 256 patches
    "clip-vit-large-patch14": CLIPConfig(
        vision=TowerConfig(width=1024, n_layers=24, n_heads=16, mlp_width=4096, patch_size=14, image_size=224),
        text=TowerConfig(width=768, n_layers=12, n_heads=12, mlp_width=3072, eos_token_id=2),
        projection_dim=768),
    # small ones for tests and class use (CPU in seconds): 32px / 8 = 16 patches, a 1000-token vocabulary
    "clip-tiny": CLIPConfig(
        vision=TowerConfig(width=64, n_layers=4, n_heads=4, mlp_width=256, patch_size=8, image_size=32),
        text=TowerConfig(width=64, n_layers=4, n_heads=4, mlp_width=256, vocab_size=1000, n_positions=32,
                         eos_token_id=999),
        projection_dim=64),
    "clip-tiny-vision": CLIPConfig(
        vision=TowerConfig(width=64, n_layers=4, n_heads=4, mlp_width=256, patch_size=8, image_size=32),
        text=None, projection_dim=64),
}

activations = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # what OpenAI trained CLIP with
    "gelu": F.gelu,                                        # exact (erf) GELU, as in OpenCLIP's LAION models
}


class LayerNorm(nn.LayerNorm):
    def forward(self, x):  # computed in fp32 whatever the weights' dtype, then cast back
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: TowerConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.width, c.width) for _ in range(4))

    def forward(self, x, mask=None, causal=False):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, n_heads, T, head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: TowerConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.width, c.mlp_width), nn.Linear(c.mlp_width, c.width)
        self.act = activations[c.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):  # pre-norm transformer block, the same in both towers
    def __init__(self, c: TowerConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.layer_norm1, self.layer_norm2 = LayerNorm(c.width, eps=c.eps), LayerNorm(c.width, eps=c.eps)

    def forward(self, x, mask=None, causal=False):
        x = x + self.self_attn(self.layer_norm1(x), mask, causal)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, c: TowerConfig):
        super().__init__()
        n_patches = (c.image_size // c.patch_size) ** 2
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.randn(c.width) * c.width ** -0.5)
        self.embeddings.patch_embedding = nn.Conv2d(c.n_channels, c.width, c.patch_size, c.patch_size, bias=False)
        self.embeddings.position_embedding = nn.Embedding(1 + n_patches, c.width)
        self.pre_layrnorm = LayerNorm(c.width, eps=c.eps)  # sic: the upstream key name
        # a ModuleDict only so that the keys read `encoder.layers.N...`, as upstream
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(c) for _ in range(c.n_layers))})
        self.post_layernorm = LayerNorm(c.width, eps=c.eps)

    def forward(self, pixel_values, n_layers):  # the hidden states after the first n_layers layers
        e = self.embeddings
        x = e.patch_embedding(pixel_values.to(e.patch_embedding.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                                       # (B, N, D), row-major patches
        x = torch.cat([e.class_embedding.expand(len(x), 1, -1), x], dim=1)     # (B, 1 + N, D): CLS first
        x = self.pre_layrnorm(x + e.position_embedding.weight)  # learned absolute positions
        for layer in self.encoder.layers[:n_layers]:
            x = layer(x)
        return x


class TextTransformer(nn.Module):
    def __init__(self, c: TowerConfig):
        super().__init__()
        self.eos_token_id = c.eos_token_id
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.embeddings.position_embedding = nn.Embedding(c.n_positions, c.width)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(c) for _ in range(c.n_layers))})
        self.final_layer_norm = LayerNorm(c.width, eps=c.eps)

    def hidden_states(self, input_ids, attention_mask=None):  # (B, T) -> every token's state (B, T, D)
        B, T = input_ids.shape
        e = self.embeddings
        x = e.token_embedding(input_ids) + e.position_embedding.weight[:T]
        mask = None  # causal only, SDPA's fast path; with padding: causal AND key-not-padding
        if attention_mask is not None:
            keep = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() & attention_mask.bool()[:, None, None, :]
            # the most negative float, not -inf: a row with no visible key (left pads) must not give NaN
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder.layers:
            x = layer(x, mask, causal=mask is None)
        return self.final_layer_norm(x)  # per token, so pooling before or after it is the same

    def forward(self, input_ids, attention_mask=None):  # (B, T) -> the pooled EOS state (B, D)
        x = self.hidden_states(input_ids, attention_mask)
        # Pool at the end-of-text token. Old configs say eos_token_id = 2 (a placeholder); they meant
        # the EOT token, which has the largest id in CLIP's vocabulary: hence argmax(input_ids).
        pos = input_ids.argmax(-1) if self.eos_token_id == 2 else (input_ids == self.eos_token_id).int().argmax(-1)
        return x[torch.arange(len(x), device=x.device), pos]


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        if c.vision is not None:
            self.vision_model = VisionTransformer(c.vision)
            if c.projection_dim is not None:
                self.visual_projection = nn.Linear(c.vision.width, c.projection_dim, bias=False)
        if c.text is not None:
            self.text_model = TextTransformer(c.text)
            if c.projection_dim is not None:
                self.text_projection = nn.Linear(c.text.width, c.projection_dim, bias=False)
            if c.vision is not None:  # the temperature of image-text similarity: both towers only
                self.logit_scale = nn.Parameter(torch.tensor(c.logit_scale_init))
        for m in self.modules():  # CLIP-like init: small normal weights, zero biases
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def image_features(self, pixel_values, layer=-2):
        # HF `hidden_states` numbering: 0 = embeddings after pre_layrnorm, L = last layer (not
        # post_layernorm'd); negative counts from the end. Only the layers needed are run.
        L = self.config.vision.n_layers
        if not -(L + 1) <= layer <= L:
            raise IndexError(f"layer {layer} out of range for a {L}-layer vision tower")
        return self.vision_model(pixel_values, layer % (L + 1))  # (B, 1 + N, D)

    def encode_image(self, pixel_values):  # (B, 3, H, W) -> (B, projection_dim)
        if not hasattr(self, "visual_projection"):
            raise AttributeError("this CLIP has no visual_projection (a bare CLIPVisionModel checkpoint)")
        x = self.vision_model(pixel_values, self.config.vision.n_layers)
        return self.visual_projection(self.vision_model.post_layernorm(x[:, 0]))  # the CLS token

    def encode_text(self, input_ids, attention_mask=None):  # (B, T) -> (B, projection_dim)
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def text_hidden_states(self, input_ids, attention_mask=None):  # (B, T) -> (B, T, D)
        # every token's state after final_layer_norm: the context Stable Diffusion cross-attends to
        return self.text_model.hidden_states(input_ids, attention_mask)

    def forward(self, pixel_values, input_ids, attention_mask=None):  # zero-shot logits (B_img, B_txt)
        img = F.normalize(self.encode_image(pixel_values), dim=-1)
        txt = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        return self.logit_scale.exp() * img @ txt.T  # cosine similarity / temperature


def build(config) -> CLIP:  # a HF config dict, a preset name or a CLIPConfig; random init
    if isinstance(config, str):
        config = PRESETS[config]
    return CLIP(config if isinstance(config, CLIPConfig) else CLIPConfig.from_hf(config))


def load(path, device="cpu", dtype=torch.float32) -> CLIP:
    try:
        config = CLIPConfig.from_hf(read_config(path))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None
    if bad := {t.act for t in (config.vision, config.text) if t} - activations.keys():
        raise CheckpointError(f"{path}/config.json: hidden_act {bad.pop()!r} is not one of {', '.join(activations)}")
    files = weight_files(path, ["model.safetensors", "pytorch_model.bin"])
    state = read_state_dict(files, dtype=dtype, device=device)
    if config.text is None:  # transformers 5 saves a CLIPVisionModel without the `vision_model.` prefix
        state = {k if k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k: v
                 for k, v in state.items()}
    if config.vision is None:  # ... and a CLIPTextModel without `text_model.`
        state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
                 for k, v in state.items()}
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        model = CLIP(config)
    # old checkpoints carry the non-persistent `position_ids` buffers; we index with arange instead
    source = files[0] if len(files) == 1 else f"{path} (shards)"
    return assign(model, state, source, ignore=[r"position_ids$"]).eval()


MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # of CLIP's training set


def preprocess(image: Image.Image, size=224) -> torch.Tensor:  # -> (3, size, size), as CLIPImageProcessor
    if "A" in image.getbands() or "transparency" in image.info:  # transparency is composited onto white
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    # bicubic resize (PIL, on uint8) of the shortest side to `size`; the long side is truncated, not rounded
    w, h = image.size
    w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2  # center crop, the odd pixel falls on the right / bottom
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    x = x.float() / 255  # bit-equal to the reference's float64 rescale for all 256 values
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
