# Exercise: the DDIM step (diffusion.py: DDIM.step)
import pytest
import torch

import diffusion
from grading import SD_SCHEDULER, alphas_cumprod, close, expect, stand_in, x0_eps

ABAR = alphas_cumprod()


@pytest.fixture(autouse=True)
def references(monkeypatch):
    stand_in(monkeypatch, "Scheduler.predict_x0_eps")  # exercise "spaces" need not be solved


def ddim(space="epsilon", n=10):
    prediction = {"epsilon": "epsilon", "v": "v_prediction"}[space]
    s = diffusion.DDIM(dict(SD_SCHEDULER, prediction_type=prediction))
    s.set_timesteps(n)
    return s


def textbook(space, out, t, x_t, eta=0.0, z=None, n=10):  # DDIM eqs. 12 and 16, in float64
    t_prev = t - 1000 // n
    a, a_prev = ABAR[t], ABAR[t_prev] if t_prev >= 0 else ABAR[0]  # SD: set_alpha_to_one False
    x0, eps = x0_eps(space, out.double(), a, x_t.double())
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    return (x + sigma * z if eta > 0 else x).float()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)


@pytest.mark.parametrize("t", [901, 501, 1])  # the first, a middle and the last of 10 steps
def test_deterministic_step(t):
    out, x_t = inputs()
    close(ddim().step(out, t, x_t), textbook("epsilon", out, t, x_t),
          f"x_prev at t = {t} of 10 steps, eta 0"
          + (" (t_prev < 0: abar_prev = final_alpha_cumprod)" if t == 1 else ""),
          atol=1e-5)


def test_v_prediction_step():
    out, x_t = inputs(seed=1)
    close(ddim("v").step(out, 601, x_t), textbook("v", out, 601, x_t),
          "x_prev at t = 601 for a v-predicting model", atol=1e-5)


def test_stochastic_step_with_eta():
    out, x_t = inputs(seed=2)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    close(ddim(n=20).step(out, 451, x_t, eta=0.7, noise=z),
          textbook("epsilon", out, 451, x_t, eta=0.7, z=z.double(), n=20),
          "x_prev at t = 451 of 20 steps, eta 0.7, with the noise z given", atol=1e-5)


def test_a_true_eps_stays_on_its_trajectory():
    # x_t made from (z_0, eps) and a model that says eps:
    # x_prev = sqrt(abar_prev) z_0 + sqrt(1 - abar_prev) eps
    x0, eps = inputs(seed=4)
    a, a_prev = ABAR[701].float(), ABAR[601].float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    close(ddim().step(eps, 701, x_t), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps,
          "from t = 701 with the true eps: the same z_0 and eps at t = 601", atol=1e-4)


def test_needs_set_timesteps():
    s = diffusion.DDIM(SD_SCHEDULER)
    out, x_t = inputs()
    try:
        s.step(out, 901, x_t)
    except ValueError:
        return
    expect(False, "DDIM.step before set_timesteps(n) must raise ValueError (T // n is unknown)")
