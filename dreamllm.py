"""DreamLLM (Dong et al. 2023, arXiv 2309.11499): one causal LLM that reads and writes text and images.

It reads an image as N CLIP patch features, projected and spliced into its token embeddings. It writes
one by emitting <dream_start>: K learnable dream queries follow, and the LLM's final hidden states at
those K positions, projected, become the cross-attention context of a frozen Stable Diffusion UNet
(in place of SD's text encoder). Training adds SD's denoising loss to the LM loss; the frozen UNet's
score teaches the LLM to speak its language (the paper's "score distillation"):

    loss = lm_weight * CE(next token)  +  diffusion_weight * w(t) |f(unet(z_t, t, c)) - target(z_0, eps, t)|^2

Every image of a document is written as a dream slot, then a read slot: the model creates it, then reads it.

    <dream_start> <im_patch> x K <dream_end> <im_start> <im_patch> x N <im_end>
                  dream queries                         CLIP features, projected

    model = dreamllm.build("tiny")
    losses = model(model.collate([("a red circle: <image> it is red", [pil_image])]))
    segments = model.generate("a picture of a circle", force_image=True)   # [Image, " text ..."]
"""
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

import clip
import llama
import unet
from unet import DDIM, DDPM

SPECIAL_TOKENS = ["<image>", "<im_patch>", "<im_start>", "<im_end>", "<dream>", "<dream_start>", "<dream_end>"]


def byte_tokenizer() -> Tokenizer:
    # The tiny models' tokenizer: one token per UTF-8 byte (ids 0-255 = byte values), no merges, no
    # training. Bytes are shown as GPT-2's printable stand-ins so that ByteLevel can split and decode them.
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    spare = iter(range(256, 512))
    symbol = {b: chr(b) if b in printable else chr(next(spare)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])  # 256, 257
    return tok


@dataclass
class DreamConfig:
    # the loss variants, side by side: each is the one line a researcher changes
    lm_weight: float = 1.0              # LM cross-entropy weight (0: not computed)
    diffusion_weight: float = 10.0      # lambda on the diffusion loss; 10 is the official value (0: not computed)
    target: str = "epsilon"             # space the diffusion MSE is taken in: "epsilon" | "v" | "x0"
    min_snr_gamma: float | None = None  # min-SNR-gamma weighting (Hang et al. 2023), e.g. 5.0; None: uniform in t
    cond_dropout: float = 0.1           # P(an image's condition is replaced by the null one): trains CFG
    # structural: fixed when the model is built
    n_queries: int = 64                 # K dream queries per image
    clip_layer: int = -2                # the CLIP layer the LLM reads (the penultimate, as LLaVA)
    image_size: int = 512               # pixels of the images the VAE encodes and decodes (SD 2.1-base: 512)


@dataclass
class PromptFormat:
    # How a model's prompts are written: by default the toy world's plain documents, no template;
    # official.VICUNA_V1_1 is the released DreamLLM-7B's (a chat in which a given image is read, not dreamt).
    system: str | None = None           # a chat: "{system} USER: {message} ASSISTANT:"; None: the message alone
    document_system: str | None = None  # the system prompt when a document is asked for (None: `system`)
    question: str = "<image> {question}"  # answer(): the user's message, the image's place in it
    read_only_images: bool = False      # a given <image> is a read slot only (else dream slot + read slot)
    caption_sep: str = " "              # text_to_image(): between the prompt and the dream slot

    def chat(self, message, document=False):
        system = (self.document_system or self.system) if document else self.system
        return message if system is None else f"{system} USER: {message} ASSISTANT:"


class DreamLLM(nn.Module):
    def __init__(self, llm, clip, unet, vae, scheduler_config: dict, tokenizer, config: DreamConfig,
                 prompts: PromptFormat | None = None):
        super().__init__()
        if config.target not in ("epsilon", "v", "x0"):
            raise ValueError(f"DreamConfig.target {config.target!r}: must be 'epsilon', 'v' or 'x0'")
        self.llm, self.clip, self.unet, self.vae = llm, clip, unet, vae
        for frozen in (clip, unet, vae):  # never trained: CLIP is the eye, SD's score the teacher
            frozen.requires_grad_(False)
        self.config, self.scheduler_config, self.tokenizer = config, dict(scheduler_config), tokenizer
        self.prompts = prompts or PromptFormat()
        self.noise_scheduler = DDPM(scheduler_config)  # the forward process q(z_t | z_0) of training
        # rows >= n_text_vocab are the tokens DreamLLM adds (and, for a tokenizer bigger than its LLM,
        # the ones the LLM never saw): a frozen LLM's stage still trains them ("new_tokens", as LLaVA).
        # Tokens added to the tokenizer's model (the official release's 8, from 32000 on) are new too.
        self.n_text_vocab = min(llm.model.embed_tokens.weight.shape[0],
                                tokenizer.get_vocab_size(with_added_tokens=False))
        tokenizer.add_special_tokens(SPECIAL_TOKENS)   # a no-op for tokens it already has
        self.token_id = {s: tokenizer.token_to_id(s) for s in SPECIAL_TOKENS}
        self.bos_id, self.eos_id = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
        self._resize_vocab(tokenizer.get_vocab_size(with_added_tokens=True))
        v, D = clip.config.vision, llm.cfg.dim
        self.n_patches = (v.image_size // v.patch_size) ** 2  # N, tokens of a read slot (256 for ViT-L/14)
        self.visual_projector = nn.Linear(v.width, D)
        self.dream_queries = nn.Parameter(torch.randn(config.n_queries, D) * 0.02)  # (K, D)
        self.condition_projector = nn.Linear(D, unet.config.context_dim, bias=False)

    def _resize_vocab(self, n):
        # New tokens start as the average token (as LLaVA does): a neutral point, the same scale as the rest.
        emb, head = self.llm.model.embed_tokens, self.llm.lm_head
        old = emb.weight.shape[0]
        if n <= old:
            return

        def grow(w):
            mean = w.detach().float().mean(0, keepdim=True).to(w.dtype)
            return nn.Parameter(torch.cat([w.detach(), mean.expand(n - old, -1)]), requires_grad=w.requires_grad)
        emb.weight, emb.num_embeddings = grow(emb.weight), n
        if self.llm.cfg.tie_embeddings:
            self.llm.tie_weights()
        else:
            head.weight, head.out_features = grow(head.weight), n
        self.llm.cfg.vocab_size = n

    @property
    def device(self):
        return self.dream_queries.device

    # ------------------------------------------------------------------------------------------------
    # Documents -> token ids

    def _image_slots(self, read_only=False):
        t, K, N = self.token_id, self.config.n_queries, self.n_patches
        read = [t["<im_start>"]] + [t["<im_patch>"]] * N + [t["<im_end>"]]
        return read if read_only else [t["<dream_start>"]] + [t["<im_patch>"]] * K + [t["<dream_end>"]] + read

    def encode_document(self, text, n_images, read_only=False):
        # -> input_ids (T,), labels (T,): BOS, the text with each <image> expanded to its two slots, EOS
        # (read_only: to its read slot alone, as the official chat data lays out an image the user gives)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        image = self.token_id["<image>"]
        if ids.count(image) != n_images:
            raise ValueError(f"the text has {ids.count(image)} <image> placeholders but {n_images} images were given")
        input_ids, labels = [self.bos_id], [-100]  # nothing predicts BOS
        for i in ids:
            if i == image:
                slots = self._image_slots(read_only)
                # only <dream_start> is learned: where an image goes; what fills the slots is not text
                input_ids += slots
                labels += ([-100] if read_only else [slots[0]]) + [-100] * (len(slots) - 1)
            else:
                input_ids.append(i)
                labels.append(i)
        input_ids.append(self.eos_id)
        labels.append(self.eos_id)
        return torch.tensor(input_ids), torch.tensor(labels)

    def collate(self, docs):
        # docs: [(text, [PIL images])] -> a right-padded batch; images in order of appearance
        encoded = [self.encode_document(text, len(images)) for text, images in docs]
        B, T = len(docs), max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((B, T), self.eos_id)
        labels = torch.full((B, T), -100)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for b, (ids, lab) in enumerate(encoded):
            input_ids[b, :len(ids)], labels[b, :len(ids)], attention_mask[b, :len(ids)] = ids, lab, 1
        return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                    images=[im for _, images in docs for im in images])

    def clip_pixels(self, images):  # PIL images -> (n, 3, s, s), CLIP's own preprocessing; None if none
        s = self.clip.config.vision.image_size
        return torch.stack([clip.preprocess(im, s) for im in images]).to(self.device) if images else None

    def vae_pixels(self, images):  # PIL images -> (n, 3, S, S) in [-1, 1]: shortest side to S (bicubic), center crop
        S, out = self.config.image_size, []
        for im in images:
            im = im.convert("RGB")
            k = S / min(im.size)
            im = im.resize((max(S, round(im.width * k)), max(S, round(im.height * k))), Image.BICUBIC)
            left, top = (im.width - S) // 2, (im.height - S) // 2
            im = im.crop((left, top, left + S, top + S))
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(S, S, 3).permute(2, 0, 1)
            out.append(x.float() / 127.5 - 1)
        return torch.stack(out).to(self.device)

    # ------------------------------------------------------------------------------------------------
    # Embedding: token embeddings with the slots' <im_patch> rows overwritten

    def _slot_masks(self, input_ids):
        # (B, T) masks of the <im_patch> tokens inside dream slots and inside read slots
        t = self.token_id

        def inside(start, end):  # after an opening token and before its closing one
            depth = (input_ids == t[start]).cumsum(1) - (input_ids == t[end]).cumsum(1)
            return (depth > 0) & (input_ids == t["<im_patch>"])
        return inside("<dream_start>", "<dream_end>"), inside("<im_start>", "<im_end>")

    def read_features(self, clip_pixels):  # (n, 3, s, s) -> (n, N, D)
        with torch.no_grad():  # CLIP is frozen: its features are an input, like the pixels
            f = self.clip.image_features(clip_pixels, self.config.clip_layer)[:, 1:]  # (n, N, width), CLS dropped
        return self.visual_projector(f.to(self.visual_projector.weight.dtype))

    def embed(self, input_ids, clip_pixels=None):
        # (B, T) -> (B, T, D). Slots are filled in the flattened batch's order: the i-th read slot gets
        # image i; every dream slot gets the same K queries.
        K = self.config.n_queries
        x = self.llm.model.embed_tokens(input_ids)  # (B, T, D)
        dream, read = self._slot_masks(input_ids)
        if dream.any():
            n = int(dream.sum()) // K
            assert n * K == dream.sum(), "a dream slot must hold exactly n_queries <im_patch> tokens"
            x = x.masked_scatter(dream[..., None], self.dream_queries.to(x.dtype).repeat(n, 1))
        if read.any():
            features = self.read_features(clip_pixels)  # (n, N, D)
            assert features.shape[:2].numel() == read.sum(), "one image per read slot, N <im_patch> each"
            x = x.masked_scatter(read[..., None], features.to(x.dtype))
        return x

    # ------------------------------------------------------------------------------------------------
    # Training

    def forward(self, batch, generator=None):
        cfg, K, images = self.config, self.config.n_queries, batch["images"]
        input_ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        # Right padding under a causal mask: no real token ever attends to a pad, so attention_mask
        # is not needed (and SDPA keeps its fast causal path); the pads' labels are -100.
        h = self.llm.hidden_states(inputs_embeds=self.embed(input_ids, self.clip_pixels(images)))  # (B, T, D)
        lm = diffusion = torch.zeros((), device=self.device)
        if cfg.lm_weight:
            logits = self.llm.lm_head(h[:, :-1]).float()  # position i predicts token i + 1
            lm = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if cfg.diffusion_weight and images:
            dream, _ = self._slot_masks(input_ids)
            context = self.condition_projector(h[dream].view(len(images), K, -1))  # (n_images, K, C)
            diffusion = self.diffusion_loss(context, self.vae_pixels(images), generator)
        return dict(loss=cfg.lm_weight * lm + cfg.diffusion_weight * diffusion, lm=lm, diffusion=diffusion)

    def diffusion_loss(self, context, pixels, generator=None):
        # SD's denoising loss with the LLM's condition, context (n, K, C), pixels (n, 3, S, S) in [-1, 1].
        # Random draws, in this order, from `generator`: dropout, posterior sample, noise, timesteps. Or
        # `generator` is a list of one per image, each drawing its image's four: then an image's draws do
        # not depend on the batch it is in (data-parallel training splits a batch across processes).
        cfg, sched, n = self.config, self.noise_scheduler, len(context)
        with torch.no_grad():  # the VAE is frozen; a sample of the posterior, as SD was trained
            mean, logvar = self.vae.encode(pixels.to(self.vae.quant_conv.weight.dtype))
            mean, std = mean.float(), (0.5 * logvar.float()).exp()
        per_image = isinstance(generator, (list, tuple))
        assert not per_image or len(generator) == n, "one generator per image"
        draws = [self._draws(g, 1, mean.shape[1:]) for g in generator] if per_image else \
            [self._draws(generator, n, mean.shape[1:])]
        drop, post, eps, t = (torch.cat(d).to(self.device) for d in zip(*draws))
        z0 = self.vae.scaling_factor * (mean + std * post)  # a sample of the posterior: (n, 4, h, w)
        if cfg.cond_dropout > 0:  # CFG needs the unconditional score too. Computed even when nothing was
            # dropped, so that every process of an FSDP run runs the LLM as often (and calls its collectives)
            context = torch.where(drop[:, None, None].to(self.device), self.null_condition().to(context.dtype), context)
        z_t = sched.add_noise(z0, eps, t)  # sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
        dtype = self.unet.conv_in.weight.dtype
        out = self.unet(z_t.to(dtype), t, context.to(dtype))  # frozen, but gradients pass through to the context
        with torch.autocast(self.device.type, enabled=False):  # scheduler math in fp32
            out = out.float()
            abar = sched.alphas_cumprod.to(self.device)[t].view(-1, 1, 1, 1)
            a, s = abar.sqrt(), (1 - abar).sqrt()
            # the UNet predicts in its own space (prediction_type); convert to the space of the loss
            native = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}[sched.prediction_type]
            if cfg.target == native:
                pred = out
            else:
                x0_hat, eps_hat = sched.predict_x0_eps(out, abar, z_t)
                pred = {"epsilon": eps_hat, "x0": x0_hat, "v": a * eps_hat - s * x0_hat}[cfg.target]
            target = {"epsilon": eps, "x0": z0, "v": a * eps - s * z0}[cfg.target]  # v: Salimans & Ho 2022
            mse = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (n,)
            if cfg.min_snr_gamma is not None:
                # min-SNR-gamma: the x0-space weight min(snr, gamma), divided by what the target's MSE
                # already carries (|eps err|^2 = snr |x0 err|^2, |v err|^2 = (snr + 1) |x0 err|^2)
                snr = abar.flatten() / (1 - abar.flatten())
                clipped = snr.clamp(max=cfg.min_snr_gamma)
                mse = mse * {"epsilon": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[cfg.target]
            return mse.mean()

    def _draws(self, generator, n, latent_shape):  # n dropouts, posterior samples, noises, timesteps: in this order
        gdev = generator.device if generator is not None else "cpu"  # on the generator's device
        drop = torch.rand(n, generator=generator, device=gdev) < self.config.cond_dropout
        post, eps = (torch.randn(n, *latent_shape, generator=generator, device=gdev) for _ in range(2))
        t = torch.randint(0, self.noise_scheduler.num_train_timesteps, (n,), generator=generator, device=gdev)
        return drop, post, eps, t

    def dream_states(self, prompt=""):
        # BOS + prompt + a forced dream slot -> the K queries' final hidden states (1, K, D).
        # The separator: training documents read "caption <image>" and the tokenizer splits at <image>; the
        # official model's captions were followed by the dream slot directly (its caption_sep is "").
        t, K = self.token_id, self.config.n_queries
        text = prompt.rstrip() + self.prompts.caption_sep if prompt.strip() else ""
        ids = self.encode_document(text, 0)[0][:-1].tolist() + [t["<dream_start>"]] + [t["<im_patch>"]] * K
        return self.llm.hidden_states(inputs_embeds=self.embed(torch.tensor([ids], device=self.device)))[:, -K:]

    def condition(self, prompt=""):
        # the dream queries' states, projected: (1, K, C). Differentiable: training uses it for the null.
        return self.condition_projector(self.dream_states(prompt))

    def null_condition(self):
        # The CFG null, (1, K, C): the dream queries after an empty prompt, BOS <dream_start>. (<dream_end>
        # comes after the queries, so under causal attention it cannot change them.)
        return self.condition("")

    def trainable_groups(self):
        # what a training stage may choose to train; CLIP, the VAE and the UNet are in none.
        # "new_tokens" holds whole matrices (shared with "llm"): a trainer masks their gradient to
        # the rows >= n_text_vocab when it trains them without the LLM.
        emb, head = self.llm.model.embed_tokens.weight, self.llm.lm_head.weight
        return {"dream_queries": [self.dream_queries],
                "condition_projector": list(self.condition_projector.parameters()),
                "visual_projector": list(self.visual_projector.parameters()),
                "new_tokens": [emb] if self.llm.cfg.tie_embeddings else [emb, head],
                "llm": list(self.llm.parameters())}

    def _trained_tensors(self, groups):
        # name -> (parameter, first row saved): what a stage trained, by the name it is saved under
        out, n = {}, self.n_text_vocab
        for group in groups:
            if group == "new_tokens":  # only the new rows: the old ones are the pretrained LLM's
                out["new_tokens.embed_tokens"] = (self.llm.model.embed_tokens.weight, n)
                if not self.llm.cfg.tie_embeddings:
                    out["new_tokens.lm_head"] = (self.llm.lm_head.weight, n)
            elif group in self.trainable_groups():
                out |= {k: (p, 0) for k, p in self.named_parameters() if k == group or k.startswith(group + ".")}
            else:
                raise ValueError(f"unknown group {group!r} (have {', '.join(self.trainable_groups())})")
        return out

    def trained_state(self, groups):  # -> {name: CPU tensor}, e.g. "dream_queries", "new_tokens.lm_head"
        return {k: p.detach()[row:].cpu().clone() for k, (p, row) in self._trained_tensors(groups).items()}

    @torch.no_grad()
    def load_trained_state(self, state):
        # the inverse of trained_state, strict: every name must be known and every shape must match
        known = self._trained_tensors(self.trainable_groups())
        for k, v in state.items():
            if k not in known:
                raise ValueError(f"trained state: unknown tensor {k!r} (not a tensor of this model's groups)")
            p, row = known[k]
            if v.shape != p[row:].shape:
                raise ValueError(f"trained state: {k} is {tuple(v.shape)}, this model's is {tuple(p[row:].shape)}")
            p[row:].copy_(v)

    # ------------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def sample_images(self, context, steps=50, guidance=7.5, sampler="ddim", generator=None, progress=True):
        # context (n, K, C) -> n PIL images: the frozen SD draws them, the null condition for CFG
        null = None if guidance == 1 else self.null_condition()
        return sample_cfg(self.unet, self.vae, self.scheduler_config, context, null, self.config.image_size,
                          steps, guidance, sampler, generator, progress)

    @torch.no_grad()
    def generate(self, text, images=(), max_new_tokens=64, temperature=0.0, top_p=1.0, guidance=7.5, steps=50,
                 sampler="ddim", generator=None, force_image=False, max_images=4, progress=True, read_only=False):
        # Continues `text` into a document: a list of str and PIL images. Given images (one per <image>
        # in the text) are laid out exactly as in training, dream slot + read slot, the only way the
        # model has seen images; the queries' outputs are simply not used. `max_new_tokens` counts the
        # sampled tokens (<dream_start> included), not the slots. read_only: the given images get a read
        # slot only (the official chat format).
        t, K, N, llm = self.token_id, self.config.n_queries, self.n_patches, self.llm
        images = list(images)
        ids = self.encode_document(text, len(images), read_only)[0][:-1].to(self.device)  # BOS + prompt, no EOS
        cache = llm.new_cache()
        h = llm.hidden_states(inputs_embeds=self.embed(ids[None], self.clip_pixels(images)), cache=cache)[:, -1]
        # tokens never learned as labels (BOS, slot internals) are never written
        banned = [self.bos_id] + [t[s] for s in SPECIAL_TOKENS if s != "<dream_start>"]
        segments, text_ids, n_images = [], [], 0

        def flush():
            if text_ids:
                segments.append(self.tokenizer.decode(text_ids))
                text_ids.clear()
        for i in range(max_new_tokens):
            logits = llm.lm_head(h).float()  # (1, vocab)
            logits[:, banned] = float("-inf")
            if n_images >= max_images:
                logits[:, t["<dream_start>"]] = float("-inf")
            forced = force_image and i == 0
            token = t["<dream_start>"] if forced else llama.sample(logits, temperature, top_p, generator).item()
            if token == self.eos_id:
                break
            if token != t["<dream_start>"]:
                text_ids.append(token)
                h = llm.hidden_states(torch.tensor([[token]], device=self.device), cache=cache)[:, -1]
                continue
            # the model put an image here: run the queries, dream the image ...
            flush()
            dream = torch.tensor([[t["<dream_start>"]] + [t["<im_patch>"]] * K], device=self.device)
            hq = llm.hidden_states(inputs_embeds=self.embed(dream), cache=cache)[:, 1:]  # (1, K, D)
            image = self.sample_images(self.condition_projector(hq), steps, guidance, sampler, generator, progress)[0]
            segments.append(image)
            n_images += 1
            # ... then read it back through CLIP, so that the text after it can refer to it
            read = [t["<dream_end>"], t["<im_start>"]] + [t["<im_patch>"]] * N + [t["<im_end>"]]
            x = self.embed(torch.tensor([read], device=self.device), self.clip_pixels([image]))
            h = llm.hidden_states(inputs_embeds=x, cache=cache)[:, -1]
        flush()
        return segments

    @torch.no_grad()
    def text_to_image(self, prompt, num_images=1, **sampling):
        # one condition, num_images noises (batched)
        return self.sample_images(self.condition(prompt).expand(num_images, -1, -1), **sampling)

    def answer(self, image, question, **generate_kw):
        # image -> text: the document "<image> question" continued (data.py's Q&A form), no images written;
        # or, with a chat format, the question asked in it
        p = self.prompts
        text = p.chat(p.question.format(question=question))
        segments = self.generate(text, [image], max_images=0, read_only=p.read_only_images, **generate_kw)
        return "".join(segments).strip()


@torch.no_grad()
def sample_cfg(denoiser, vae, scheduler_config, context, null, image_size, steps=50, guidance=7.5, sampler="ddim",
               generator=None, progress=True, desc="dreaming"):
    # Stable Diffusion's sampling loop, by DDIM or DDPM with classifier-free guidance (Ho & Salimans 2022):
    # context (n, S, C) and the null condition (1, S, C) -> n PIL images. DreamLLM's conditions and plain
    # SD's text features (official.py) both go through it. guidance 1: the conditional branch alone.
    n = len(context)
    sched = {"ddim": DDIM, "ddpm": DDPM}[sampler](scheduler_config)
    sched.set_timesteps(steps)
    h = image_size // 2 ** (len(vae.config.channels) - 1)  # the VAE halves per level but the last
    z = _randn(torch.empty(n, vae.config.latent_channels, h, h, device=context.device), generator)  # z_T ~ N(0, I)
    dtype = denoiser.conv_in.weight.dtype
    cond = context if guidance == 1 else torch.cat([null.expand(n, -1, -1), context])  # one batch: (null, cond)
    for t in tqdm(sched.timesteps, desc=desc, disable=None if progress else True, leave=False):
        out = denoiser((z if guidance == 1 else torch.cat([z, z])).to(dtype), t, cond.to(dtype)).float()
        if guidance != 1:
            null_out, cond_out = out.chunk(2)
            out = null_out + guidance * (cond_out - null_out)
        z = sched.step(out, t, z, generator=generator)
    return to_pil(vae.decode((z / vae.scaling_factor).to(vae.quant_conv.weight.dtype)))  # about [-1, 1]


def _randn(like, generator):
    # N(0, I) shaped like `like`, drawn on the generator's device (a CPU generator reproduces anywhere)
    device = generator.device if generator is not None else "cpu"
    return torch.randn(like.shape, generator=generator, device=device).to(like.device)


def to_pil(x):  # (n, 3, H, W) in [-1, 1] -> n PIL images
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy()) for a in x]


PRESETS = {
    # random backbones in memory, in well under a second: tests, and the pipeline anywhere.
    # LLaMA dim 64 = CLIP width 64 = UNet context 64 (the projectors would bridge any widths);
    # 32 px CLIP (16 patches); a 4x VAE: 64 px images, 16 x 16 latents.
    "tiny": dict(llm="tiny", clip="clip-tiny-vision", sd="tiny", config=DreamConfig(n_queries=8, image_size=64)),
    # the shapes world's own pretrained backbones, loaded from weights/toy/ (python -m weights.train_toy):
    # a 4-layer LLaMA (dim 192), a 64 px CLIP (64 patches), a 4x VAE and a UNet with 128-wide context
    "toy": dict(folder=Path(__file__).resolve().parent / "weights" / "toy",
                config=DreamConfig(n_queries=8, image_size=64)),
    # the released DreamLLM-7B (Vicuna-7B + CLIP ViT-L/14 + SD 2.1-base), as weights/download.py writes
    # it (python -m weights.download dreamllm-7b-chat); official.py reads its files
    "dreamllm-7b": dict(official=Path(__file__).resolve().parent / "weights" / "dreamllm-7b-chat"),
    "dreamllm-7b-aesthetic": dict(official=Path(__file__).resolve().parent / "weights" / "dreamllm-7b-chat-aesthetic"),
}
TOY_PARTS = ["tokenizer.json", "llm/config.json", "clip/config.json", "vae/config.json", "unet/config.json",
             "scheduler/scheduler_config.json"]


def build(preset="tiny", seed=0, **config) -> DreamLLM:
    # A preset with random init from `seed` (the global RNG is left as it was); `config` overrides
    # DreamConfig fields, e.g. build("tiny", target="v", min_snr_gamma=5.0).
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (have {', '.join(PRESETS)})")
    p = PRESETS[preset]
    if "official" in p:  # nothing random: every tensor is the release's (bf16 on the CPU; see official.py)
        import official
        return official.load_official(p["official"], **config)
    config = replace(p["config"], **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if "folder" not in p:
            sd = unet.PRESETS[p["sd"]]
            return DreamLLM(llama.build(p["llm"]), clip.build(p["clip"]), unet.build_unet(sd), unet.build_vae(sd),
                            sd["scheduler"], byte_tokenizer(), config)
        folder = p["folder"]  # backbones from files; only DreamLLM's own parts are initialised from `seed`
        if missing := [f for f in TOY_PARTS if not (folder / f).is_file()]:
            raise FileNotFoundError(f"preset {preset!r}: {folder / missing[0]} is missing; "
                                    "make the toy backbones with `python -m weights.train_toy`")
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return DreamLLM(llama.load(folder / "llm"), clip.load(folder / "clip"), unet.load_unet(folder / "unet"),
                        unet.load_vae(folder / "vae"), scheduler, Tokenizer.from_file(str(folder / "tokenizer.json")),
                        config)
