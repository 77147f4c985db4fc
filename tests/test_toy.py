"""The committed toy backbones (weights/toy/, made by `python -m weights.train_toy`): they load with the
project's own loaders, strictly, and still do, cheaply checked, what they were trained for."""
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import clip
import diffusion
import llama
import unet
from plumbing.checkpoint import read_config
from shapes import data, judge
from weights.train_toy import encode_text, to_clip, to_images, to_pixels, to_uint8

TOY = Path(__file__).resolve().parent.parent / "weights" / "toy"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(TOY / "tokenizer.json"))


@pytest.fixture(scope="module")
def text_encoder():
    return clip.load(TOY / "clip")


def single(seed, n):  # n scenes of one shape, not from the training streams' indices
    return [data.random_scene(random.Random(f"test/{seed}/{i}"), "all", n_shapes=1) for i in range(n)]


def test_tokenizer_round_trips_and_knows_its_special_tokens(tok):
    assert [tok.token_to_id(s) for s in ("<s>", "</s>", "<pad>", "<image>")] == [0, 1, 2, 3]
    text = "a small red circle on the left and a large blue square on the right"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert len(ids) == len(text.split())  # every word of the world is one token
    ids = tok.encode("<image> What colour is the square? blue", add_special_tokens=False).ids
    assert ids[0] == 3 and 3 not in ids[1:]
    assert tok.decode(tok.encode("Ünïcödé 猫 ok", add_special_tokens=False).ids) == "Ünïcödé 猫 ok"  # bytes: anything


def test_llm_loads_and_knows_the_world(tok):
    model = llama.load(TOY / "llm")
    assert model.cfg.vocab_size == tok.get_vocab_size()
    lines = data.text_corpus(seed=12345, n=24, split="all")  # a seed the training never used
    rows = [[0] + tok.encode(t, add_special_tokens=False).ids + [1] for t in lines]
    T = max(map(len, rows))
    ids = torch.tensor([r + [2] * (T - len(r)) for r in rows])
    with torch.no_grad():
        logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=2)
    assert loss < 0.3 * math.log(model.cfg.vocab_size), loss  # chance is log(vocab)


def test_clip_loads_and_reads_colour_and_shape(tok, text_encoder):
    combos = [(c, s) for c in data.COLORS for s in data.SHAPES]
    scenes = single(0, 24)
    with torch.no_grad():
        txt = F.normalize(text_encoder.encode_text(encode_text(tok, [f"a {c} {s}" for c, s in combos])), dim=-1)
        img = F.normalize(text_encoder.encode_image(to_clip(to_uint8([data.draw(s) for s in scenes]))), dim=-1)
    best = [combos[j] for j in (img @ txt.T).argmax(-1).tolist()]
    right = sum(b == (s.shapes[0].color, s.shapes[0].shape) for b, s in zip(best, scenes))
    assert right >= 20, f"{right}/24 images matched their caption"
    # the UNet's context: every token's state, (B, 32, width), the pooled one among them
    ids = encode_text(tok, ["a red circle"])
    states = text_encoder.text_hidden_states(ids)
    assert states.shape == (1, 32, text_encoder.config.text.width)
    eos = ids[0].tolist().index(tok.token_to_id("</s>"))
    torch.testing.assert_close(states[:, eos], text_encoder.text_model(ids))


def test_vae_reconstructs_what_analyse_sees():
    vae = unet.load_vae(TOY / "vae")
    assert 0.1 < vae.scaling_factor < 10 and (TOY / "vae" / "config.json").read_text().count("scaling_factor") == 1
    scenes = single(1, 8)
    x = to_pixels(to_uint8([data.draw(s) for s in scenes]))
    with torch.no_grad():
        rec = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
    assert rec.shape == x.shape
    psnr = -10 * torch.log10(((rec - x) ** 2).mean() / 4)
    assert psnr > 25, psnr
    assert [judge.analyse(im) for im in to_images(rec)] == [(s.shapes[0].color, s.shapes[0].shape) for s in scenes]


def test_unet_loads_and_denoises(tok, text_encoder):
    model, vae = unet.load_unet(TOY / "unet"), unet.load_vae(TOY / "vae")
    ddpm = diffusion.DDPM(read_config(TOY / "scheduler", "scheduler_config.json"))
    assert ddpm.prediction == "epsilon" and model.config.context_dim == text_encoder.config.text.width
    scenes = single(2, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = vae.encode(to_pixels(to_uint8([data.draw(s) for s in scenes])))[0] * vae.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.full((len(z0),), 400)
        context = text_encoder.text_hidden_states(encode_text(tok, [data.caption(s) for s in scenes]))
        eps = model(ddpm.add_noise(z0, noise, t), t, context)
    assert F.mse_loss(eps, noise) < 0.05  # predicting zero scores 1 (trained: ~0.008)


def test_toy_weights_are_small():
    size = sum(f.stat().st_size for f in TOY.rglob("*") if f.is_file())
    assert size < 30 * 2**20, f"weights/toy holds {size / 2**20:.1f} MB"


@pytest.mark.parametrize("name", list(llama.PRESETS))
def test_llama_config_to_hf_round_trips(name):
    cfg = llama.PRESETS[name]
    assert llama.LlamaConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("name", list(clip.PRESETS))
def test_clip_config_to_hf_round_trips(name):
    cfg = clip.PRESETS[name]
    assert clip.CLIPConfig.from_hf(cfg.to_hf()) == cfg


def test_toy_configs_round_trip():
    assert llama.load(TOY / "llm").cfg.to_hf().items() <= read_config(TOY / "llm").items()
    assert clip.CLIPConfig.from_hf(clip.load(TOY / "clip").config.to_hf()) == clip.load(TOY / "clip").config
