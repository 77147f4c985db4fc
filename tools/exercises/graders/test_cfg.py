# Exercise: classifier-free guidance, the sampling loop (diffusion.py: sample_cfg)
import numpy as np
import pytest
import torch
import torch.nn as nn

import diffusion
import unet
from grading import SD_SCHEDULER, expect, stand_in


@pytest.fixture(autouse=True)
def references(monkeypatch):
    stand_in(monkeypatch, "DDIM.step", "DDPM.step")  # exercises "ddim", "ddpm" need not be solved


class Denoiser(nn.Module):
    # a stand-in for the UNet, sample by sample: it pulls z towards the context's mean, and
    # remembers the batch size of each call
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 4, 1)  # (sample_cfg reads its dtype)
        self.batches = []

    def forward(self, z, t, context):
        self.batches.append(len(z))
        return 0.5 * z - context.mean(dim=(1, 2))[:, None, None, None] + 1e-4 * t


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return unet.build_vae("tiny")  # 64 px images from 16 x 16 latents


def conditions(n=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)


def by_hand(vae, context, null, steps, guidance, sampler, seed):
    # the loop written out: z_T, then at each t f~ = f(null) + w (f(c) - f(null)), then a step
    den, n, g = Denoiser(), len(context), torch.Generator().manual_seed(seed)
    sched = {"ddim": diffusion.DDIM, "ddpm": diffusion.DDPM}[sampler](SD_SCHEDULER)
    sched.set_timesteps(steps)
    z = torch.randn((n, 4, 16, 16), generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            cond, uncond = den(z, t, context), den(z, t, null.expand(n, -1, -1))
            z = sched.step(uncond + guidance * (cond - uncond), t, z, generator=g)
        x = vae.decode(z / vae.scaling_factor)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run(vae, guidance, sampler="ddim", steps=4, seed=0):
    context, null = conditions()
    den = Denoiser()
    images = diffusion.sample_cfg(den, vae, SD_SCHEDULER, context, null, 64, steps=steps,
                                  guidance=guidance, sampler=sampler,
                                  generator=torch.Generator().manual_seed(seed), progress=False)
    return images, by_hand(vae, context, null, steps, guidance, sampler, seed), den.batches


def same_images(images, want, what):
    pil = isinstance(images, list) and all(hasattr(im, "size") for im in images)
    expect(pil and len(images) == len(want),
           f"{what}: expected a list of {len(want)} PIL images, got {type(images).__name__}")
    got = np.stack([np.asarray(im.convert("RGB")) for im in images])
    expect(got.shape == want.shape,
           f"{what}: images of shape {got.shape[1:]}, expected {want.shape[1:]}")
    diff = np.abs(got.astype(int) - want.astype(int))
    expect(diff.max() <= 1, f"{what}: pixels differ from the loop by hand by up to {diff.max()} "
           f"(mean {diff.mean():.2f}); expected the same images (+-1)")


def test_guided_ddim(vae):
    images, want, batches = run(vae, guidance=3.0)
    same_images(images, want, "guidance 3, DDIM, 4 steps")
    expect(batches == [4] * 4, f"the denoiser's batch sizes per call were {batches}: expected one "
           "call per step on [null, context] together, 4 rows for 2 images")


def test_guidance_one_is_the_conditional_prediction(vae):
    images, want, batches = run(vae, guidance=1.0)
    same_images(images, want, "guidance 1: f(z_t, t, c) alone")
    expect(batches == [2] * 4, f"with guidance 1 the denoiser ran on batches {batches}: the null "
           "condition is not needed, expected 2 rows per step")


def test_ddpm_draws_from_the_generator(vae):
    images, want, _ = run(vae, guidance=2.0, sampler="ddpm", steps=3, seed=5)
    same_images(images, want, "guidance 2, DDPM, 3 steps, z_T and each step's noise from the "
                "generator")
