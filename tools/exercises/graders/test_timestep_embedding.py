# Exercise: the UNet's timestep embedding (unet.py: timestep_embedding)
import math

import pytest
import torch

import unet
from grading import close, expect


def sinusoids(t, dim, flip, shift, max_period=10000):  # float64
    half = dim // 2
    freqs = torch.tensor([max_period ** (-i / (half - shift)) for i in range(half)],
                         dtype=torch.float64)
    args = t.double()[:, None] * freqs[None]
    parts = [args.cos(), args.sin()] if flip else [args.sin(), args.cos()]
    emb = torch.cat(parts, -1)
    return torch.cat([emb, torch.zeros(len(t), dim % 2, dtype=torch.float64)], -1)


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0), (32, False, 1), (33, True, 0)])
def test_matches_the_formula(dim, flip, shift):
    t = torch.tensor([0, 1, 17, 500, 999])
    got = unet.timestep_embedding(t, dim, flip, shift)
    expect(got.dtype == torch.float32, f"expected float32 features, got {got.dtype}")
    # float32 angles of up to 999 radians: about 1e-4 apart from float64's
    close(got, sinusoids(t, dim, flip, shift), f"emb of t = {t.tolist()}, dim {dim}, "
          f"flip_sin_to_cos {flip}, freq_shift {shift}", atol=5e-4, rtol=0)


def test_t_zero_is_cos_one_sin_zero():
    got = unet.timestep_embedding(torch.tensor([0]), 8, True, 0)
    close(got, torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]), "emb of t = 0 with flip_sin_to_cos: "
          "cos(0) = 1 first, then sin(0) = 0")


def test_lowest_frequency_is_one_over_max_period():
    dim, half = 16, 8
    t = torch.tensor([1000.0])
    got = unet.timestep_embedding(t, dim, True, 1)  # freq_shift 1: the last frequency is 1/10000
    close(got[0, half - 1], torch.tensor(math.cos(1000.0 / 10000)), "cos(t / max_period), the "
          "slowest feature (freq_shift 1)", atol=1e-5)
