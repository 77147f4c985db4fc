# Exercise: the three spaces (diffusion.py: Scheduler.predict_x0_eps, Scheduler.target)
import pytest
import torch

import diffusion
from grading import SD_SCHEDULER, alphas_cumprod, close, stand_in

ABAR = alphas_cumprod().float()
PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def world(seed=0):  # z_0, eps, t and z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps; abar (B, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([20, 500, 980])
    abar = ABAR[t].view(-1, 1, 1, 1)
    return x0, eps, t, abar, abar.sqrt() * x0 + (1 - abar).sqrt() * eps


@pytest.mark.parametrize("space", ["epsilon", "v", "x0"])
def test_a_true_prediction_gives_back_x0_and_eps(space):
    sched = diffusion.DDIM(dict(SD_SCHEDULER, prediction_type=PREDICTION[space]))
    x0, eps, t, abar, x_t = world()
    truth = {"epsilon": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[space]
    got_x0, got_eps = sched.predict_x0_eps(truth, abar, x_t)
    close(got_x0, x0, f"x0 from a model that predicts {space} exactly", atol=2e-4)
    close(got_eps, eps, f"eps from a model that predicts {space} exactly", atol=2e-4)


def test_one_alpha_bar_for_the_batch():
    sched = diffusion.DDIM(dict(SD_SCHEDULER, prediction_type="v_prediction"))
    x0, eps, _, _, _ = world(seed=1)
    abar = ABAR[300]  # a 0-d tensor
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    got_x0, _ = sched.predict_x0_eps(abar.sqrt() * eps - (1 - abar).sqrt() * x0, abar, x_t)
    close(got_x0, x0, "x0 from v, with alpha_bar_t a 0-d tensor", atol=2e-4)


def test_clip_sample_clamps_x0():
    sched = diffusion.DDIM(dict(SD_SCHEDULER, clip_sample=True, clip_sample_range=0.5))
    x0, eps, _, abar, x_t = world(seed=2)
    got_x0, got_eps = sched.predict_x0_eps(eps, abar, x_t)
    close(got_x0, x0.clamp(-0.5, 0.5), "x0 with clip_sample and clip_sample_range 0.5", atol=2e-4)
    close(got_eps, eps, "eps is not clamped", atol=1e-5)


@pytest.mark.parametrize("space", ["epsilon", "v", "x0"])
def test_target(space, monkeypatch):
    stand_in(monkeypatch, "Scheduler.velocity")  # exercise "forward-process" need not be solved
    sched = diffusion.DDPM(SD_SCHEDULER)
    x0, eps, t, abar, _ = world(seed=3)
    want = {"epsilon": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[space]
    close(sched.target(x0, eps, t, space), want, f"target(x0, eps, t, {space!r})")
