"""The exercises, as data: which bodies the student writes, what to write, hints, the grader.

An entry names functions as "file.py:Qualified.name"; `python -m tools.exercises make` replaces
their bodies with `raise NotImplementedError("exercise N: title")`, and the grader
`graders/test_<id>.py` (id with "-" as "_") checks the student's version. Order: the reading order
of the house (llama.py, clip.py, unet.py, diffusion.py, dreamllm.py). The experiments at the end
have no bodies to write: they ask a question of the shapes world and keep the measured answer
(`python -m tools.exercises experiments --answers`).
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Exercise:
    id: str
    title: str
    functions: tuple   # "file.py:Class.method" or "file.py:function"
    statement: str     # what to implement: the equation, the shapes
    hints: tuple = ()

    @property
    def grader(self):  # the pytest file, relative to tools/exercises/
        return f"graders/test_{self.id.replace('-', '_')}.py"


EXERCISES = [
    # ---------------------------------------------------------------------------- llama.py
    Exercise(
        "rmsnorm", "RMSNorm", ("llama.py:RMSNorm.forward",),
        """LLaMA normalises each token's vector by its root mean square, with no mean subtracted
and no bias (Zhang & Sennrich 2019):

    RMSNorm(x) = weight * x / sqrt(mean(x_i^2) + eps)      x (..., dim), weight (dim,)

Compute the statistics in float32 even when x is float16 or bfloat16 (the squares of
activations overflow float16), cast the normalised x back to x's dtype, then multiply by
self.weight.""",
        ("torch.rsqrt(v) is 1 / sqrt(v).",
         "x.pow(2).mean(-1, keepdim=True) keeps the last axis, so it broadcasts against x.",
         "A float16 input of size 300 has a square of 90000, past float16's largest number.")),
    Exercise(
        "rope", "Rotary position embeddings", ("llama.py:rope_cos_sin", "llama.py:apply_rope"),
        """Rotary embeddings (RoFormer, Su et al. 2021) rotate pairs of a head's channels by an
angle that grows with the token's position, so that q . k depends on the positions only
through their difference. Pair i (i < head_dim / 2) turns by

    angle(pos, i) = pos * theta^(-2 i / head_dim)

In the Hugging Face layout the pair is (x[i], x[i + head_dim/2]), not two neighbours.
- rope_cos_sin(positions (B, T), head_dim, theta, dtype) -> cos, sin, each (B, 1, T, head_dim):
  the angles of the pairs, laid out twice ([angles, angles]) so that channel i and channel
  i + head_dim/2 share one angle; computed in float32, returned in `dtype`.
- apply_rope(x (B, heads, T, head_dim), cos, sin) -> the rotated x:
  (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), x1 and x2 the two halves of the last axis.""",
        ("x.chunk(2, dim=-1) gives the two halves; torch.cat([-x2, x1], -1) is 'rotate half'.",
         "The `[:, None]` in cos[:, None] adds the heads axis.")),
    Exercise(
        "attention", "Causal attention with a KV cache",
        ("llama.py:KVCache.update", "llama.py:Attention.forward"),
        """Attention.forward(x (B, T, dim), cos, sin, mask, cache) -> (B, T, dim):

    q, k, v = x Wq, x Wk, x Wv     heads: (B, n_heads, T, hd), (B, n_kv_heads, T, hd) x 2
    q, k = rope(q), rope(k)        (apply_rope, with the cos and sin given)
    y = softmax(q k^T / sqrt(hd) + causal mask) v,   then o_proj of the heads side by side

Grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads).
mask is None for plain causal attention, or a boolean (B, 1, T, keys) mask, True = attend.
With a cache, the T new tokens' k and v are appended to those of the tokens before them:
cache.update(layer, k, v) stores them and returns all keys and values so far, and the new
queries attend to every cached key (a single new token sees all of them).
KVCache.update(layer, k, v) -> (k, v): concatenate the new ones after the stored ones along
the sequence axis (axis 2), store the result in self.k[layer], self.v[layer], return it.""",
        ("F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=..., enable_gqa=...)"
         " does the softmax; is_causal only when there is no mask and more than one query.",
         "view(B, T, heads, hd).transpose(1, 2) splits the heads; transpose back and reshape to "
         "merge them.", "self.layer is this attention's layer number, for the cache.")),
    Exercise(
        "swiglu", "The SwiGLU MLP and the pre-norm block",
        ("llama.py:MLP.forward", "llama.py:Block.forward"),
        """The MLP of LLaMA is SwiGLU (Shazeer 2020): a gated linear unit with the SiLU as its gate,

    MLP(x) = down_proj( silu(gate_proj(x)) * up_proj(x) )      (B, T, dim) -> (B, T, dim)

and a block adds each sub-layer to the residual stream after normalising its input (pre-norm):

    x = x + self_attn(input_layernorm(x), cos, sin, mask, cache)
    x = x + mlp(post_attention_layernorm(x))""",
        ("silu(x) = x * sigmoid(x) is F.silu.", "The attention takes cos, sin, mask and cache as "
         "they come.")),
    # ----------------------------------------------------------------------------- clip.py
    Exercise(
        "patch-embedding", "CLIP's patch embedding", ("clip.py:VisionTransformer.forward",),
        """A ViT reads an image as a sequence of patches. VisionTransformer.forward(pixel_values
(B, 3, H, W), n_layers) -> (B, 1 + N, D), the hidden states after the first n_layers layers:
1. cut the image into N = (H/p)(W/p) patches of p x p and map each linearly to D: that is
   exactly a convolution with kernel p and stride p (embeddings.patch_embedding);
2. flatten them row by row into (B, N, D);
3. put the learnt CLS token first: (B, 1 + N, D) (embeddings.class_embedding, (D,));
4. add the learnt absolute positions (embeddings.position_embedding.weight, (1 + N, D));
5. pre_layrnorm, then the first n_layers of self.encoder.layers.
DreamLLM reads layer -2 of ViT-L/14: 1 + 256 tokens, of which it drops the CLS token.""",
        ("conv output (B, D, H/p, W/p) -> .flatten(2).transpose(1, 2) is row-major (B, N, D).",
         "class_embedding.expand(B, 1, -1) repeats the CLS token for the batch.")),
    # ----------------------------------------------------------------------------- unet.py
    Exercise(
        "timestep-embedding", "The UNet's timestep embedding", ("unet.py:timestep_embedding",),
        """The UNet learns one denoiser for every noise level by reading t through sinusoidal
features (as the Transformer's positions): t (B,) -> (B, dim),

    half = dim // 2,   freq_i = exp(-ln(max_period) * i / (half - freq_shift)),  i = 0 .. half-1
    emb = [cos(t freq), sin(t freq)]  if flip_sin_to_cos  else  [sin(t freq), cos(t freq)]

computed in float32, padded with one zero column when dim is odd.""",
        ("torch.exp(-math.log(max_period) * i / (half - freq_shift)) for i = torch.arange(half).",
         "t.float()[:, None] * freqs[None, :] is (B, half).")),
    Exercise(
        "cross-attention", "The UNet's cross-attention: where the dream queries enter",
        ("unet.py:Attention.forward", "unet.py:TransformerBlock.forward"),
        """Every UNet level with a transformer lets each pixel attend to the others, then to the
context: SD's CLIP text tokens, or DreamLLM's K projected dream-query states.
- Attention.forward(x (B, T, dim), context (B, S, context_dim) or None) -> (B, T, dim):
  queries from x, keys and values from the context (from x itself when context is None):
      q = to_q(x), k = to_k(context), v = to_v(context)
      out = to_out[0]( multi-head softmax(q k^T / sqrt(dim / n_heads)) v )
  the function `attention(q, k, v, n_heads, upcast)` of unet.py does the multi-head part.
- TransformerBlock.forward(x, context): three pre-norm residual sub-layers,
      x = x + attn1(norm1(x))              self-attention over the pixels
      x = x + attn2(norm2(x), context)     cross-attention to the context
      x = x + ff(norm3(x))""",
        ("self.upcast is passed on to attention().",)),
    # ------------------------------------------------------------------------ diffusion.py
    Exercise(
        "forward-process", "q(z_t | z_0): noising, the v target and the SNR",
        ("diffusion.py:Scheduler.add_noise", "diffusion.py:Scheduler.velocity",
         "diffusion.py:Scheduler.snr"),
        """The forward process (DDPM eq. 4), with abar_t = self.alphas_cumprod[t]:

    add_noise(x0, noise, t) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    velocity(x0, noise, t)  = sqrt(abar_t) noise - sqrt(1 - abar_t) x0      (Salimans & Ho 2022)
    snr(t)                  = abar_t / (1 - abar_t)

x0, noise (B, C, h, w); t an int, a 0-d tensor or (B,), one timestep per sample. Compute in
float32 and return x0's dtype. snr returns abar_t / (1 - abar_t) with t's shape.""",
        ("self._coefficients(x0, t) gives sqrt(abar_t) and sqrt(1 - abar_t) as (B, 1, 1, 1).",)),
    Exercise(
        "spaces", "The three spaces: eps, x0 and v",
        ("diffusion.py:Scheduler.predict_x0_eps", "diffusion.py:Scheduler.target"),
        """A denoiser predicts one of three quantities, its space (self.prediction): "epsilon",
"x0" or "v". With a = sqrt(abar_t), s = sqrt(1 - abar_t), x_t = a x0 + s eps and
v = a eps - s x0, any one of them gives the other two.
- predict_x0_eps(model_output, alpha_bar_t, x_t) -> (x0, eps):
      "epsilon": eps = output,  x0 = (x_t - s eps) / a              (DDIM eq. 9)
      "v":       x0 = a x_t - s v,  eps = a v + s x_t
      "x0":      x0 = output,  eps = (x_t - a x0) / s
  then, if self.config["clip_sample"], clamp x0 to [-r, r], r = config["clip_sample_range"].
- target(x0, eps, t, space) -> what a prediction in `space` should equal: eps, x0, or
  self.velocity(x0, eps, t).""",
        ("alpha_bar_t may be a 0-d tensor or (B, 1, 1, 1): write formulas that broadcast.",)),
    Exercise(
        "ddim", "The DDIM step", ("diffusion.py:DDIM.step",),
        """DDIM (Song et al. 2020) runs the process backwards in n of the T training steps.
step(model_output, t, sample, eta=0.0, noise=None, generator=None) -> x_prev, sample's dtype:

    t_prev = t - T // n          (T = self.num_train_timesteps, n = self.num_inference_steps)
    abar_prev = alphas_cumprod[t_prev], or self.final_alpha_cumprod when t_prev < 0
    x0, eps = self.predict_x0_eps(model_output, abar_t, x_t)
    sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)    (eq. 16)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps  [+ sigma_t z]   (eq. 12)

z is drawn only when eta > 0: self._noise(noise, x_t, generator). Do the math in float32.
Raise ValueError if set_timesteps was never called.""",
        ("eta = 0 is deterministic: the same x_t and prediction always give the same x_prev.",)),
    Exercise(
        "ddpm", "The DDPM step", ("diffusion.py:DDPM.step",),
        """DDPM (Ho et al. 2020) samples the posterior q(x_prev | x_t, x0) with x0 predicted.
step(model_output, t, sample, noise=None, generator=None) -> x_prev:

    t_prev = the entry of self.timesteps after t (-1 after the last); abar_prev = 1 if t_prev < 0
    alpha_t = abar_t / abar_prev,  beta_t = 1 - alpha_t          (strided steps)
    x0 = self.predict_x0_eps(model_output, abar_t, x_t)[0]
    mu = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
    beta_tilde = (1 - abar_prev) / (1 - abar_t) beta_t                     (eq. 7)
    x_prev = mu + sqrt(beta_tilde) z   when t > 0, else mu;  z = self._noise(noise, x_t, generator)

Raise ValueError when t is not one of self.timesteps. Math in float32, return sample's dtype.""",
        ("(self.timesteps == t).nonzero() finds t's index.",
         "clamp beta_tilde to >= 1e-20 before its sqrt: at the last strided step it is ~0.")),
    Exercise(
        "cfg", "Classifier-free guidance: the sampling loop", ("diffusion.py:sample_cfg",),
        """Sampling with classifier-free guidance (Ho & Salimans 2022): at each step the denoiser
runs on the condition and on the null condition, and the prediction is pushed away from the
null:

    f~ = f(z_t, t, null) + w (f(z_t, t, c) - f(z_t, t, null))

sample_cfg(denoiser, vae, scheduler_config, context (n, S, C), null (1, S, C), image_size,
steps, guidance, sampler, generator, progress, desc) -> n PIL images:
1. sched = DDIM or DDPM (sampler "ddim" | "ddpm") of scheduler_config; set_timesteps(steps);
2. z_T ~ N(0, I), (n, latent_channels, h, h), h = image_size / 2^(levels of the VAE - 1),
   drawn with _randn(shape, context.device, generator);
3. for each t of sched.timesteps: one denoiser call on the batch [z, z] with [null x n, context]
   (one call on z with context alone when guidance == 1), f~ as above,
   z = sched.step(f~, t, z, generator=generator);
4. decode: to_pil(vae.decode(z / vae.scaling_factor)).
Run the denoiser in its weights' dtype (denoiser.conv_in.weight.dtype), the rest in float32.""",
        ("null.expand(n, -1, -1) repeats the null condition for the batch.",
         "out.chunk(2) splits the doubled batch back into (null, conditional).",
         "tqdm(sched.timesteps, desc=desc, disable=None if progress else True) shows a bar.")),
    Exercise(
        "denoising-loss", "The diffusion loss in each target space",
        ("diffusion.py:denoising_loss",),
        """The denoising loss, in the space `space` ("epsilon" | "v" | "x0"), whatever space the
denoiser predicts in (sched.prediction):

    z_t  = sched.add_noise(z0, eps, t)
    out  = denoiser(z_t, t, context)                       (in the denoiser's dtype)
    pred = sched.convert(out, z_t, t, space)               (re-expressed in `space`)
    mse_i = mean over (C, h, w) of (pred - sched.target(z0, eps, t, space))^2      (n,)
    loss = mean_i  w_i mse_i,   w_i = min_snr_weight(sched.snr(t), gamma, space), or 1 if None

z0, eps (n, 4, h, w), t (n,), context (n, S, C) -> a 0-d tensor. The denoiser is frozen, but
the gradient must reach the context: that is how SD's score teaches DreamLLM's LLM.""",
        ("Do the scheduler math in float32 outside autocast: "
         "with torch.autocast(z0.device.type, enabled=False).",)),
    Exercise(
        "min-snr", "Min-SNR-gamma weighting", ("diffusion.py:min_snr_weight",),
        """Min-SNR-gamma (Hang et al. 2023) weighs the error of each timestep as if it were an x0
error weighted by min(snr, gamma): easy, low-noise steps stop dominating. An error in another space
already carries a factor: |eps error|^2 = snr |x0 error|^2 and |v error|^2 = (snr + 1)
|x0 error|^2. So min_snr_weight(snr, gamma, space) ->

    "x0": min(snr, gamma)    "epsilon": min(snr, gamma) / snr    "v": min(snr, gamma) / (snr + 1)

snr a tensor of any shape; the result has its shape.""",
        ("snr.clamp(max=gamma) is min(snr, gamma).",)),
    # ------------------------------------------------------------------------- dreamllm.py
    Exercise(
        "labels", "The labels of an interleaved document",
        ("dreamllm.py:DreamLLM.encode_document",),
        """encode_document(text, n_images) -> input_ids (T,), labels (T,), for a document in which
each "<image>" is an image the model writes and then reads back:

    BOS text <dream_start> <im_patch> x K <dream_end> <im_start> <im_patch> x N <im_end> text EOS
             |--------- self.dream_slot() ---------|  |--------- self.read_slot() --------|

Labels are the next-token targets: every text token and EOS is its own label; BOS and every slot
token are -100 (ignored), except <dream_start>, the one slot token with a label: the model
learns *where* an image goes, not what fills the slots. Tokenise with
self.tokenizer.encode(text, add_special_tokens=False).ids; "<image>" is one token
(self.token_id["<image>"]). Check the text with check_text(text) first, and raise ValueError
when the number of "<image>" in the text is not n_images.""",
        ("self.bos_id, self.eos_id, self.dream_slot(), self.read_slot() give the pieces.",
         "Build two Python lists side by side, then torch.tensor each.")),
    Exercise(
        "splice", "The dream-query splice",
        ("dreamllm.py:DreamLLM.slot_masks", "dreamllm.py:DreamLLM.embed"),
        """The LLM reads embeddings, not ids. Inside the slots, the <im_patch> rows are overwritten:
- slot_masks(input_ids (B, T)) -> (dream, read), two boolean (B, T) masks of the <im_patch>
  tokens inside dream slots (between <dream_start> and <dream_end>) and inside read slots
  (between <im_start> and <im_end>); the delimiters themselves are in neither.
- embed(input_ids (B, T), clip_pixels (n, 3, s, s) or None, queries=True) -> (B, T, D): the
  token embeddings (self.llm.model.embed_tokens) with every dream slot's K rows replaced by the
  K dream queries (self.dream_queries, (K, D)), and the i-th read slot's N rows (in the order
  of the flattened batch, row by row) by image i's features, self.read_features(clip_pixels),
  (n, N, D).
  queries=False leaves the dream slots' rows as they are (the token embeddings).
The dream queries must receive a gradient: they are what stage I trains.""",
        ("A running count, (ids == start).cumsum(1) - (ids == end).cumsum(1) > 0, is 'inside'.",
         "x.masked_scatter(mask[..., None], values) fills the masked rows in order, keeping the "
         "gradient.")),
    Exercise(
        "two-losses", "The two losses: next token and denoising", ("dreamllm.py:DreamLLM.forward",),
        """forward(input_ids, labels, clip_pixels=None, vae_pixels=None, draws=None) -> dict(lm=...,
diffusion=...), both unweighted (a training stage weighs them):

    h = self.llm.hidden_states(inputs_embeds=self.embed(input_ids, clip_pixels))    (B, T, D)
    lm = cross-entropy of lm_head(h[:, :-1]) against labels[:, 1:], ignoring -100
         (0 when no label is left)
    context = condition_projector(h at the dream slots' <im_patch> positions)  (n, K, C)
    diffusion = self.diffusion_loss(context, vae_pixels, draws)   (0 without vae_pixels)

Move input_ids and labels to self.device; a zero is torch.zeros((), device=self.device).""",
        ("self.slot_masks(input_ids)[0] marks the K positions of every dream slot, image by image.",
         "h[mask] is (n K, D): view it as (n, K, D).")),
    Exercise(
        "vae-sample", "The VAE's reparameterised sample and condition dropout",
        ("dreamllm.py:DreamLLM.diffusion_loss",),
        """diffusion_loss(context (n, K, C), vae_pixels (n, 3, S, S), draws) -> the denoising loss
of the n images, with the draws of draw_noise (draws["drop"] (n,), draws["posterior"], draws["eps"],
draws["t"]):
1. condition dropout: if self.config.cond_dropout > 0, the context of every image with
   drop[i] True becomes the null one, self.condition("", queries=...) (1, K, C): the LLM's
   states after an empty prompt, over the dream queries (queries=True) when
   self.config.dropout_null is "queries", over the slot's raw <im_patch> embeddings
   (queries=False, the official training's) when it is "patches";
2. the latent, sampled from the VAE's posterior with the reparameterisation trick, without
   gradient (the VAE is frozen):
       mean, logvar = self.vae.encode(pixels)
       z0 = scaling_factor (mean + exp(logvar / 2) posterior)
3. diffusion.denoising_loss(self.unet, self.noise_scheduler, z0, eps, t, context,
   self.config.target, self.config.min_snr_gamma).""",
        ("torch.where(drop[:, None, None], null, context) picks per image.",
         "Move the draws to self.device, the pixels to the VAE's dtype "
         "(vae.quant_conv.weight.dtype).")),
    Exercise(
        "read-back", "The generation loop's read-back", ("dreamllm.py:DreamLLM._dream_then_read",),
        """In generate(), the LLM has just written <dream_start>; the KV cache holds the document so
far. _dream_then_read(cache, sampling) -> (image, h (1, D)):
1. feed <dream_start> and the K dream queries (self.dream_slot() without <dream_end>, embedded
   with self.embed) through self.llm.hidden_states(inputs_embeds=..., cache=cache);
2. the K queries' final states, through the condition projector, are the condition:
   image = self.sample_images(condition (1, K, C), **sampling)[0];
3. read it back: feed <dream_end> and a read slot (self.read_slot()), embedded with the image's
   CLIP pixels (self.clip_pixels([image])), through the LLM with the same cache;
4. return the image and the last position's hidden state, (1, D): the state the next token is
   written from, which has now seen the image.""",
        ("Both chunks go through the cache: the LLM then continues after them.",
         "embed(ids, None) is enough for the dream chunk: it holds no read slot.")),
]

BY_ID = {e.id: e for e in EXERCISES}


@dataclass(frozen=True)
class Experiment:
    id: str
    question: str
    commands: tuple     # run from the project's root, one at a time
    time: str           # measured on the project's 2-core CPU
    answer: str         # the key, from the measured runs
    read: tuple = field(default=())  # where to look in the code


# Measured on 2026-11-29 on the project's 2-core CPU (one thread: OMP_NUM_THREADS=1, see
# docs/instructor.md), the toy preset, seed 0, the working tree of that day (stage I-creation by the
# diffusion loss alone, lr 2e-3, cosine to 0). sample.py --eval (the benchmark; its first rows):
# 4 held-out prompts x 16 images, DDIM 30 steps, so every accuracy is +-0.06; chance is 0.17 for
# colour, 0.33 for shape.
EXPERIMENTS = [
    Experiment(
        "target-v", "Train with --target v instead of the default epsilon: what changes, and why?",
        ("python train.py --stage I-creation --steps 600 --out out/exercises/eps",
         "python train.py --stage I-creation --steps 600 --target v --out out/exercises/v",
         "python sample.py --ckpt out/exercises/eps --eval --out out/exercises/eps-eval",
         "python sample.py --ckpt out/exercises/v --eval --out out/exercises/v-eval"),
        "70 s and 71 s of training (2 threads, a quiet machine); the evaluation, the whole benchmark "
        "(shapes/benchmark.py), 43 s to 64 s each",
        """Measured (the toy recipe, 600 steps, 16 images per prompt), held-out
colour / shape / both right: epsilon 0.64 / 0.41 / 0.19, v 0.64 / 0.59 / 0.34. The printed
losses are not comparable: they are errors in different spaces.
Why: the denoiser is the same frozen UNet, trained (as SD 2.1-base) to predict eps; --target v
only re-expresses its prediction, so the v loss is the eps loss re-weighted per timestep,
|v error|^2 = (1 + 1/snr) |eps error|^2: x1 at low noise, x215 at t = 999. 81% of the summed
weight sits at t >= 800, where z_t is nearly pure noise: the steps where a sampler decides the
picture's coarse layout, which shape goes where. The toy shows it as shape (0.41 -> 0.59) with
colour unchanged; over 64 images a run's standard error is about 0.06, so the difference is two
standard errors of a difference: run both with another --seed before you believe it. (On the recipe before
this one, without condition dropout, v was worse: 0.11 colour against 0.47.)
Exercises 9, 13 and 14 are the formulas; min-SNR-gamma (--min-snr-gamma 5) is the tool that
re-weights the timesteps on purpose.""",
        ("diffusion.py: Scheduler.convert, denoising_loss, min_snr_weight",)),
    Experiment(
        "whitening", "Freeze the LLM in I-creation, as the paper's stage I does (--groups "
        "dream_queries,condition_projector), and train the projector plain or whitened: what do "
        "the dream queries learn in the time the toy's default (the LLM trains too) takes?",
        ("python train.py --stage I-creation --steps 600 --groups dream_queries,condition_projector "
         "--lr 2e-3 --no-whiten --out out/exercises/plain",
         "python train.py --stage I-creation --steps 600 --groups dream_queries,condition_projector "
         "--lr 2e-3 --whiten --out out/exercises/white",
         "python sample.py --ckpt out/exercises/plain --eval --out out/exercises/plain-eval",
         "python sample.py --ckpt out/exercises/white --eval --out out/exercises/white-eval"),
        "about 2 min of training each on one thread, a minute of evaluation each (and the default "
        "run, out/exercises/eps, to compare with)",
        """Measured on 2026-12-07 (600 steps, one thread, today's backbones), held-out colour /
shape / both: the LLM frozen and the projector plain 0.17 / 0.75 / 0.14, near chance; frozen and
whitened 0.91 / 1.00 / 0.91; the default, the LLM trained and the projector plain, 0.88 / 0.97 /
0.88. Why (plumbing/whitening.py): a frozen toy LLM's states at the query positions are nearly
parallel, one shared direction that the prompt barely moves; AdamW scales each entry of the
projector alone, so the few directions that tell a colour or a shape are learnt far too slowly.
Whitening measures the states' second moment once and trains the projector in coordinates where
every direction has unit scale; it is a trick of this project, not the paper's, and works only
while the LLM is frozen. Training the LLM spreads the states itself, and over the curriculum's
2000 steps it does what whitening cannot: the LLM learns to carry which colour goes with which
shape to the queries (two shapes bound and placed 0.00 -> 0.41 to 0.64 on VALIDATION; docs/log.md,
2026-12-07, twenty-third session). None of the three binds two shapes in 600 steps.""",
        ("plumbing/whitening.py", "plumbing/recipes.py: RECIPES; train.py: make_optimizer")),
    Experiment(
        "guidance", "Sample the same run at classifier-free guidance 1, 2 and 4: what does the "
        "guidance scale buy, and what does it cost?",
        ("python sample.py --ckpt out/exercises/eps --eval --guidance 1 --out out/exercises/g1",
         "python sample.py --ckpt out/exercises/eps --eval --guidance 2 --out out/exercises/g2",
         "python sample.py --ckpt out/exercises/eps --eval --guidance 4 --out out/exercises/g4"),
        "about a minute each: the benchmark (its colour / shape / both rows are these; guidance 1 runs "
        "the UNet once per step, not twice)",
        """Measured (the 600-step run), held-out colour / shape / both: guidance 1 0.25 / 0.36 /
0.06, guidance 2 0.64 / 0.41 / 0.19, guidance 4 0.91 / 0.48 / 0.44. Look at eval_grid.png: at 1
the pictures are varied, often two shapes, in any colour; at 4 the colour is the prompt's almost
every time, but each prompt collapses towards one picture (every "a blue triangle" a small blue
ring, most "a red square"s red discs). Guidance pushes the prediction away from the null
condition's, f(null) + w (f(c) - f(null)): it trades diversity for agreement with the
condition. It works because training dropped the condition for the null one 1 time in 10 (the
toy's cond_dropout), so f(null) is an unconditional score; without that dropout, 2 was the best
scale and 4 worse. The toy samples at 2 (after 3000 steps it reaches 0.89 colour there); the
official DreamLLM at 2-3.5.""",
        ("diffusion.py: sample_cfg", "dreamllm.py: DreamLLM.null_condition")),
    Experiment(
        "read-back", "Remove the read-back: what happens to the text that follows a picture?",
        ("python train.py --stage I-comprehension --init out/exercises/eps --steps 600 "
         "--out out/exercises/comp",
         "python -m tools.exercises.read_back --ckpt out/exercises/comp --documents 48"),
        "39 s of training (the visual projector), 75 s for 3 x 48 documents",
        """tools/exercises/read_back.py writes 48 documents that open with a picture (the prompt names
nothing), three ways, and checks whether the text after it names the colour judge.analyse sees.
Measured: read back as DreamLLM does, every document names a colour, the right one 0.08 of the
time; with an empty canvas in the read slot, no document names a colour (0.00: the text goes on
"on the right"); with no read slot, every document names a colour, right 0.08. So what is read
steers the text (a blank picture changes the words), but in this toy, after stage I, it does not
yet carry the picture's colour: captions of real pictures
(an i2t layout) are right 0.08 too after 600 steps, and 0.17 (chance) after 1500 at lr 5e-3,
always the same caption ("a small purple circle at the top"). Reading back is what lets the
text refer to a written picture; it pays only once comprehension is learned (the paper's
stages II and III train the LLM itself). An open exercise: make the toy read.""",
        ("dreamllm.py: DreamLLM._dream_then_read, DreamLLM.generate", "tools/exercises/read_back.py")),
]
