# Exercise: min-SNR-gamma weighting (diffusion.py: min_snr_weight)
import pytest
import torch

import diffusion
from grading import close

SNR = torch.tensor([0.01, 0.5, 1.0, 4.9, 5.0, 20.0, 1000.0])


@pytest.mark.parametrize("space", ["epsilon", "v", "x0"])
def test_weights(space):
    m = torch.minimum(SNR, torch.tensor(5.0))
    want = {"epsilon": m / SNR, "v": m / (SNR + 1), "x0": m}[space]
    close(diffusion.min_snr_weight(SNR, 5.0, space), want, f"the {space} weights for snr "
          f"{SNR.tolist()}, gamma 5")


@pytest.mark.parametrize("space", ["epsilon", "v", "x0"])
def test_every_space_weighs_the_x0_error_by_min_snr_gamma(space):
    # the same mistake delta on x0, seen in each space:
    #   w(snr) |error in space|^2 = min(snr, gamma) |delta|^2
    g = torch.Generator().manual_seed(0)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.002], dtype=torch.float64).view(-1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x0, eps, delta = (torch.randn(5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = a * x0 + s * eps
    x0_hat = x0 + delta
    eps_hat = (x_t - a * x0_hat) / s
    error = {"x0": x0_hat - x0, "epsilon": eps_hat - eps,
             "v": (a * eps_hat - s * x0_hat) - (a * eps - s * x0)}[space]
    snr = (abar / (1 - abar)).flatten()
    w = diffusion.min_snr_weight(snr, 5.0, space)
    close(w * error.pow(2).sum(1), snr.clamp(max=5.0) * delta.pow(2).sum(1),
          f"w(snr) |{space} error|^2 against min(snr, 5) |x0 error|^2", rtol=1e-6)


def test_keeps_the_shape():
    snr = torch.rand(2, 3) * 10
    close(diffusion.min_snr_weight(snr, 2.0, "x0"), snr.clamp(max=2.0),
          "min(snr, 2) for a (2, 3) snr")
