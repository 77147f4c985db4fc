# DDPM and DDIM against diffusers' DDPMScheduler / DDIMScheduler: same timesteps, same schedules,
# same whole sampling trajectories (given the same Gaussian draws), fp32 on CPU.
import math

import pytest
import torch

from diffusers import DDIMScheduler, DDPMScheduler  # the reference, a test-only dependency

from diffusion import DDIM, DDPM

# scheduler/scheduler_config.json exactly as the official repos ship them
SD15 = {  # runwayml/stable-diffusion-v1-5
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21_BASE = {  # stabilityai/stable-diffusion-2-1-base
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SD21_768 = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
CONFIGS = {
    "sd15": SD15,
    "sd21-base": SD21_BASE,
    "sd21-768": SD21_768,
    "defaults": {},  # diffusers' defaults: linear betas, clip_sample on, set_alpha_to_one on
    "sample-clip": {**SD21_BASE, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 2.0},
    "v-trailing": {**SD21_768, "timestep_spacing": "trailing", "steps_offset": 0},
    "v-linspace-cos": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace",
                       "clip_sample": False, "prediction_type": "v_prediction"},
    "v-alpha-one": {**SD21_768, "set_alpha_to_one": True, "clip_sample": True},
}
TOL = 1e-5  # max abs diff to diffusers, on samples of magnitude ~4


def pair(cls, ref_cls, config, schedule):
    # ours and diffusers' scheduler for one config. Our schedule is computed in float64 (as the
    # original LDM code does), diffusers' in float32: alpha_bar differs by up to ~5e-7. With
    # schedule="diffusers" we run on diffusers' alpha_bar, which isolates the step formulas.
    ours, ref = cls(config), ref_cls.from_config(config)
    if schedule == "diffusers":
        ours.alphas_cumprod = ref.alphas_cumprod.clone()
        if cls is DDIM:
            ours.final_alpha_cumprod = ref.final_alpha_cumprod.clone()
    return ours, ref


def fake_model(config):
    # a smooth, timestep-dependent stand-in for the UNet that behaves like a denoiser (so samples
    # stay O(1), as SD latents do): the ideal noise prediction for N(0, I) data, sqrt(1 - abar) x,
    # plus a perturbation scaled so that the implied x_0 stays bounded, returned as the config's
    # prediction type
    abar_table = DDPMScheduler.from_config(config).alphas_cumprod.double()
    prediction_type = config.get("prediction_type", "epsilon")

    def model(x, t):
        abar = abar_table[int(t)]
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = s * x + 0.3 * a * math.sin(int(t) / 97) * torch.tanh(x.roll(1, dims=-1))
        x0 = (x - s * eps) / a
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
        return out.float()
    return model


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_every_n(spacing, offset):
    for T in (1000, 999, 7):
        cfg = {"timestep_spacing": spacing, "steps_offset": offset, "num_train_timesteps": T}
        ours, ref = DDIM(cfg), DDIMScheduler.from_config(cfg)
        assert torch.equal(ours.timesteps, DDPMScheduler.from_config(cfg).timesteps)  # before set_timesteps
        for n in range(1, T + 1):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            assert ours.timesteps.dtype == torch.long
            assert torch.equal(ours.timesteps, ref.timesteps), (spacing, offset, T, n)


@pytest.mark.parametrize("name", ["sd15", "defaults", "v-linspace-cos"])
def test_schedule(name):
    ours, ref = DDPM(CONFIGS[name]), DDPMScheduler.from_config(CONFIGS[name])
    assert ours.alphas_cumprod.dtype == ours.betas.dtype == torch.float32
    # we compute in float64 (diffusers in float32): the stored float32 values differ by an ulp or so
    assert (ours.betas - ref.betas).abs().max() < 1e-8
    assert (ours.alphas_cumprod - ref.alphas_cumprod).abs().max() < 1e-6
    assert torch.equal(DDIM(CONFIGS[name]).alphas_cumprod, ours.alphas_cumprod)
    t = torch.tensor([0, 10, 500, 999])
    abar = ref.alphas_cumprod[t]
    # 1 - alpha_bar near t = 0 cancels in float32, which the ulp above becomes ~3e-5 relative
    torch.testing.assert_close(ours.snr(t), abar / (1 - abar), rtol=1e-4, atol=0)


def test_trained_betas():
    betas = torch.linspace(1e-4, 3e-2, 50, dtype=torch.float64).tolist()
    cfg = {**SD15, "trained_betas": betas, "num_train_timesteps": 50}
    ours, ref = DDIM(cfg), DDIMScheduler.from_config(cfg)
    assert (ours.alphas_cumprod - ref.alphas_cumprod).abs().max() < 1e-6
    ours.set_timesteps(7)
    ref.set_timesteps(7)
    assert torch.equal(ours.timesteps, ref.timesteps)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("schedule", ["ours", "diffusers"])
def test_ddim_trajectory(name, eta, schedule):
    cfg = CONFIGS[name]
    (ours, ref), fake = pair(DDIM, DDIMScheduler, cfg, schedule), fake_model(cfg)
    tol = TOL if schedule == "ours" else 1e-6  # measured: <= 7e-6 and exactly 0
    g = torch.Generator().manual_seed(0)
    for n in (10, 25):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        x = y = torch.randn(2, 4, 8, 8, generator=g)
        for t in ours.timesteps:
            z = torch.randn(2, 4, 8, 8, generator=g)  # this step's draw, given to both
            x = ours.step(fake(x, t), t, x, eta=eta, noise=z)
            y = ref.step(fake(y, t), t, y, eta=eta, variance_noise=z).prev_sample
            assert (x - y).abs().max() <= tol, (name, eta, n, int(t), (x - y).abs().max().item())
        assert not torch.isnan(x).any()


def test_ddim_generator_draw():
    # noise=None with a generator draws exactly what diffusers draws from the same generator
    ours, ref, fake = DDIM(SD21_BASE), DDIMScheduler.from_config(SD21_BASE), fake_model(SD21_BASE)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = y = torch.randn(1, 4, 8, 8)
    for t in ours.timesteps:
        x = ours.step(fake(x, t), t, x, eta=1.0, generator=g1)
        y = ref.step(fake(y, t), t, y, eta=1.0, generator=g2).prev_sample
    assert (x - y).abs().max() <= TOL


@pytest.mark.parametrize("name", [k for k in CONFIGS if k not in ("sd21-base", "v-alpha-one")])
@pytest.mark.parametrize("n", [None, 50])
@pytest.mark.parametrize("schedule", ["ours", "diffusers"])
def test_ddpm_trajectory(name, n, schedule):
    cfg = CONFIGS[name]
    (ours, ref), fake = pair(DDPM, DDPMScheduler, cfg, schedule), fake_model(cfg)
    # measured: n=50 <= 3.4e-6; all 1000 steps <= 6e-5, the float64-vs-float32 alpha_bar gap
    # compounding over 1000 steps (exactly 0 on diffusers' alpha_bar)
    tol = 1e-6 if schedule == "diffusers" else TOL if n else 1e-4
    if n is not None:
        ours.set_timesteps(n)
        ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    # diffusers draws its noise from `generator` at every step with t > 0; we are given the same draws
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x = y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in ours.timesteps:
        z = torch.randn(2, 4, 8, 8, generator=g_ours) if t > 0 else None
        x = ours.step(fake(x, t), t, x, noise=z)
        y = ref.step(fake(y, t), t, y, generator=g_ref).prev_sample
        assert (x - y).abs().max() <= tol, (name, n, int(t), (x - y).abs().max().item())
    # and drawing from a generator ourselves gives the same trajectory
    g = torch.Generator().manual_seed(1)
    x2 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in ours.timesteps:
        x2 = ours.step(fake(x2, t), t, x2, generator=g)
    assert torch.equal(x2, x)


@pytest.mark.parametrize("name", ["sd21-base", "defaults", "v-linspace-cos"])
def test_add_noise_and_velocity(name):
    ours, ref = DDPM(CONFIGS[name]), DDPMScheduler.from_config(CONFIGS[name])
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 777, 999])
    assert (ours.add_noise(x0, eps, t) - ref.add_noise(x0, eps, t)).abs().max() <= TOL
    assert (ours.velocity(x0, eps, t) - ref.get_velocity(x0, eps, t)).abs().max() <= TOL
    # a plain int timestep works too
    assert (ours.add_noise(x0, eps, 500) - ref.add_noise(x0, eps, torch.tensor(500))).abs().max() <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_ddim_step_lands_on_forward_process(prediction_type):
    # without diffusers: a perfect model's output, stepped with eta = 0, gives exactly q(x_prev | x_0, eps)
    s = DDIM({**SD15, "prediction_type": prediction_type})
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, t_prev = 901, 801
    x_t = s.add_noise(x0, eps, t)
    target = {"epsilon": eps, "v_prediction": s.velocity(x0, eps, t), "sample": x0}[prediction_type]
    x_prev = s.step(target, t, x_t)
    torch.testing.assert_close(x_prev, s.add_noise(x0, eps, t_prev), rtol=0, atol=1e-5)


def test_low_precision_inputs_upcast():
    s = DDIM(SD21_768)
    s.set_timesteps(10)
    x, out = torch.randn(1, 4, 8, 8).bfloat16(), torch.randn(1, 4, 8, 8).bfloat16()
    y = s.step(out, 901, x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, s.step(out.float(), 901, x.float()).bfloat16())


@pytest.mark.parametrize("cls", [DDIM, DDPM])
@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "sigmoid"), ("prediction_type", "x0"), ("timestep_spacing", "karras"),
    ("thresholding", True), ("rescale_betas_zero_snr", True),
])
def test_bad_config(cls, key, value):
    with pytest.raises(ValueError, match=key) as e:
        cls({**SD21_BASE, key: value})
    assert "\n" not in str(e.value)


def test_bad_use():
    with pytest.raises(ValueError, match="variance_type"):
        DDPM({"variance_type": "learned_range"})
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIM(SD15).step(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIM(SD15).set_timesteps(1001)
    ddpm = DDPM(SD15)
    ddpm.set_timesteps(50)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddpm.step(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 4, 8, 8))  # 999 is not on a leading grid
