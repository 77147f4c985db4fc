# Exercise: the VAE's reparameterised sample and condition dropout
# (dreamllm.py: DreamLLM.diffusion_loss)
import pytest
import torch

import diffusion
import dreamllm
from grading import close, expect


@pytest.fixture
def model(monkeypatch):
    m = dreamllm.build("tiny", cond_dropout=0.5, target="v", min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)
    # the two nulls: the LLM's states after an empty prompt over the dream queries, or over the
    # raw <im_patch> embeddings (the LLM's code is other exercises', so they are stood in for)
    m.nulls = {k: torch.randn(1, 8, 64, generator=g) for k in ("queries", "patches")}
    m.condition = lambda prompt="", images=(), queries=True: \
        m.nulls["queries" if queries else "patches"]
    m.null_condition = lambda negative="": m.nulls["queries"]
    m.calls = []

    def denoising_loss(denoiser, sched, z0, eps, t, context, space="epsilon", min_snr_gamma=None):
        m.calls.append(dict(denoiser=denoiser, sched=sched, z0=z0, eps=eps, t=t, context=context,
                            space=space, gamma=min_snr_gamma))
        return torch.tensor(1.25)  # exercise "denoising-loss" need not be solved
    monkeypatch.setattr(diffusion, "denoising_loss", denoising_loss)
    return m


def inputs():
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 8, 64, generator=g)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    draws = dict(drop=torch.tensor([True, False]), posterior=torch.randn(2, 4, 16, 16, generator=g),
                 eps=torch.randn(2, 4, 16, 16, generator=g), t=torch.tensor([10, 900]))
    return context, pixels, draws


def test_the_latent_is_a_sample_of_the_posterior(model):
    context, pixels, draws = inputs()
    with torch.no_grad():
        got = model.diffusion_loss(context, pixels, draws)
        mean, logvar = model.vae.encode(pixels)
    expect(len(model.calls) == 1, f"diffusion.denoising_loss was called {len(model.calls)} times, "
           "expected once")
    call = model.calls[0]
    z0 = model.vae.scaling_factor * (mean + torch.exp(0.5 * logvar) * draws["posterior"])
    close(call["z0"], z0, "z0 = scaling_factor (mean + exp(logvar / 2) posterior)", atol=1e-5)
    close(call["eps"], draws["eps"], "eps: draws['eps'] as drawn")
    close(call["t"], draws["t"], "t: draws['t'] as drawn")
    expect(call["denoiser"] is model.unet and call["sched"] is model.noise_scheduler,
           "the loss is the frozen UNet's, with the model's noise scheduler")
    expect(call["space"] == "v" and call["gamma"] == 5.0, f"the loss's space and gamma must be the "
           f"model's config (v, 5.0), got {call['space']!r}, {call['gamma']!r}")
    close(got, torch.tensor(1.25), "the return value: denoising_loss's")


@pytest.mark.parametrize("null", ["queries", "patches"])
def test_dropped_conditions_become_the_null_one(model, null):
    model.config.dropout_null = null
    context, pixels, draws = inputs()
    with torch.no_grad():
        model.diffusion_loss(context, pixels, draws)
    given = model.calls[0]["context"]
    how = "queries=True" if null == "queries" else "queries=False"
    close(given[0], model.nulls[null][0], f"image 0's condition, dropped (drop True), with "
          f"dropout_null {null!r}: self.condition('', {how})")
    close(given[1], context[1], "image 1's condition, kept (drop False): its own")


def test_no_dropout_when_cond_dropout_is_zero(model):
    model.config.cond_dropout = 0.0
    context, pixels, draws = inputs()
    with torch.no_grad():
        model.diffusion_loss(context, pixels, draws)
    close(model.calls[0]["context"], context, "every condition with cond_dropout 0, even where "
          "drop is True")
