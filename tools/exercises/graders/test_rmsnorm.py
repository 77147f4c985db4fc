# Exercise: RMSNorm (llama.py: RMSNorm.forward)
import torch

import llama
from grading import close, expect, rms_norm


def norm(dim=16, eps=1e-6, seed=0):
    torch.manual_seed(seed)
    m = llama.RMSNorm(dim, eps)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(dim))  # a learnt gain, not ones
    return m


def test_matches_the_formula():
    m, x = norm(), torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)) * 3
    close(m(x), rms_norm(x, m.weight, m.eps), "RMSNorm(x) = weight * x / sqrt(mean(x^2) + eps)")


def test_gives_unit_rms_before_the_weight():
    m = norm(dim=64)
    with torch.no_grad():
        m.weight.fill_(1.0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 7 + 2
    rms = m(x).pow(2).mean(-1).sqrt()
    close(rms, torch.ones(3), "the root mean square of each normalised row (weight 1)", atol=1e-4)


def test_eps_is_inside_the_square_root():
    m = norm(eps=0.5)
    x = torch.full((1, 16), 0.1)  # mean x^2 = 0.01, much less than eps: eps decides
    close(m(x), rms_norm(x, m.weight, 0.5), "RMSNorm of a small input with eps = 0.5")


def test_float16_input_is_normalised_in_float32():
    m = norm().half()
    x = (torch.randn(2, 16, generator=torch.Generator().manual_seed(3)) * 300).half()  # x^2 > 65504
    got = m(x)
    expect(got.dtype == torch.float16, f"a float16 module on a float16 input: expected a float16 "
                                       f"output, got {got.dtype}")
    close(got.float(), rms_norm(x, m.weight, m.eps).float(), "RMSNorm of float16 values near 300 "
          "(their squares overflow float16: square them in float32)", atol=2e-3, rtol=2e-3)
