"""Trains the toy backbones of the shapes world, the small stand-ins for DreamLLM's pretrained parts.

    python -m weights.train_toy                      # all six parts into weights/toy/ (80 min on a
                                                     # 2-core CPU; docs/toy-recipe.md)
    python -m weights.train_toy --only clip read unet  # some parts; the others are read from --out
    python -m weights.train_toy --card               # train nothing: the report card of --out

The same structure as the real world, small: a BPE tokenizer; a LLaMA pretrained on shapes-world
text (Vicuna's stand-in); a CLIP trained contrastively on (caption, image) pairs (ViT-L/14's), each
batch holding every scene's twin with two colours, shapes or places swapped (NegCLIP's hard
negatives: without them a CLIP is a bag of words and nothing conditioned on it binds), then trained on
so that the layer a DreamLLM reads holds each patch's colour, shape and place (the read part); an SD
VAE (4x, not 8x: 64x64x3 -> 16x16x4); and an SD-2.x-style UNet trained with the epsilon loss on
those latents, conditioned on the toy CLIP text tower's token states exactly as SD is on its 77
tokens. The backbones see the whole world (split="all"), as SD has seen everything; only the
DreamLLM trained on top of them holds out data.HELD_OUT. Every part is saved in the official layout
(HF / diffusers folders, tokenizer.json) that llama.load, clip.load, unet.load_* already read.
Each part is a pure function of --seed; a part that needs another (the UNet needs the CLIP and the
VAE) reads it from --out. After the LLM, the CLIP (with its read part) and the SD, the report card
(weights/card.py): what each says back, binds and draws, on fresh scenes of a seed no part trains on, into
--out/card.json.
"""
import argparse
import json
import math
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

import clip
import diffusion
import dreamllm
import llama
import unet
from plumbing import alignment, cli
from plumbing.cli import autocast, pick_device
from shapes import data, judge
from weights import card

PARTS = ("tokenizer", "llm", "clip", "read", "vae", "unet")
SPECIALS = ["<s>", "</s>", "<pad>", data.IMAGE_TOKEN]  # ids 0-3
VOCAB = 512  # asked of the BPE; it stops sooner (~450) once every word of the world is one token
TEXT_LEN = 32  # the CLIP text tower's positions; captions are padded to it (SD 1.x: 77)

# The models. Sizes were picked by measuring steps on a shared 2-core CPU; the CLIP's vision tower
# has 6 layers, not 4, so that the layer a DreamLLM reads (the penultimate) is not the one next to
# the contrastive loss (docs/log.md, 2026-12-04: held-out colour / shape probes 0.38 / 0.76 at 4
# layers against 0.78 / 0.90 at 6, on the GPU). Its patches are 16 px (16 tokens a picture): at 8 px
# (64 tokens) its card was the same (swaps 1.00 / 0.99 / 0.99) and its 4000 steps took 64 min on
# this CPU against 21 (docs/log.md, 2026-12-07, twenty-second session).
LLM = llama.LlamaConfig(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=512,
                        norm_eps=1e-5, max_seq_len=256)
CLIP = clip.CLIPConfig(
    vision=clip.TowerConfig(width=128, n_layers=6, n_heads=4, mlp_width=512, image_size=64, patch_size=16),
    text=clip.TowerConfig(width=128, n_layers=4, n_heads=4, mlp_width=512, vocab_size=VOCAB,
                          n_positions=TEXT_LEN, eos_token_id=SPECIALS.index("</s>")),
    projection_dim=128)
VAE = unet.VAEConfig(channels=(16, 32, 64), layers_per_block=1, norm_groups=8, sample_size=64)
# SD 2.x's kind (linear proj_in/out), 3 levels on 16x16 latents; cross-attention only at 8x8 and 4x4
# (at 16x16 it doubles the cost for little: colour and shape are decided at the coarse levels)
UNET = unet.UNetConfig(channels=(32, 64, 128), cross_attn=(False, True, True), layers_per_block=1,
                       n_heads=(1, 2, 4), context_dim=CLIP.text.width, linear_proj=True, norm_groups=8,
                       sample_size=16)
SCHEDULER = dict(unet.PRESETS["sd-2.1-base"]["scheduler"])  # scaled_linear 0.00085..0.012, eps, offset 1

# How each part trains: steps, batch, peak learning rate (AdamW, linear warmup, cosine to a tenth).
RECIPES = dict(
    llm=dict(steps=300, batch=64, lr=2e-3, warmup=30),
    clip=dict(steps=4000, batch=128, lr=1e-3, warmup=40),
    # 600 steps, not 300: VALIDATION's shape probe 0.95 against 0.72 (docs/log.md, 2026-12-06)
    read=dict(steps=600, batch=128, lr=3e-4, warmup=40, code_weight=4.0),
    vae=dict(steps=500, batch=16, lr=1e-3, warmup=25, kl_weight=1e-5),
    # batch 48: two shapes bound and placed 0.85 on the card against 0.80 at 32, for 48 min instead
    # of 35.5 on this CPU (docs/log.md, 2026-12-07 and 2026-12-08)
    unet=dict(steps=7000, batch=48, lr=5e-4, warmup=100, cond_dropout=0.1, ema=0.995),
)
POOL = dict(size=16000, two=0.5)  # the scenes CLIP, VAE and UNet train on; `two` hold two shapes
# guidance 2 measured best for this UNet (colour 93% vs 80% at 4: strong guidance hollows out the blue
# shapes); 50 DDIM steps give the same figures as 30
EVAL = dict(cfg=2.0, ddim_steps=30)
READ_LAYER = dreamllm.DreamConfig.clip_layer  # the CLIP layer a DreamLLM reads, which the card probes


# ------------------------------------------------------------------------------------------- helpers

def fit(desc, params, recipe, loss_fn, scale=1.0):
    """AdamW with linear warmup then cosine decay to a tenth; loss_fn(step) -> scalar loss.
    Returns the loss, smoothed over the last ~50 steps."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms, biases, scalars
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05),
                             dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)],
                            lr=recipe["lr"], betas=(0.9, 0.98))
    steps = max(1, round(recipe["steps"] * scale))
    warmup = max(1, round(recipe["warmup"] * scale))
    lr_at = lambda i: recipe["lr"] * (min(1.0, (i + 1) / warmup) *
                                      (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, i / steps)))))
    smooth = None
    with tqdm(range(steps), desc=desc, unit="step", disable=None) as bar:
        for i in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(i)
            loss = loss_fn(i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            bar.set_postfix(loss=f"{smooth:.4f}")
    return smooth


def save_weights(model, path, dtype=torch.float32):
    # contiguous tensors, each stored once (safetensors refuses shared storage), as save_pretrained writes
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # a tied weight (none in our models' configs, but cheap to honour)
            continue
        seen.add(v.data_ptr())
        state[k] = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})


def write_json(d, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=2) + "\n")


def to_pixels(images):  # uint8 (B, 3, H, W) -> float in [-1, 1], what the VAE reads
    return images.float() / 127.5 - 1


def to_clip(images):  # uint8 (B, 3, 64, 64) -> CLIP's normalisation (= clip.preprocess at size 64)
    mean, std = torch.tensor(clip.MEAN).view(3, 1, 1), torch.tensor(clip.STD).view(3, 1, 1)
    return (images.float() / 255 - mean.to(images.device)) / std.to(images.device)


def to_uint8(images):  # PIL images -> uint8 (B, 3, H, W)
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


class Pool:
    """A fixed pool of scenes, drawn once, shared by CLIP, VAE and UNet; `two` of them hold two shapes
    (the streams DreamLLM trains on hold a third), because binding two is what the backbones must
    learn. A scene's caption is redrawn (full / no size / no position / short) every time it is used."""
    def __init__(self, seed, n, two):
        rngs = [random.Random(f"{seed}/pool/{i}") for i in range(n)]
        self.seed = seed
        self.scenes = [data.random_scene(r, "all", 2 if r.random() < two else 1) for r in rngs]
        self.images = to_uint8([data.draw(s) for s in tqdm(self.scenes, desc="draw pool", unit="img")])

    def captions(self, idx, step):
        return [data.caption(self.scenes[i], random.Random(f"{self.seed}/{step}/{i}")) for i in idx]


def encode_text(tok, texts, length=TEXT_LEN, device="cpu"):  # (B,) -> (B, length): alignment.py's
    return alignment.text_ids(tok, texts, length).to(device)


def single_shape_scenes(seed, n):  # held-apart fresh scenes of one shape, for evaluation
    return [data.random_scene(random.Random(f"{seed}/eval/{i}"), "all", n_shapes=1) for i in range(n)]


def twin(scene, rng):
    # -> (a hard negative for CLIP's contrastive loss, the field it changes): the scene with one
    # thing changed that a caption in the same words tells apart. Two shapes: their colours, shapes
    # or places exchanged (data.swapped, NegCLIP's swaps); one shape: its colour, shape or place.
    if len(scene.shapes) == 2:
        what = rng.choice([w for w in data.FIELDS if data.swapped(scene, w) is not None])
        return data.swapped(scene, what), data.FIELDS[what]
    s, field = scene.shapes[0], rng.choice(list(data.VALUES))
    other = rng.choice([v for v in data.VALUES[field] if v != getattr(s, field)])
    return data.Scene((replace(s, **{field: other}),)), field


def twin_captions(scene, other, field, rng):
    # the two scenes' captions in one form, drawn as data.caption draws it; a form that leaves out
    # what differs (the place, in "no position" or "short") is redrawn from those that name it
    form = rng.choice(data.FORMS)
    if field == "position" and form in ("no position", "short"):
        form = rng.choice(("full", "no size"))
    return data.caption(scene, form=form), data.caption(other, form=form)


def twin_batch(pool, tok, batch, g, rng, device):
    # -> (uint8 images (B, 3, 64, 64), caption ids (B, <= TEXT_LEN), their scenes): B/2 scenes of the
    # pool and their twins (twin()), drawn now, so that every scene's hardest negative, image and
    # caption, is in its own batch (NegCLIP's hard negatives, on both sides)
    idx = torch.randint(len(pool.scenes), (batch // 2,), generator=g).tolist()
    twins = [twin(pool.scenes[j], rng) for j in idx]
    texts = [twin_captions(pool.scenes[j], t, field, rng) for j, (t, field) in zip(idx, twins)]
    images = torch.cat([pool.images[idx], to_uint8([data.draw(t) for t, _ in twins])])
    ids = encode_text(tok, [a for a, _ in texts] + [b for _, b in texts], device=device)
    # the columns that are padding in every row are dropped: the causal text tower's pooled (</s>)
    # state never sees them, so the loss is the same, in about half the text tower's time
    ids = ids[:, :int((ids != tok.token_to_id("<pad>")).sum(1).max())]
    return images, ids, [pool.scenes[j] for j in idx] + [t for t, _ in twins]


def contrastive(model, images, ids):
    # CLIP's symmetric InfoNCE over the batch; two rows may share a caption ("a red circle"), a
    # small, harmless noise
    with autocast(ids.device):
        logits = model(to_clip(images.to(ids.device)), ids).float()  # (B, B), matches on the diagonal
    target = torch.arange(len(images), device=ids.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def patch_codes(scene, patch=CLIP.vision.patch_size):
    # -> (N, 14): what the read part asks each patch of the read layer to hold, the one-hot colour
    # (6), shape (3) and place (5) of the shape whose centre is nearest to the patch's centre. Every
    # patch, background included, carries a code, at full strength whatever the shape covers of it:
    # as many copies of each code as the layer can hold (docs/log.md, 2026-12-06, eleventh session).
    # The place too, so that a reader can pick one of two shapes by its place or read where one is
    # (docs/log.md, 2026-12-07, twentieth session).
    codes = torch.stack([torch.cat([F.one_hot(torch.tensor(data.VALUES[field].index(getattr(s, field))),
                                              len(data.VALUES[field])) for field in data.FIELDS.values()])
                         for s in scene.shapes]).float()  # (shapes, 14)
    return codes[data.nearest_shapes(scene, data.IMAGE_SIZE // patch)]


# ------------------------------------------------------------------------------------------- the parts

def train_tokenizer(args, out):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # bytes: any text encodes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # <image> is a special token: it never takes part in merges, so it is cut out of the training text
    # Its corpus has no back references (data.document_example): they came later, and the ids this corpus
    # gives are the ones the toy CLIP and UNet were trained with. Their words are all in it.
    corpus = data.text_corpus(args.seed, 20000, "all", back=False)
    lines = [re.sub(" +", " ", line.replace(data.IMAGE_TOKEN, "")) for line in corpus]
    tok.train_from_iterator(lines, trainer)
    tok.save(str(out / "tokenizer.json"))
    lengths = [len(tok.encode(t).ids) for t in lines[:3000]]
    return f"vocab {tok.get_vocab_size()}, {np.mean(lengths):.1f} tokens per line (max {max(lengths)})"


def train_llm(args, out, device):
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos, eos, pad = (tok.token_to_id(s) for s in SPECIALS[:3])
    r = RECIPES["llm"]
    torch.manual_seed(args.seed)
    cfg = replace(LLM, vocab_size=tok.get_vocab_size())  # no unused rows
    model = llama.build(cfg).to(device).train()

    def batch(lines):  # <s> line </s>, right-padded; the loss skips padding
        rows = [[bos] + e.ids + [eos] for e in tok.encode_batch(lines, add_special_tokens=False)]
        T = max(map(len, rows))
        ids = torch.tensor([x + [pad] * (T - len(x)) for x in rows], device=device)
        labels = ids.masked_fill(ids == pad, -100)
        return ids, labels

    def loss_of(ids, labels):
        with autocast(device):
            logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    n = max(1, round(r["steps"] * args.scale)) * r["batch"]
    corpus = data.text_corpus(args.seed, n, "all")
    order = random.Random(args.seed).sample(range(n), n)  # captions, documents and Q&A mixed in every batch
    loss = fit("llm", model.parameters(), r,
               lambda i: loss_of(*batch([corpus[j] for j in order[i * r["batch"]:(i + 1) * r["batch"]]])), args.scale)
    model.eval()
    with torch.no_grad():  # lines the model never saw (another seed)
        val = loss_of(*batch(data.text_corpus(args.seed + 1, 300, "all"))).item()
        prompt = torch.tensor([[bos] + tok.encode("Here is a", add_special_tokens=False).ids], device=device)
        said = tok.decode(model.generate(prompt, max_new_tokens=24, eos_id=eos)[0].tolist())
    save_weights(model, out / "llm" / "model.safetensors")
    write_json(dict(cfg.to_hf(), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, torch_dtype="float32"),
               out / "llm" / "config.json")
    return (f"{count(model)} params, train loss {loss:.3f}, held-out loss {val:.3f} "
            f"(log vocab = {math.log(cfg.vocab_size):.2f}); greedy 'Here is a' -> {said!r}")


def count(model):
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def clip_measures(model, tok, device, batch=256):
    # the four functions card.clip_rows reads: images -> embeddings, texts -> embeddings,
    # images -> patch features (n, N, width), CLS left out, of the read layer and of layer 0 (the
    # patch embeddings)
    @torch.no_grad()
    def run(fn, xs):
        with autocast(device):
            return torch.cat([fn(x.to(device)).float().cpu() for x in xs.split(batch)])

    def patches(layer):
        return lambda images: run(lambda p: model.image_features(p, layer)[:, 1:], to_clip(to_uint8(images)))

    return (lambda images: run(model.encode_image, to_clip(to_uint8(images))),
            lambda texts: run(model.encode_text, encode_text(tok, texts)), patches(READ_LAYER), patches(0))


def train_clip(args, out, device, pool):
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    r = RECIPES["clip"]
    torch.manual_seed(args.seed)
    cfg = replace(CLIP, text=replace(CLIP.text, vocab_size=tok.get_vocab_size()))
    model = clip.build(cfg).to(device).train()
    g = torch.Generator().manual_seed(args.seed)

    def loss_fn(i):
        images, ids, _ = twin_batch(pool, tok, r["batch"], g, random.Random(f"{args.seed}/clip/{i}"), device)
        return contrastive(model, images, ids)

    def clamp(i):  # CLIP caps the learned temperature at 100
        loss = loss_fn(i)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    loss = fit("clip", model.parameters(), r, clamp, args.scale)
    model.eval()
    save_weights(model, out / "clip" / "model.safetensors")
    write_json(dict(cfg.to_hf(), torch_dtype="float32"), out / "clip" / "config.json")
    return f"{count(model)} params, loss {loss:.3f}, logit scale {model.logit_scale.exp().item():.1f}"


def train_read(args, out, device, pool):
    # The CLIP trained on, so that the layer a DreamLLM reads holds each patch's colour, shape and place
    # where a linear reader can carry them to pairs it never saw (the card's probe rows): a linear head on
    # every patch of the read layer regresses patch_codes() by squared error, beside the twin InfoNCE
    # that keeps the towers aligned. A squared error keeps pulling every patch to its code; a
    # cross-entropy stops once a patch is classified (docs/log.md, 2026-12-06). The text tower is
    # frozen: its token states are the toy UNet's condition, which must stay valid. The head is dropped.
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    r = RECIPES["read"]
    torch.manual_seed(args.seed)
    model = clip.load(out / "clip", device=device).train()
    for frozen in (model.text_model, model.text_projection):
        frozen.requires_grad_(False)
    head = torch.nn.Linear(model.config.vision.width, sum(map(len, data.VALUES.values()))).to(device)
    read = {}  # the read layer's output, caught on the way through encode_image: (B, 1 + N, width)
    n_layers = READ_LAYER % (model.config.vision.n_layers + 1)  # HF numbering: 0 is the embeddings
    model.vision_model.encoder.layers[n_layers - 1].register_forward_hook(lambda m, i, o: read.update(x=o))
    g = torch.Generator().manual_seed(args.seed)

    def loss_fn(i):
        images, ids, scenes = twin_batch(pool, tok, r["batch"], g, random.Random(f"{args.seed}/read/{i}"), device)
        loss = contrastive(model, images, ids)
        codes = torch.stack([patch_codes(s) for s in scenes]).to(device)  # (B, N, 14)
        code_loss = ((head(read["x"][:, 1:].float()) - codes) ** 2).sum(-1).mean()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss + r["code_weight"] * code_loss

    loss = fit("read", [*model.parameters(), *head.parameters()], r, loss_fn, args.scale)
    model.eval()
    save_weights(model, out / "clip" / "model.safetensors")
    return f"loss {loss:.3f} (twin InfoNCE + {r['code_weight']} x the patch codes' squared error)"


def psnr(x, y):  # images in [-1, 1]
    mse = ((x.clamp(-1, 1) - y) ** 2).flatten(1).mean(1) / 4  # in [0, 1] units
    return (10 * torch.log10(1 / mse)).mean().item()


def train_vae(args, out, device, pool):
    r = RECIPES["vae"]
    torch.manual_seed(args.seed)
    model = unet.build_vae(replace(VAE)).to(device).train()  # a copy: scaling_factor is set below
    g = torch.Generator().manual_seed(args.seed)

    def loss_fn(i):
        x = to_pixels(pool.images[torch.randint(len(pool.scenes), (r["batch"],), generator=g)].to(device))
        with autocast(device):
            mean, logvar = model.encode(x)
            z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # a draw from the posterior
            rec = model.decode(z).float()
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()  # to N(0, I), per latent element
        # L1 keeps the flat colours crisp, MSE the edges; the small KL keeps the latents near a Gaussian
        return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + r["kl_weight"] * kl

    loss = fit("vae", model.parameters(), r, loss_fn, args.scale)
    model.eval()
    with torch.no_grad():  # scaling_factor = 1 / std of the latents, measured as SD did
        x = to_pixels(pool.images[:1024].to(device))
        mean, logvar = torch.cat([torch.cat(model.encode(b), 1) for b in x.split(128)]).chunk(2, 1)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g).to(device)
        model.config.scaling_factor = model.scaling_factor = float(1 / z.std())
        scenes = single_shape_scenes(args.seed + 1, 200)
        x = to_pixels(to_uint8([data.draw(s) for s in scenes]).to(device))
        rec = model.decode(model.encode(x)[0])
    ok = [judge.analyse(im) == (s.shapes[0].color, s.shapes[0].shape) for im, s in zip(to_images(rec), scenes)]
    save_weights(model, out / "vae" / "diffusion_pytorch_model.safetensors")
    write_json(model.config.to_diffusers(), out / "vae" / "config.json")
    return (f"{count(model)} params, loss {loss:.4f}, latents std {z.std().item():.3f} -> scaling_factor "
            f"{model.scaling_factor:.4f}; on 200 fresh single shapes: PSNR {psnr(rec, x):.1f} dB, "
            f"analyse agrees {np.mean(ok):.1%}")


def to_images(x):  # (B, 3, H, W) in [-1, 1] -> PIL images
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


def train_unet(args, out, device, pool):
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text_encoder = clip.load(out / "clip", device=device)  # frozen, as SD's
    vae = unet.load_vae(out / "vae", device=device)
    r = RECIPES["unet"]
    # latents of the pool, once: the posterior's mean and std; each step draws z from it, as SD does
    t0 = time.time()
    with torch.no_grad(), autocast(device):
        moments = torch.cat([torch.cat(vae.encode(to_pixels(b.to(device))), 1).float().cpu()
                             for b in tqdm(pool.images.split(256), desc="encode latents", unit="batch")])
    mean, std = moments[:, :4], (0.5 * moments[:, 4:]).exp()
    print(f"  latents of {len(mean)} images in {time.time() - t0:.0f}s")

    context = text_states(text_encoder, tok, device)

    torch.manual_seed(args.seed)
    model = unet.build_unet(UNET).to(device).train()
    ema = unet.build_unet(UNET).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    ddpm = diffusion.DDPM(SCHEDULER)
    g = torch.Generator().manual_seed(args.seed)

    def loss_fn(i):
        if i > 0:  # the EMA follows the weights of the last step
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - r["ema"])
        idx = torch.randint(len(mean), (r["batch"],), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * vae.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(ddpm.num_train_timesteps, (len(idx),), generator=g)
        zt = ddpm.add_noise(z0, noise, t)
        drop = torch.rand(len(idx), generator=g) < r["cond_dropout"]  # the empty caption: trains CFG
        texts = ["" if d else c for d, c in zip(drop.tolist(), pool.captions(idx.tolist(), i))]
        with autocast(device):
            pred = model(zt.to(device), t.to(device), context(texts))
        return F.mse_loss(pred.float(), noise.to(device))  # epsilon loss, LDM eq. 2

    loss = fit("unet", model.parameters(), r, loss_fn, args.scale)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - r["ema"])
    save_weights(ema, out / "unet" / "diffusion_pytorch_model.safetensors", dtype=torch.float16)
    write_json(UNET.to_diffusers(), out / "unet" / "config.json")
    write_json(SCHEDULER, out / "scheduler" / "scheduler_config.json")
    return f"{count(model)} params, loss {loss:.4f} (saved: the EMA, fp16)"


def text_states(text_encoder, tok, device):
    # E: texts -> (B, TEXT_LEN, width), every token's state after final_layer_norm: SD's context
    @torch.no_grad()
    def context(texts):
        with autocast(device):
            return text_encoder.text_hidden_states(encode_text(tok, texts, device=device)).float()
    return context


def sampler(model, vae, context, device, batch=48):
    # -> draw(prompts, seed): one image per prompt, DDIM with classifier-free guidance (the empty
    # caption as the null), as the benchmark draws
    def draw(prompts, seed):
        g, images = torch.Generator().manual_seed(seed), []
        for b in tqdm(range(0, len(prompts), batch), desc="draw", unit="batch", disable=None):
            images += diffusion.sample_cfg(model, vae, SCHEDULER, context(prompts[b:b + batch]), context([""]),
                                           vae.config.sample_size, EVAL["ddim_steps"], EVAL["cfg"],
                                           generator=g, progress=False)
        return images
    return draw


def next_word(model, tok, device):
    # -> next_word(text, words): the word whose first token the LLM ranks highest after <s> text
    @torch.no_grad()
    def pick(text, words):
        ids = torch.tensor([[tok.token_to_id(SPECIALS[0])] + tok.encode(text, add_special_tokens=False).ids],
                           device=device)
        first = [tok.encode(" " + w, add_special_tokens=False).ids[0] for w in words]
        return words[int(model(ids)[0, -1, first].argmax())]
    return pick


def measure(section, out, device):
    # -> the card's rows of a section ("llm", "clip" or "sd"), read back from `out` as a user loads
    # the models; the SD's also writes the grid of what it drew, samples.png
    needs = {"llm": ["llm"], "clip": ["clip"], "sd": ["clip", "unet", "vae"]}[section]
    if missing := [n for n in ["tokenizer.json", *needs] if not (out / n).exists()]:
        raise cli.Stop(f"{out} has no {missing[0]}: the card measures trained backbones (make them "
                       "with `python -m weights.train_toy`, or give --out the folder that holds them)")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    if section == "llm":
        return card.llm_rows(next_word(llama.load(out / "llm", device=device).eval(), tok, device))
    text_encoder = clip.load(out / "clip", device=device).eval()
    if section == "clip":
        return card.clip_rows(*clip_measures(text_encoder, tok, device))
    model, vae = unet.load_unet(out / "unet", device=device).eval(), unet.load_vae(out / "vae", device=device)
    rows, shown = card.sd_rows(sampler(model, vae, text_states(text_encoder, tok, device), device))
    save_grid(shown, out / "samples.png")
    return rows


def save_grid(shown, path, label=330):
    # [(prompt, [images])] -> a PNG, one row a prompt
    size, n = data.IMAGE_SIZE + 2, max(len(images) for _, images in shown)
    grid = Image.new("RGB", (label + n * size, len(shown) * size), "white")
    pen = ImageDraw.Draw(grid)
    for row, (prompt, images) in enumerate(shown):
        pen.text((4, row * size + size // 2 - 6), prompt, fill="black")
        for j, im in enumerate(images):
            grid.paste(im, (label + j * size + 1, row * size + 1))
    grid.save(path, optimize=True)


# ------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="train only these parts (default: all)")
    ap.add_argument("--out", type=Path, default=Path("weights/toy"), help="output folder (default: weights/toy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    ap.add_argument("--threads", type=int, default=2,
                    help="CPU threads (default 2; use 1 when other jobs share the cores: oversubscribed "
                         "OpenMP threads slow small models down many times)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count and the pool size (e.g. 0.02: a smoke test)")
    ap.add_argument("--card", action="store_true", help="train nothing: measure the report card of --out's "
                    "LLM, CLIP and SD (weights/card.py) and write it to --out/card.json")
    args = ap.parse_args(argv)
    if args.scale <= 0:
        ap.error("--scale must be above 0")
    torch.set_num_threads(args.threads)
    cli.main(lambda: train_all(args, pick_device(args.device)), "weights/train_toy.py")


def train_all(args, device):
    if not args.card:
        args.out.mkdir(parents=True, exist_ok=True)
    pool, timings, start = None, {}, time.time()
    parts = [] if args.card else [p for p in PARTS if p in args.only]
    print(f"training {', '.join(parts)} on {device} into {args.out}" if parts else f"the card of {args.out}")
    for part in parts:
        t0 = time.time()
        if part in ("clip", "read", "vae", "unet") and pool is None:
            pool = Pool(args.seed, max(256, round(POOL["size"] * args.scale)), POOL["two"])
        if part == "tokenizer":
            report = train_tokenizer(args, args.out)
        elif part == "llm":
            report = train_llm(args, args.out, device)
        else:
            report = globals()[f"train_{part}"](args, args.out, device, pool)
        timings[part] = time.time() - t0
        print(f"[{part}] {timings[part] / 60:.1f} min: {report}", flush=True)
        # a section is measured once the last of its parts this run trains is trained
        for section, of in CARD.items():
            if part in of and not any(p in of for p in parts[parts.index(part) + 1:]):
                write_card(args.out, section, device, timings)
    if args.card:
        for section in CARD:
            write_card(args.out, section, device, timings)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"done in {(time.time() - start) / 60:.1f} min; {args.out} holds {size / 2**20:.1f} MB")


# the card's sections, and the parts each measures
CARD = {"llm": ("llm",), "clip": ("clip", "read"), "sd": ("vae", "unet")}


def write_card(out, section, device, timings):
    # measure a section, print its rows, and set them in out/card.json (the other sections kept),
    # with the minutes each of its parts trained (this run's, or those the file held)
    t0 = time.time()
    rows = measure(section, out, device)
    print(f"[{section}] report card ({time.time() - t0:.0f} s, seed {card.SEED}):\n{card.table(rows)}", flush=True)
    path = out / "card.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    minutes = report.get(section, {}).get("training_minutes")
    minutes = dict(minutes) if isinstance(minutes, dict) else {}
    minutes.update({p: round(timings[p] / 60, 1) for p in CARD[section] if p in timings})
    report[section] = dict(rows=rows, seed=card.SEED, training_minutes=minutes)
    write_json(report, path)


if __name__ == "__main__":
    main()
