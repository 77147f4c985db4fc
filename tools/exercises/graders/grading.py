# The graders' shared part: how a wrong answer is reported (expected vs got), the textbook
# formulas the graders compare with, and stand-ins: while exercise B is graded, the functions of
# the other exercises that B's code calls are replaced by these references, so that a grader
# never depends on another exercise being solved.
import math

import torch
import torch.nn.functional as F

import diffusion
import dreamllm
import llama

# Stable Diffusion 2.1-base's scheduler_config.json (the keys these graders need)
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}


# ---------------------------------------------------------------------------- reporting

def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def show(t, n=4):  # the first n values of a tensor, for a message
    flat = t.detach().flatten()[:n].tolist()
    more = ", ..." if t.numel() > n else ""
    shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat)
    return "[" + shown + more + "]"


def close(got, want, what, atol=1e-5, rtol=1e-4):
    # got must be a tensor of want's shape whose values are within atol + rtol |want|
    expect(isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}")
    expect(got.shape == want.shape,
           f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    g, w = got.detach().double(), want.detach().double()
    expect(bool(torch.isfinite(g).all()) or not bool(torch.isfinite(w).all()),
           f"{what}: got non-finite values {show(got)}; expected {show(want)}")
    bad = (g - w).abs() > atol + rtol * w.abs()
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values are off; the first at index {i}: "
            f"expected {w[i].item():.6g}, got {g[i].item():.6g} (max |got - expected| "
            f"{(g - w).abs().max().item():.3g})\n  expected {show(want)}\n  got      {show(got)}")


# ---------------------------------------------------------------------------- llama.py

def rms_norm(x, weight, eps):  # x / sqrt(mean x^2 + eps), statistics in float32
    x32 = x.float()
    return weight * (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rmsnorm_forward(self, x):  # (stand-in for RMSNorm.forward)
    return rms_norm(x, self.weight, self.eps)


def rope_angles(positions, head_dim, theta):  # (B, T) -> (B, T, head_dim / 2), float64
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    return positions.double()[..., None] * theta ** (-2 * i / head_dim)


def rope_cos_sin(positions, head_dim, theta, dtype):  # (B, 1, T, head_dim): each angle twice
    a = rope_angles(positions, head_dim, theta)
    a = torch.cat([a, a], -1)[:, None]
    return a.cos().to(dtype), a.sin().to(dtype)


def apply_rope(x, cos, sin):
    # pair i = (x_i, x_{i+d/2}) as the complex number x_i + j x_{i+d/2}, turned by e^{j angle_i}
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double())
    turn = torch.complex(cos[..., :h].double(), sin[..., :h].double())
    out = z * turn
    return torch.cat([out.real, out.imag], -1).to(x.dtype)


def causal_attention(attn, x, cos, sin, past_k=None, past_v=None, mask=None):
    # Attention with the textbook formula: heads split, rotary q and k, each query head reading
    # its group's key/value head, softmax(q k^T / sqrt(d) + mask) v. -> (out, k, v), k and v all
    # keys so far (past and new), before the groups are repeated.
    B, T, _ = x.shape
    H, Hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, d).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, d).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    S = k.shape[2]
    kk, vv = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, S)
    if mask is None:  # query i is token S - T + i: it sees keys 0 .. S - T + i
        mask = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ vv
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * d)), k, v


# ---------------------------------------------------------------------------- diffusion.py

def alphas_cumprod(config=SD_SCHEDULER):  # abar_t of a scaled_linear schedule, float64
    T, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def per_sample(values, t, like):  # values[t] as (B, 1, 1, 1) (or () for a single t), float64
    v = values[torch.as_tensor(t)]
    return v.reshape(-1, *[1] * (like.dim() - 1)) if v.dim() else v


def add_noise(self, x0, noise, t):  # (stand-in for Scheduler.add_noise)
    abar = per_sample(self.alphas_cumprod.double(), t, x0)
    return (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).to(x0.dtype)


def velocity(self, x0, noise, t):  # (stand-in for Scheduler.velocity)
    abar = per_sample(self.alphas_cumprod.double(), t, x0)
    return (abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()).to(x0.dtype)


def snr(self, t):  # (stand-in for Scheduler.snr)
    abar = self.alphas_cumprod[t]
    return abar / (1 - abar)


def x0_eps(space, out, abar, x_t):
    # a prediction in `space` -> (x0, eps), from x_t = a x0 + s eps and v = a eps - s x0
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if space == "epsilon":
        return (x_t - s * out) / a, out
    if space == "v":
        return a * x_t - s * out, a * out + s * x_t
    return out, (x_t - a * out) / s


def predict_x0_eps(self, model_output, alpha_bar_t, x_t):  # (stand-in for Scheduler.predict_x0_eps)
    x0, eps = x0_eps(self.prediction, model_output, alpha_bar_t, x_t)
    if self.config["clip_sample"]:
        r = self.config["clip_sample_range"]
        x0 = x0.clamp(-r, r)
    return x0, eps


def target(self, x0, eps, t, space):  # (stand-in for Scheduler.target)
    if space == "v":
        return velocity(self, x0, eps, t)
    return eps if space == "epsilon" else x0


def ddim_step(self, model_output, t, sample, eta=0.0, noise=None, generator=None):  # (stand-in)
    t = int(t)
    abar = self.alphas_cumprod.double()
    t_prev = t - self.num_train_timesteps // self.num_inference_steps
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else self.final_alpha_cumprod.double()
    x_t = sample.double()
    x0, eps = predict_x0_eps(self, model_output.double(), a_t, x_t)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * self._noise(noise, sample.float(), generator).double()
    return x_prev.to(sample.dtype)


def ddpm_step(self, model_output, t, sample, noise=None, generator=None):  # (stand-in)
    t = int(t)
    steps = self.timesteps.tolist()
    t_prev = steps[steps.index(t) + 1] if steps.index(t) + 1 < len(steps) else -1
    abar = self.alphas_cumprod.double()
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    x_t = sample.double()
    x0, _ = predict_x0_eps(self, model_output.double(), a_t, x_t)
    mu = a_prev.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    if t > 0:
        var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
        mu = mu + var.sqrt() * self._noise(noise, sample.float(), generator).double()
    return mu.to(sample.dtype)


def min_snr_weight(snr, gamma, space):  # (stand-in)
    m = torch.minimum(snr, torch.full_like(snr, gamma))
    return {"x0": m, "epsilon": m / snr, "v": m / (snr + 1)}[space]


# ---------------------------------------------------------------------------- dreamllm.py

def slot_masks(self, input_ids):  # (stand-in for DreamLLM.slot_masks): a walk along each row
    tok = self.token_id
    opens = {tok["<dream_start>"]: "dream", tok["<im_start>"]: "read"}
    closes = {tok["<dream_end>"], tok["<im_end>"]}
    masks = {"dream": torch.zeros(input_ids.shape, dtype=torch.bool),
             "read": torch.zeros(input_ids.shape, dtype=torch.bool)}
    for b, row in enumerate(input_ids.tolist()):
        inside = None
        for i, v in enumerate(row):
            if v in opens:
                inside = opens[v]
            elif v in closes:
                inside = None
            elif v == tok["<im_patch>"] and inside:
                masks[inside][b, i] = True
    return masks["dream"].to(input_ids.device), masks["read"].to(input_ids.device)


def embed(self, input_ids, clip_pixels=None, queries=True):  # (stand-in for DreamLLM.embed)
    K, N = self.config.n_queries, self.n_patches
    plain = self.llm.model.embed_tokens(input_ids)
    dream, read = slot_masks(self, input_ids)
    features = self.read_features(clip_pixels) if read.any() else None
    rows, n_dream, n_read = [], 0, 0
    for b in range(input_ids.shape[0]):
        for i in range(input_ids.shape[1]):
            if dream[b, i] and queries:
                rows.append(self.dream_queries[n_dream % K].to(plain.dtype))
                n_dream += 1
            elif read[b, i]:
                rows.append(features[n_read // N, n_read % N].to(plain.dtype))
                n_read += 1
            else:
                rows.append(plain[b, i])
    return torch.stack(rows).view(plain.shape)


def fake_read_features(model, seed=0):
    # A stand-in for CLIP + the visual projector: (n, 3, s, s) -> (n, N, D), a fixed function of
    # the pixels (each of N regions' mean colour, mapped to D), so that what an image shows matters
    g = torch.Generator().manual_seed(seed)
    N, D = model.n_patches, model.llm.cfg.dim
    side = int(N ** 0.5)
    colour_to_d, position = torch.randn(3, D, generator=g), 0.1 * torch.randn(N, D, generator=g)

    def read_features(clip_pixels):
        regions = F.adaptive_avg_pool2d(clip_pixels.float(), side).flatten(2).transpose(1, 2)
        return regions @ colour_to_d + position  # (n, N, D)
    return read_features


class StubCache:  # the state a StubLLM carries from call to call, and how many tokens it has seen
    def __init__(self):
        self.h, self.seen = None, 0

    def __len__(self):
        return self.seen


def stub_hidden_states(model, seed=0, decay=0.5):
    # A stand-in for the LLM's hidden_states: a causal recurrence h_i = decay h_{i-1} + tanh(x_i A),
    # cheap, order-sensitive, differentiable; with a StubCache it continues where it stopped.
    D = model.llm.cfg.dim
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(seed)) / D ** 0.5

    def hidden_states(input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        x = model.llm.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h = cache.h if cache is not None and cache.h is not None else torch.zeros(x.shape[0], D)
        out = []
        for i in range(x.shape[1]):
            h = decay * h + torch.tanh(x[:, i] @ A)
            out.append(h)
        if cache is not None:
            cache.h, cache.seen = h, cache.seen + x.shape[1]
        return torch.stack(out, 1)  # (B, T, D)
    return hidden_states


# ---------------------------------------------------------------------------- stand-ins

STAND_INS = {
    "RMSNorm.forward": (llama.RMSNorm, "forward", rmsnorm_forward),
    "llama.apply_rope": (llama, "apply_rope", apply_rope),
    "Scheduler.add_noise": (diffusion.Scheduler, "add_noise", add_noise),
    "Scheduler.velocity": (diffusion.Scheduler, "velocity", velocity),
    "Scheduler.snr": (diffusion.Scheduler, "snr", snr),
    "Scheduler.predict_x0_eps": (diffusion.Scheduler, "predict_x0_eps", predict_x0_eps),
    "Scheduler.target": (diffusion.Scheduler, "target", target),
    "DDIM.step": (diffusion.DDIM, "step", ddim_step),
    "DDPM.step": (diffusion.DDPM, "step", ddpm_step),
    "diffusion.min_snr_weight": (diffusion, "min_snr_weight", min_snr_weight),
    "DreamLLM.slot_masks": (dreamllm.DreamLLM, "slot_masks", slot_masks),
    "DreamLLM.embed": (dreamllm.DreamLLM, "embed", embed),
}


def stand_in(monkeypatch, *names):
    # replace the named functions of other exercises by the references above, for this test
    for name in names:
        owner, attr, reference = STAND_INS[name]
        monkeypatch.setattr(owner, attr, reference)
