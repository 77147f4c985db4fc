# Exercise: the diffusion loss in each target space (diffusion.py: denoising_loss)
import pytest
import torch
import torch.nn as nn

import diffusion
from grading import SD_SCHEDULER, alphas_cumprod, close, expect, stand_in, x0_eps

ABAR = alphas_cumprod().float()
PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


@pytest.fixture(autouse=True)
def references(monkeypatch):  # exercises "forward-process", "spaces", "min-snr" need not be solved
    stand_in(monkeypatch, "Scheduler.add_noise", "Scheduler.velocity", "Scheduler.snr",
             "Scheduler.predict_x0_eps", "Scheduler.target", "diffusion.min_snr_weight")


class Denoiser(nn.Module):  # a frozen stand-in for the UNet, differentiable in the context
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 4, 1)
        self.requires_grad_(False)

    def forward(self, z, t, context):
        t = torch.as_tensor(t).float().reshape(-1, 1, 1, 1)
        return self.conv_in(z) * (1 + t / 1000) + context.mean(1)[:, :4, None, None]


def by_hand(den, prediction, space, gamma, z0, eps, t, context):
    a = ABAR[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    x0_hat, eps_hat = x0_eps(prediction, den(z_t, t, context), a, z_t)
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    pred = {"epsilon": eps_hat, "x0": x0_hat, "v": v_hat}[space]
    goal = {"epsilon": eps, "x0": z0, "v": a.sqrt() * eps - (1 - a).sqrt() * z0}[space]
    mse = (pred - goal).pow(2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (a / (1 - a)).flatten()
        m = snr.clamp(max=gamma)
        mse = mse * {"epsilon": m / snr, "v": m / (snr + 1), "x0": m}[space]
    return mse.mean()


CASES = [("epsilon", "epsilon", None), ("epsilon", "v", None), ("epsilon", "x0", None),
         ("v", "epsilon", None), ("v", "v", None), ("epsilon", "epsilon", 5.0), ("v", "v", 5.0),
         ("epsilon", "x0", 1.0)]


@pytest.mark.parametrize("prediction,space,gamma", CASES)
def test_loss_and_its_gradient(prediction, space, gamma):
    den = Denoiser()
    sched = diffusion.DDPM(dict(SD_SCHEDULER, prediction_type=PREDICTION[prediction]))
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([30, 480, 950])
    context = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    what = f"a {prediction}-predicting denoiser, loss in {space} space, min-SNR gamma {gamma}"
    loss = diffusion.denoising_loss(den, sched, z0, eps, t, context, space, gamma)
    want = by_hand(den, prediction, space, gamma, z0, eps, t, context)
    close(loss, want, f"the loss: {what}", rtol=1e-4)
    expect(loss.requires_grad, f"the loss has no gradient: {what}; the context's gradient must "
           "pass through the frozen denoiser")
    got_grad, = torch.autograd.grad(loss, context)
    want_grad, = torch.autograd.grad(want, context)
    close(got_grad, want_grad, f"d loss / d context: {what}", atol=1e-6, rtol=1e-3)
