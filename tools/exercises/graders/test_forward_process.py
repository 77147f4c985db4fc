# Exercise: q(z_t | z_0), the v target and the SNR
# (diffusion.py: Scheduler.add_noise, Scheduler.velocity, Scheduler.snr)
import torch

import diffusion
from grading import SD_SCHEDULER, alphas_cumprod, close, expect

ABAR = alphas_cumprod()  # Stable Diffusion's schedule, float64


def draws(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


def test_add_noise_one_t_per_sample():
    sched, (x0, eps) = diffusion.DDPM(SD_SCHEDULER), draws()
    t = torch.tensor([0, 500, 999])
    a = ABAR[t].view(-1, 1, 1, 1)
    close(sched.add_noise(x0, eps, t), (a.sqrt() * x0 + (1 - a).sqrt() * eps).float(),
          "z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t = [0, 500, 999]")


def test_add_noise_one_t_for_all():
    sched, (x0, eps) = diffusion.DDPM(SD_SCHEDULER), draws(seed=1)
    a = ABAR[250]
    close(sched.add_noise(x0, eps, 250), (a.sqrt() * x0 + (1 - a).sqrt() * eps).float(),
          "z_t at t = 250 (an int) for every sample")
    got = sched.add_noise(x0.double(), eps.double(), torch.tensor(250))
    expect(got.dtype == torch.float64, f"add_noise keeps x0's dtype: float64 in, got {got.dtype}")


def test_velocity():
    sched, (x0, eps) = diffusion.DDPM(SD_SCHEDULER), draws(seed=2)
    t = torch.tensor([10, 400, 990])
    a = ABAR[t].view(-1, 1, 1, 1)
    close(sched.velocity(x0, eps, t), (a.sqrt() * eps - (1 - a).sqrt() * x0).float(),
          "v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0")


def test_z0_comes_back_from_z_t_and_v():
    # a rotation: z_0 = sqrt(abar) z_t - sqrt(1 - abar) v
    sched, (x0, eps) = diffusion.DDPM(SD_SCHEDULER), draws(seed=3)
    t = torch.tensor([100, 600, 900])
    a = ABAR[t].view(-1, 1, 1, 1).float()
    z_t, v = sched.add_noise(x0, eps, t), sched.velocity(x0, eps, t)
    close(a.sqrt() * z_t - (1 - a).sqrt() * v, x0, "sqrt(abar) z_t - sqrt(1 - abar) v, which must "
          "give z_0 back", atol=1e-5)


def test_snr():
    sched = diffusion.DDPM(SD_SCHEDULER)
    t = torch.tensor([0, 1, 300, 999])
    close(sched.snr(t), (ABAR[t] / (1 - ABAR[t])).float(), "snr(t) = abar_t / (1 - abar_t)",
          rtol=1e-4)
