"""Diffusion as its equations: the forward process, the DDPM and DDIM samplers, the denoising loss
and classifier-free guided sampling. Nothing here knows what the denoiser is (SD's UNet in this
project) or where its condition comes from (CLIP's text encoder, or DreamLLM's dream queries).

The forward process (DDPM eq. 4) mixes a clean latent z_0 with Gaussian noise eps,

    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,     t = 0 .. T-1, abar_t falling from ~1 to ~0,

and a denoiser f(z_t, t, c) learns to predict one of three equivalent quantities, its *space*:
eps ("epsilon"), z_0 ("x0"), or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 ("v", Salimans & Ho
2022). Given z_t, any one gives the other two (Scheduler.predict_x0_eps). Sampling runs the process
backwards from z_T ~ N(0, I): DDPM (Ho et al. 2020, arXiv 2006.11239) through its posterior,
DDIM (Song et al. 2020, arXiv 2010.02502) deterministically, in fewer steps.

    sched = DDIM(unet.PRESETS["sd-2.1-base"]["scheduler"])      # a scheduler_config.json dict
    loss = denoising_loss(denoiser, sched, z0, eps, t, context)  # |eps - f(z_t, t, c)|^2
    images = sample_cfg(denoiser, vae, config, context, null, 512, steps=50, guidance=3.5)

Schedulers read a diffusers `scheduler_config.json` as the official repos ship it; keys that do not
concern these two samplers (`skip_prk_steps`, `_class_name`, ...) are ignored, and the numbers
(timesteps, the previous timestep, when noise is drawn) follow diffusers so samples agree. One
vocabulary for the spaces, "epsilon" | "v" | "x0": diffusers' `prediction_type` names are read once,
at the config (SPACE_OF).
"""
import math

import torch
from PIL import Image
from tqdm import tqdm

SPACE_OF = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}  # diffusers' name -> ours
SPACES = tuple(SPACE_OF.values())

# ----------------------------------------------------------------------------------------------------
# Schedulers: the forward process q(z_t | z_0) and two ways to run it backwards

# diffusers' defaults for a key the config leaves out (the same for DDPMScheduler and DDIMScheduler)
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, clip_sample=True, clip_sample_range=1.0, steps_offset=0,
    prediction_type="epsilon", timestep_spacing="leading", thresholding=False,
    rescale_betas_zero_snr=False, set_alpha_to_one=True, variance_type="fixed_small",
)


def _check(cfg, key, supported):
    if cfg[key] not in supported:
        raise ValueError(f"scheduler config: {key}={cfg[key]!r} is not supported (supported: {supported})")


class Scheduler:
    def __init__(self, config: dict):
        cfg = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if k in SCHEDULER_DEFAULTS}}
        _check(cfg, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        _check(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"))
        _check(cfg, "timestep_spacing", ("leading", "trailing", "linspace"))
        _check(cfg, "thresholding", (False,))  # Imagen's dynamic thresholding: unfit for latents
        _check(cfg, "rescale_betas_zero_snr", (False,))
        self.config = cfg
        self.num_train_timesteps = T = cfg["num_train_timesteps"]
        self.prediction = SPACE_OF[cfg["prediction_type"]]  # what the model predicts: "epsilon" | "v" | "x0"
        # the noise schedule beta_1..beta_T in float64, as the original LDM code computes it (diffusers
        # works in float32, which moves alpha_bar by up to 5e-7); stored as float32
        b0, b1 = cfg["beta_start"], cfg["beta_end"]
        if cfg["trained_betas"] is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
            self.num_train_timesteps = T = len(betas)
        elif cfg["beta_schedule"] == "linear":  # DDPM sec. 4
            betas = torch.linspace(b0, b1, T, dtype=torch.float64)
        elif cfg["beta_schedule"] == "scaled_linear":  # LDM / Stable Diffusion: linear in sqrt(beta)
            betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
        else:  # improved DDPM eq. 17: alpha_bar(t) = cos^2(pi/2 (t/T + s)/(1 + s)), betas capped at 0.999
            f = lambda i: math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # alpha_bar_t, DDPM eq. 4
        self.num_inference_steps = None
        self.timesteps = torch.arange(T - 1, -1, -1)  # every training step, until set_timesteps(n)

    def set_timesteps(self, n: int):
        T, spacing = self.num_train_timesteps, self.config["timestep_spacing"]
        if not 1 <= n <= T:
            raise ValueError(f"set_timesteps: n={n} must be between 1 and num_train_timesteps={T}")
        self.num_inference_steps = n
        # the three spacings of Lin et al. 2023 (arXiv 2305.08891), table 2; rounding half to even
        if spacing == "leading":  # 0, T//n, 2T//n, ... then shifted: never reaches t = T-1
            t = torch.arange(n) * (T // n) + self.config["steps_offset"]
        elif spacing == "trailing":  # T, T - T/n, ... > 0, minus one: always starts at t = T-1
            # numpy.arange(T, 0, -T/n) to the last bit (diffusers' source): its step is (T - T/n) - T
            step = (T - T / n) - T
            t = (T + torch.arange(math.ceil(T / (T / n)), dtype=torch.float64) * step).round().long() - 1
        else:  # linspace: n points from 0 to T-1 inclusive
            t = (torch.arange(n, dtype=torch.float64) * ((T - 1) / max(n - 1, 1))).round().long()
        self.timesteps = t.sort(descending=True).values

    def snr(self, t):
        # signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), e.g. for min-SNR loss weighting
        alpha_bar_t = self.alphas_cumprod.to(getattr(t, "device", "cpu"))[t]
        return alpha_bar_t / (1 - alpha_bar_t)

    def _coefficients(self, x, t):
        # sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for t of shape () or (B,), as (B, 1, 1, 1)
        t = torch.as_tensor(t, device=x.device)
        alpha_bar_t = self.alphas_cumprod.to(x.device)[t].reshape(-1, *[1] * (x.dim() - 1))
        return alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()

    def add_noise(self, x0, noise, t):
        # q(x_t | x_0), DDPM eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        a, s = self._coefficients(x0, t)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def velocity(self, x0, noise, t):
        # the v-prediction target (Salimans & Ho 2022, sec. 4): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
        a, s = self._coefficients(x0, t)
        return (a * noise.float() - s * x0.float()).to(x0.dtype)

    def predict_x0_eps(self, model_output, alpha_bar_t, x_t):
        # whatever the model predicts, turn it into (x_0, eps), where x_t = sqrt(abar) x_0 + sqrt(1-abar) eps
        a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
        if self.prediction == "epsilon":
            eps = model_output
            x0 = (x_t - s * eps) / a  # DDIM eq. 9
        elif self.prediction == "v":  # v = a eps - s x_0, so:
            x0 = a * x_t - s * model_output
            eps = a * model_output + s * x_t
        else:  # "x0": the model predicts x_0 itself
            x0 = model_output
            eps = (x_t - a * x0) / s
        if self.config["clip_sample"]:  # pixel-space models clip x_0 to the data range; SD does not
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        return x0, eps

    def target(self, x0, eps, t, space):
        # what a prediction in `space` should equal, given the z_0 and eps that made x_t
        if space == "v":
            return self.velocity(x0, eps, t)
        return eps if space == "epsilon" else x0

    def convert(self, model_output, x_t, t, space):
        # the model's output (in its own space, self.prediction) re-expressed in `space`
        if space == self.prediction:
            return model_output
        alpha_bar_t = self.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
        x0, eps = self.predict_x0_eps(model_output, alpha_bar_t, x_t)
        return self.target(x0, eps, t, space)

    def _noise(self, noise, like, generator):
        # the step's Gaussian draw: given, or drawn like diffusers does (same shape, dtype, generator),
        # on the generator's device, so a CPU generator reproduces the same image on any device
        if noise is None:
            device = generator.device if generator is not None else like.device
            noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
        return noise.to(like.device, torch.float32)


class DDIM(Scheduler):
    def __init__(self, config: dict):
        super().__init__(config)
        # alpha_bar "before" the first training step: 1 (clean data) or alpha_bar_0 as SD ships it
        one = torch.tensor(1.0)
        self.final_alpha_cumprod = one if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def step(self, model_output, t, sample, eta=0.0, noise=None, generator=None):
        if self.num_inference_steps is None:
            raise ValueError("DDIM.step: call set_timesteps(n) first")
        t = int(t)
        # as diffusers: the previous timestep is t - T//n for every spacing (for "linspace" this is
        # not always the next entry of self.timesteps, but it is what the official samplers compute)
        t_prev = t - self.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        x_t = sample.float()  # scheduler math in fp32, whatever the UNet ran in
        x0, eps = self.predict_x0_eps(model_output.float(), alpha_bar_t, x_t)
        # eq. 16: sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev);
        # eta = 1 is DDPM's posterior, eta = 0 the deterministic DDIM
        sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
        # eq. 12: x_prev = sqrt(abar_prev) x_0  +  sqrt(1 - abar_prev - sigma_t^2) eps  +  sigma_t z
        x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma_t**2).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma_t * self._noise(noise, x_t, generator)
        return x_prev.to(sample.dtype)


class DDPM(Scheduler):
    def __init__(self, config: dict):
        super().__init__(config)
        _check(self.config, "variance_type", ("fixed_small",))

    def step(self, model_output, t, sample, noise=None, generator=None):
        t = int(t)
        # the previous timestep is the next entry of self.timesteps (t - 1 when running all T steps)
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"DDPM.step: t={t} is not one of self.timesteps (see set_timesteps)")
        i = hits[0, 0].item()
        t_prev = self.timesteps[i + 1].item() if i + 1 < len(self.timesteps) else -1
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        # with strided steps, the step's own alpha_t and beta_t follow from the alpha_bars
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t
        x_t = sample.float()
        x0, _ = self.predict_x0_eps(model_output.float(), alpha_bar_t, x_t)
        # eq. 7, the posterior q(x_prev | x_t, x_0) = N(mu_t, beta_tilde_t):
        # mu_t = sqrt(abar_prev) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
        mu_t = ((alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t)) * x0
                + (alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x_t)
        x_prev = mu_t
        if t > 0:  # diffusers draws whenever t > 0 (even when t_prev = -1, with beta_tilde ~ 0)
            # beta_tilde_t = (1 - abar_prev) / (1 - abar_t) beta_t, sec. 3.2's "fixed_small" choice
            beta_tilde_t = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)
            x_prev = mu_t + beta_tilde_t.sqrt() * self._noise(noise, x_t, generator)
        return x_prev.to(sample.dtype)


# ----------------------------------------------------------------------------------------------------
# Training: the denoising loss, and the random draws it needs

def denoising_loss(denoiser, sched, z0, eps, t, context, space="epsilon", min_snr_gamma=None):
    # |f(z_t, t, c) - target|^2 in `space`, averaged per image, weighted by w(t), averaged over images.
    # z0, eps (n, 4, h, w); t (n,); context (n, S, C). The denoiser is frozen, but the gradient passes
    # through it to the context: with DreamLLM's context, the score of SD teaches the LLM.
    z_t = sched.add_noise(z0, eps, t)  # DDPM eq. 4
    dtype = denoiser.conv_in.weight.dtype
    out = denoiser(z_t.to(dtype), t, context.to(dtype))
    with torch.autocast(z0.device.type, enabled=False):  # scheduler math in fp32
        pred = sched.convert(out.float(), z_t, t, space)
        mse = (pred - sched.target(z0, eps, t, space)).pow(2).mean(dim=(1, 2, 3))  # (n,)
        if min_snr_gamma is not None:
            mse = mse * min_snr_weight(sched.snr(t), min_snr_gamma, space)
        return mse.mean()


def min_snr_weight(snr, gamma, space):
    # min-SNR-gamma (Hang et al. 2023, eq. 9): weight the x0-space error by min(snr, gamma), divided by
    # what the space's error already carries: |eps err|^2 = snr |x0 err|^2, |v err|^2 = (snr + 1) |x0 err|^2
    clipped = snr.clamp(max=gamma)
    return {"epsilon": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[space]


def draw_noise(generators, latent_shape, num_train_timesteps, p_drop):
    # A training step's random draws, one image per entry of `generators`, in this order: the
    # condition-dropout coin, the VAE posterior's sample, eps, t. Each example has its own generator
    # (its images draw from it in turn), so its draws do not depend on the batch it is in: a resumed
    # run, or N processes splitting a batch, draw the same.
    # -> dict(drop (n,) bool, posterior (n, *latent_shape), eps (n, *latent_shape), t (n,) long)
    draws = {"drop": [], "posterior": [], "eps": [], "t": []}
    for g in generators:
        draws["drop"].append(torch.rand(1, generator=g) < p_drop)
        draws["posterior"].append(torch.randn(1, *latent_shape, generator=g))
        draws["eps"].append(torch.randn(1, *latent_shape, generator=g))
        draws["t"].append(torch.randint(0, num_train_timesteps, (1,), generator=g))
    return {k: torch.cat(v) for k, v in draws.items()}


# ----------------------------------------------------------------------------------------------------
# Sampling with classifier-free guidance

@torch.no_grad()
def sample_cfg(denoiser, vae, scheduler_config, context, null, image_size, steps=50, guidance=7.5,
               sampler="ddim", generator=None, progress=True, desc="dreaming"):
    # Stable Diffusion's sampling loop with classifier-free guidance (Ho & Salimans 2022, eq. 6):
    #   f~ = f(z_t, t, null) + w (f(z_t, t, c) - f(z_t, t, null)).
    # context (n, S, C), the null condition (1, S, C) -> n PIL images. guidance 1: f(z_t, t, c) alone.
    n = len(context)
    sched = {"ddim": DDIM, "ddpm": DDPM}[sampler](scheduler_config)
    sched.set_timesteps(steps)
    h = image_size // 2 ** (len(vae.config.channels) - 1)  # the VAE halves per level but the last
    z = _randn((n, vae.config.latent_channels, h, h), context.device, generator)  # z_T ~ N(0, I)
    dtype = denoiser.conv_in.weight.dtype
    guided = guidance != 1
    cond = torch.cat([null.expand(n, -1, -1), context]) if guided else context  # one batch: (null, c)
    for t in tqdm(sched.timesteps, desc=desc, disable=None if progress else True, leave=False):
        out = denoiser((torch.cat([z, z]) if guided else z).to(dtype), t, cond.to(dtype)).float()
        if guided:
            null_out, cond_out = out.chunk(2)
            out = null_out + guidance * (cond_out - null_out)
        z = sched.step(out, t, z, generator=generator)
    return to_pil(vae.decode((z / vae.scaling_factor).to(vae.quant_conv.weight.dtype)))  # about [-1, 1]


def _randn(shape, device, generator):
    # N(0, I) drawn on the generator's device (a CPU generator reproduces the same numbers anywhere)
    gdev = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gdev).to(device)


def to_pil(x):  # (n, 3, H, W) in [-1, 1] -> n PIL images
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy()) for a in x]
