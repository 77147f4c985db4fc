# Exercise: the DDPM step (diffusion.py: DDPM.step)
import pytest
import torch

import diffusion
from grading import SD_SCHEDULER, alphas_cumprod, close, expect, stand_in, x0_eps

ABAR = alphas_cumprod()


@pytest.fixture(autouse=True)
def references(monkeypatch):
    stand_in(monkeypatch, "Scheduler.predict_x0_eps")  # exercise "spaces" need not be solved


def textbook(out, t, t_prev, x_t, z):  # the posterior q(x_prev | x_t, x0), DDPM eqs. 6-7, float64
    a = ABAR[t]
    a_prev = ABAR[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    alpha, beta = a / a_prev, 1 - a / a_prev
    x0, _ = x0_eps("epsilon", out.double(), a, x_t.double())
    mu = a_prev.sqrt() * beta / (1 - a) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a) * x_t.double()
    var = (1 - a_prev) / (1 - a) * beta
    return (mu + var.sqrt() * z.double() if t > 0 else mu).float()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g),
            torch.randn(2, 4, 8, 8, generator=g))


@pytest.mark.parametrize("t", [999, 500, 1])
def test_every_training_step(t):
    s = diffusion.DDPM(SD_SCHEDULER)  # all 1000 steps: t_prev = t - 1
    out, x_t, z = inputs()
    close(s.step(out, t, x_t, noise=z), textbook(out, t, t - 1, x_t, z),
          f"x_prev = mu + sqrt(beta_tilde) z at t = {t} (of 1000 steps)", atol=1e-5)


@pytest.mark.parametrize("t,t_prev", [(901, 801), (401, 301), (1, -1)])
def test_strided_steps(t, t_prev):
    s = diffusion.DDPM(SD_SCHEDULER)
    s.set_timesteps(10)
    out, x_t, z = inputs(seed=1)
    close(s.step(out, t, x_t, noise=z), textbook(out, t, t_prev, x_t, z),
          f"x_prev at t = {t} of 10 steps (t_prev = {t_prev}; alpha_t = abar_t / abar_prev)",
          atol=1e-5)


def test_no_noise_at_t_zero():
    s = diffusion.DDPM(SD_SCHEDULER)
    out, x_t, z = inputs(seed=2)
    close(s.step(out, 0, x_t, noise=z), textbook(out, 0, -1, x_t, z), "x_prev at t = 0: the mean, "
          "no noise", atol=1e-5)


def test_noise_comes_from_the_generator():
    s = diffusion.DDPM(SD_SCHEDULER)
    out, x_t, _ = inputs(seed=3)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
    got = s.step(out, 700, x_t, generator=torch.Generator().manual_seed(7))
    close(got, textbook(out, 700, 699, x_t, z), "x_prev with generator seeded 7: the noise must be "
          "self._noise(None, x_t, generator)", atol=1e-5)


def test_unknown_t_is_refused():
    s = diffusion.DDPM(SD_SCHEDULER)
    s.set_timesteps(10)
    out, x_t, z = inputs()
    try:
        s.step(out, 500, x_t, noise=z)
    except ValueError:
        return
    expect(False, "DDPM.step at t = 500, not one of the 10 timesteps, must raise ValueError")
