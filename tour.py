"""A tour of the three backbones DreamLLM stands on, runnable on any laptop in seconds.

First the real models (Vicuna-7B, CLIP ViT-L/14, Stable Diffusion 2.1-base) are built on the meta
device: every parameter with its real shape, no memory, no weights, so you can see their sizes.
Then tiny random versions run on the CPU: LLaMA writes tokens with its KV cache, CLIP reads a
picture, and the SD UNet + DDIM + VAE turn noise into an image. The weights are random, so the words
are gibberish and the image is noise: the point is the machinery. (The toy world, once it lands,
replaces this tour with a model that has learned something.)

    python tour.py            # writes out/tour.png
"""
import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import clip
import llama
import unet


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def real_sizes():
    print("The real backbones, built on the meta device (shapes only, no memory):")
    with torch.device("meta"):
        models = [("vicuna-7b-v1.1", "LLaMA decoder", llama.build("vicuna-7b-v1.1")),
                  ("clip-vit-large-patch14", "CLIP, both towers", clip.build("clip-vit-large-patch14")),
                  ("sd-2.1-base", "UNet", unet.build_unet("sd-2.1-base")),
                  ("sd-2.1-base", "VAE", unet.build_vae("sd-2.1-base"))]
    for preset, what, model in models:
        n = n_params(model)
        print(f"  {preset:24s} {what:18s} {n / 1e6:8.1f} M parameters  {2 * n / 2**30:5.2f} GiB in bf16")


@torch.no_grad()
def tiny_llama(g):
    model = llama.build("tiny").eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 8), generator=g)
    t0 = time.perf_counter()
    new = model.generate(prompt, max_new_tokens=16)  # greedy, with the KV cache
    dt = time.perf_counter() - t0
    # the cache is only an optimisation: recomputing the whole sequence must pick the same tokens
    full = torch.cat([prompt, new], dim=1)
    same = torch.equal(model(full)[:, prompt.shape[1] - 1:-1].argmax(-1), new)
    print(f"  LLaMA 'tiny' ({n_params(model) / 1e3:.0f} K params): 16 tokens in {dt * 1e3:.0f} ms with the KV cache; "
          f"the same tokens without it: {same}")


@torch.no_grad()
def tiny_clip():
    model = clip.build("clip-tiny").eval()
    picture = Image.new("RGB", (300, 200), "white")  # a red circle and a blue square
    draw = ImageDraw.Draw(picture)
    draw.ellipse((30, 50, 130, 150), fill="red")
    draw.rectangle((170, 50, 270, 150), fill="blue")
    x = clip.preprocess(picture, size=model.config.vision.image_size)[None]  # (1, 3, 32, 32)
    features = model.image_features(x, layer=-2)  # what DreamLLM reads: (1, 1 + N, D)
    print(f"  CLIP 'clip-tiny': a 300x200 picture -> preprocess {tuple(x.shape)} -> layer -2 features "
          f"{tuple(features.shape)} (CLS + {features.shape[1] - 1} patches)")


@torch.no_grad()
def tiny_sd(g, steps, out):
    preset = unet.PRESETS["tiny"]
    denoiser, vae = unet.build_unet("tiny").eval(), unet.build_vae("tiny").eval()
    sampler = unet.DDIM(preset["scheduler"])
    sampler.set_timesteps(steps)
    context = torch.randn(1, 64, preset["unet"].context_dim, generator=g)  # 64 "dream queries"
    z = torch.randn(1, 4, 16, 16, generator=g)  # pure noise, z_T
    t0 = time.perf_counter()
    for t in tqdm(sampler.timesteps, desc="  DDIM", leave=False):
        z = sampler.step(denoiser(z, t, context), t, z)  # eps_theta(z_t, t, c) -> z_{t-1}
    image = vae.decode(z / preset["vae"].scaling_factor)  # (1, 3, 64, 64) in about [-1, 1]
    dt = time.perf_counter() - t0
    pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((256, 256), Image.NEAREST).save(out / "tour.png")
    print(f"  SD 'tiny': {steps} DDIM steps on a {tuple(z.shape)} latent + VAE decode -> "
          f"{tuple(image.shape)} in {dt:.2f} s, written to {out / 'tour.png'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for tour.png (default: out)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps for the tiny SD (default: 25)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the tiny models' random init
    real_sizes()
    print("Tiny random versions, running on the CPU:")
    tiny_llama(g)
    tiny_clip()
    tiny_sd(g, args.steps, args.out)


if __name__ == "__main__":
    main()
