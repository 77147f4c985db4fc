"""DreamLLM (Dong et al. 2023, arXiv 2309.11499): one causal LLM that reads and writes text and
images.

It reads an image as N CLIP patch features, projected and spliced into its token embeddings. It
writes one by emitting <dream_start>: K learnable dream queries follow, and the LLM's final hidden
states at those K positions, projected, become the cross-attention context of a frozen Stable
Diffusion UNet, in place of SD's text encoder (sec. 3.1). Training adds SD's denoising loss to the
LM loss: the frozen UNet's score teaches the LLM to speak its language ("score distillation"):

    L = w_lm CE(next token)  +  w_diffusion |f(unet(z_t, t, c)) - target(z_0, eps, t)|^2

forward() returns the terms unweighted (lm and diffusion; align and anchor where asked), and a
training stage picks their weights (plumbing/recipes.py's STAGES; train.step_loss sums them). The
peers' objective, alignment to the text encoder's states, is a DreamConfig choice beside it
(plumbing/alignment.py). Every image of a document is written as a dream slot, then a read slot: the
model creates it, then reads it back.

    <dream_start> <im_patch> x K <dream_end> <im_start> <im_patch> x N <im_end>
                  dream queries                         CLIP features, projected

    model = dreamllm.build("tiny")
    batch = model.collate([("a red circle: <image> it is red", [pil_image])])   # tensors
    losses = model(**batch, draws=model.draw_noise([torch.Generator().manual_seed(0)]))
    segments = model.generate("a picture of a circle", force_image=True)   # [Image, " text ..."]
"""
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import clip
import diffusion
import llama
import unet
from plumbing import alignment

SPECIAL_TOKENS = ["<image>", "<im_patch>", "<im_start>", "<im_end>", "<dream>", "<dream_start>",
                  "<dream_end>"]
# DreamConfig's choices
OBJECTIVES, BRIDGES, LM_MEANS = ("score", "align", "both"), ("projector", "mapper"), ("token", "example")
# what a training stage may train (trainable_groups); CLIP, the VAE and the UNet are in none
GROUPS = ("dream_queries", "condition_projector", "visual_projector", "new_tokens", "llm")
# How an example of each kind is laid out, as the official data builder does (omni/data/builders/
# builder_dreamllm.py): what each <image> of the text and of the reply becomes (a dream slot, a read
# slot, or both: create it, then read it back), and which text carries LM labels ("text": all of it,
# with each <dream_start>; "reply": the replies only, as the user's turns are not the model's to
# learn; "none": nothing). A chat may hold several turns, each reply ended by EOS (Vicuna's "</s>");
# an image in a reply is one the assistant makes (the official chats' <dream>), none of its slot
# tokens learned, as the official conversations label none.
LAYOUTS = {
    "t2i": ("dream", None, "none"),     # an image-text pair, creation: BOS caption <dream slot> EOS
    "i2t": ("read", None, "text"),      # an image-text pair, comprehension: BOS <read slot> caption EOS
    "chat": ("read", "dream+read", "reply"),  # a conversation (VQA): the user's image read, replies learned
    "document": ("dream+read", None, "text"),  # an interleaved document (MMC4): I-GPT
    "instruct": ("dream+read", "dream+read", "reply"),  # SFT on documents: the instruction not learned
}


def check_text(text):
    # A person writes <image> where an image goes; the slot tokens, BOS and EOS are the model's own,
    # laid out by encode_document. Typed into a prompt or a document, they would forge a slot.
    if forged := [s for s in SPECIAL_TOKENS[1:] + ["<s>", "</s>"] if s in text]:
        raise ValueError(f"the text holds {forged[0]}, a token the model writes itself; refused "
                         "(only <image> may be typed, where an image goes)")


def turns_of(text, reply):
    # an example's text and reply -> (texts, replies), a list of each: a chat of several turns
    # gives lists of one length, every reply but the last written (the official chats end each
    # reply with </s>; an empty one has none)
    if not isinstance(text, list):
        return [text], [reply]
    if not isinstance(reply, list) or len(reply) != len(text) or not text:
        raise ValueError("a chat of several turns: text and reply must be lists of one length, "
                         "the user's turns and the replies")
    if any(not r for r in reply[:-1]):
        raise ValueError("a chat of several turns: only the last reply may be empty")
    return text, reply


def byte_tokenizer() -> Tokenizer:
    # The tiny models' tokenizer: one token per UTF-8 byte (ids 0-255 = byte values), no merges, no
    # training. Bytes are shown as GPT-2's printable stand-ins: ByteLevel splits and decodes them.
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
    # the diffusion loss's variants, side by side: each is the one line a researcher changes
    # (the weights of the loss's terms belong to a training stage: plumbing/recipes.py's STAGES)
    target: str = "epsilon"             # the space of the diffusion MSE: "epsilon" | "v" | "x0"
    min_snr_gamma: float | None = None  # min-SNR-gamma weighting (Hang et al. 2023), e.g. 5.0
    cond_dropout: float = 0.0           # P(an image's condition -> a null one), e.g. 0.1; the
                                        # release was trained without (no official config sets it)
    dropout_null: str = "patches"       # that null: the LLM's states over the raw <im_patch>
                                        # embeddings (official) | "queries": over the dream queries
                                        # after an empty prompt, the null CFG samples with
    lm_mean: str = "token"              # the LM loss: a mean over the batch's labelled tokens
                                        # (official, LLaVA's) | "example": of each example's mean,
                                        # so a 2-token answer weighs as much as a document
    # the creation objective (plumbing/alignment.py; `python -m tools.sweep objective` compares
    # them). The stage's diffusion weight weighs the creation loss: w (diffusion + align_weight *
    # align), each term as the objective has it
    objective: str = "score"            # "score": SD's denoising loss through the frozen UNet
                                        # (DreamLLM) | "align": the condition regressed onto the
                                        # text encoder's states of the caption (GILL) | "both"
    align_weight: float = 1.0           # the alignment's weight beside the denoising loss's
    align_distance: str = "mse"         # "mse" | "cosine" (1 - cos per token state)
    # structural: fixed when the model is built
    bridge: str = "projector"           # the UNet reads the K projected states (DreamLLM) |
                                        # "mapper": GILL's, L states shaped as the text encoder's
    n_queries: int = 64                 # K dream queries per image
    clip_layer: int = -2                # the CLIP layer the LLM reads (the penultimate, as LLaVA)
    image_size: int = 512               # pixels of the images the VAE encodes and decodes


@dataclass
class PromptFormat:
    # How a model's prompts are written: by default the toy world's plain text, no template;
    # official.VICUNA_V1_1 is the released DreamLLM-7B's.
    system: str | None = None           # a chat: "{system} USER: {message} ASSISTANT:"; None: bare
    question: str = "<image> {question}"  # answer(): the user's message, the image's place in it
    caption_sep: str = " "              # text_to_image(): between the prompt and the dream slot

    def turns(self, messages, replies):
        # a chat of len(messages) turns -> (texts, replies), as encode_document takes them: Vicuna's
        # "{system} USER: {m0} ASSISTANT: {r0}</s>USER: {m1} ASSISTANT: {r1}</s>", the </s> EOS; the
        # last reply may be "" (the model writes it) or its opening words (a VQA post-prompt)
        if self.system is None:
            return list(messages), list(replies)
        texts = [("" if i else f"{self.system} ") + f"USER: {m} ASSISTANT:" for i, m in enumerate(messages)]
        return texts, [f" {r}" if r else "" for r in replies]

    def chat(self, message):  # one turn, the reply to come: a str
        return self.turns([message], [""])[0][0]


class DreamLLM(nn.Module):
    def __init__(self, llm, clip, unet, vae, scheduler_config: dict, tokenizer, config: DreamConfig,
                 prompts: PromptFormat | None = None):
        super().__init__()
        if config.target not in diffusion.SPACES:
            raise ValueError(f"DreamConfig.target {config.target!r}: one of {diffusion.SPACES}")
        for field, allowed in (("objective", OBJECTIVES), ("bridge", BRIDGES),
                               ("lm_mean", LM_MEANS),
                               ("align_distance", alignment.DISTANCES)):
            if getattr(config, field) not in allowed:
                raise ValueError(f"DreamConfig.{field} {getattr(config, field)!r}: one of {allowed}")
        if config.objective != "score" and config.bridge != "mapper":
            raise ValueError(f"objective {config.objective!r} compares the condition with the text "
                             "encoder's states, which needs bridge 'mapper' (--bridge mapper)")
        if config.bridge == "mapper" and clip.config.text is None:
            raise ValueError("bridge 'mapper' is shaped as CLIP's text states, and this CLIP has no "
                             "text tower (a preset with one: toy, tiny-text)")
        self.llm, self.clip, self.unet, self.vae = llm, clip, unet, vae
        for frozen in (clip, unet, vae):  # never trained: CLIP is the eye, SD's score the teacher
            frozen.requires_grad_(False)
        self.config, self.tokenizer = config, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.prompts = prompts or PromptFormat()
        self.noise_scheduler = diffusion.DDPM(scheduler_config)  # q(z_t | z_0) of training
        # Rows >= n_text_vocab are the tokens DreamLLM adds (and, for a tokenizer bigger than its
        # LLM, the ones the LLM never saw): the group "new_tokens" trains them alone, as LLaVA can
        # (no stage of ours does; a recipe's groups may name it). Tokens added to the tokenizer's
        # model (the release's 8, from 32000) are new too.
        self.n_text_vocab = min(llm.model.embed_tokens.weight.shape[0],
                                tokenizer.get_vocab_size(with_added_tokens=False))
        tokenizer.add_special_tokens(SPECIAL_TOKENS)   # a no-op for tokens it already has
        self.token_id = {s: tokenizer.token_to_id(s) for s in SPECIAL_TOKENS}
        self.bos_id, self.eos_id = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
        self._resize_vocab(tokenizer.get_vocab_size(with_added_tokens=True))
        v, D = clip.config.vision, llm.cfg.dim
        self.n_patches = (v.image_size // v.patch_size) ** 2  # N per read slot (256 for ViT-L/14)
        self.visual_projector = nn.Linear(v.width, D)
        self.dream_queries = nn.Parameter(torch.randn(config.n_queries, D) * 0.02)  # (K, D)
        self.condition_projector = nn.Linear(D, unet.config.context_dim, bias=False)
        self.condition_mapper = None if config.bridge == "projector" else \
            alignment.Mapper(unet.config.context_dim, clip.config.text.n_positions)

    def _resize_vocab(self, n):
        # New tokens start as the average token (as LLaVA does): a neutral point, the usual scale.
        emb, head = self.llm.model.embed_tokens, self.llm.lm_head
        old = emb.weight.shape[0]
        if n <= old:
            return

        def grow(w):
            mean = w.detach().float().mean(0, keepdim=True).to(w.dtype)
            grown = torch.cat([w.detach(), mean.expand(n - old, -1)])
            return nn.Parameter(grown, requires_grad=w.requires_grad)
        emb.weight, emb.num_embeddings = grow(emb.weight), n
        if self.llm.cfg.tie_embeddings:
            self.llm.tie_weights()
        else:
            head.weight, head.out_features = grow(head.weight), n
        self.llm.cfg.vocab_size = n

    @property
    def device(self):
        return self.dream_queries.device

    @property
    def latent_shape(self):  # (4, h, w) of an image's latent: the VAE halves per level but the last
        h = self.config.image_size // 2 ** (len(self.vae.config.channels) - 1)
        return (self.vae.config.latent_channels, h, h)

    # --------------------------------------------------------------------------------------------
    # Documents -> token ids and pixels: the data pipeline's side of the model

    def dream_slot(self):  # <dream_start> <im_patch> x K <dream_end>: the K dream queries go inside
        tok = self.token_id
        K = self.config.n_queries
        return [tok["<dream_start>"]] + [tok["<im_patch>"]] * K + [tok["<dream_end>"]]

    def read_slot(self):  # <im_start> <im_patch> x N <im_end>: N projected CLIP features go inside
        tok = self.token_id
        return [tok["<im_start>"]] + [tok["<im_patch>"]] * self.n_patches + [tok["<im_end>"]]

    def encode_document(self, text, n_images, layout="document", reply=""):
        # -> input_ids (T,), labels (T,) of one example: BOS, the text, the reply (chat, instruct),
        # EOS, each <image> expanded to the slots its layout gives it (LAYOUTS); -100: no label.
        # A chat of several turns: text and reply are lists, the user's turns and the replies
        # (PromptFormat.turns), each reply ended by EOS; the last reply "" leaves it to the model.
        # The parts are tokenized as one string, as the official code does, and each token labelled
        # by the part it starts in (SentencePiece spells a part's leading space with its first word).
        text_slots, reply_slots, learn = LAYOUTS[layout]
        texts, replies = turns_of(text, reply)
        joined, parts = "", []  # parts: (where it starts in joined, its slots, learned?)
        for turn, (t, r) in enumerate(zip(texts, replies)):
            joined += "</s>" if turn else ""  # the reply before ends: EOS, learned with the reply
            for part, slots, labelled in ((t, text_slots, learn == "text"),
                                          (r, reply_slots, learn in ("text", "reply"))):
                parts += [(len(joined), slots, labelled)] if part else []
                joined += part
        check_text(" ".join(t + r for t, r in zip(texts, replies)))  # none forged across two parts
        if (found := joined.count("<image>")) != n_images:
            raise ValueError(f"the text has {found} <image> placeholders but {n_images} images were "
                             "given")
        input_ids, labels = [self.bos_id], [-100]  # nothing predicts BOS
        encoded = self.tokenizer.encode(joined, add_special_tokens=False) if joined else None
        for i, (at, _) in zip(encoded.ids, encoded.offsets) if encoded else ():
            _, slots, labelled = max(p for p in parts if p[0] <= at)
            if i != self.token_id["<image>"]:
                input_ids.append(i)
                labels.append(i if labelled else -100)
                continue
            # of the slots only <dream_start> is learned, in a document's labelled text: where an
            # image goes (a chat's reply learns none, as the official conversations)
            dream = self.dream_slot() if "dream" in slots else []
            read = self.read_slot() if "read" in slots else []
            input_ids += dream + read
            first = [dream[0] if labelled and layout != "chat" else -100] if dream else []
            labels += first + [-100] * (len(dream) + len(read) - len(first))
        input_ids.append(self.eos_id)
        labels.append(self.eos_id if learn != "none" else -100)
        return torch.tensor(input_ids), torch.tensor(labels)

    @staticmethod
    def image_slots(text, layout, reply=""):
        # -> the slots of each image of an example, in order: "dream", "read" or "dream+read"
        text_slots, reply_slots, _ = LAYOUTS[layout]
        texts, replies = turns_of(text, reply)
        return [slots for t, r in zip(texts, replies)
                for part, slots in ((t, text_slots), (r, reply_slots)) for _ in range(part.count("<image>"))]

    def collate(self, examples, diffusion=True, flips=None):
        # examples [(text, [PIL images], layout, reply)], or documents [(text, [PIL images])] -> a
        # batch of tensors on the CPU: input_ids and labels (B, T), right-padded; clip_pixels
        # (n_read, 3, s, s), CLIP's input for the read slots; vae_pixels (n_dream, 3, S, S) in
        # [-1, 1], the images of the dream slots, which the diffusion loss is taken on (left out when
        # it is not computed), mirrored where `flips` (one bool each) says. Images in order.
        examples = [(*e, "document", "") if len(e) == 2 else e for e in examples]
        encoded = [self.encode_document(text, len(ims), layout, reply)
                   for text, ims, layout, reply in examples]
        B, T = len(examples), max(len(ids) for ids, _ in encoded)
        input_ids, labels = torch.full((B, T), self.eos_id), torch.full((B, T), -100)
        for b, (ids, lab) in enumerate(encoded):
            input_ids[b, :len(ids)], labels[b, :len(ids)] = ids, lab
        slots = [(im, s) for text, ims, layout, reply in examples
                 for im, s in zip(ims, self.image_slots(text, layout, reply))]
        read = [im for im, s in slots if "read" in s]
        dream = [im for im, s in slots if "dream" in s]
        batch = dict(input_ids=input_ids, labels=labels, clip_pixels=self.clip_pixels(read))
        if diffusion and dream:
            flips = flips or [False] * len(dream)
            batch["vae_pixels"] = torch.stack([unet.preprocess(im, self.config.image_size, flip)
                                               for im, flip in zip(dream, flips)])
        return batch

    def clip_pixels(self, images):  # PIL images -> (n, 3, s, s), CLIP's preprocessing; None if none
        s = self.clip.config.vision.image_size
        return torch.stack([clip.preprocess(im, s) for im in images]) if images else None

    def draw_noise(self, generators):
        # the diffusion loss's random draws, one image per generator (see diffusion.draw_noise)
        T = self.noise_scheduler.num_train_timesteps
        return diffusion.draw_noise(generators, self.latent_shape, T, self.config.cond_dropout)

    # --------------------------------------------------------------------------------------------
    # Embedding: token embeddings with the slots' <im_patch> rows overwritten

    def slot_masks(self, input_ids):
        # (B, T) masks of the <im_patch> tokens inside dream slots and inside read slots
        tok = self.token_id

        def inside(start, end):  # after an opening token and before its closing one
            depth = (input_ids == tok[start]).cumsum(1) - (input_ids == tok[end]).cumsum(1)
            return (depth > 0) & (input_ids == tok["<im_patch>"])
        return inside("<dream_start>", "<dream_end>"), inside("<im_start>", "<im_end>")

    def read_features(self, clip_pixels):  # (n, 3, s, s) -> (n, N, D)
        with torch.no_grad():  # CLIP is frozen: its features are an input, like the pixels
            pixels = clip_pixels.to(self.device)
            f = self.clip.image_features(pixels, self.config.clip_layer)[:, 1:]  # (n, N, width)
        return self.visual_projector(f.to(self.visual_projector.weight.dtype))

    def embed(self, input_ids, clip_pixels=None, queries=True):
        # (B, T) -> (B, T, D). Slots are filled in the flattened batch's order: the i-th read slot
        # gets image i; every dream slot gets the same K queries (queries=False: left as they are)
        K = self.config.n_queries
        x = self.llm.model.embed_tokens(input_ids)  # (B, T, D)
        dream, read = self.slot_masks(input_ids)
        if dream.any() and queries:
            n = int(dream.sum()) // K
            assert n * K == dream.sum(), "a dream slot holds exactly n_queries <im_patch> tokens"
            x = x.masked_scatter(dream[..., None], self.dream_queries.to(x.dtype).repeat(n, 1))
        if read.any():
            features = self.read_features(clip_pixels)  # (n, N, D)
            assert features.shape[:2].numel() == read.sum(), "one image per read slot, N each"
            x = x.masked_scatter(read[..., None], features.to(x.dtype))
        return x

    # --------------------------------------------------------------------------------------------
    # Training: the losses

    def forward(self, input_ids, labels, clip_pixels=None, vae_pixels=None, draws=None, captions=None,
                anchor=None):
        # -> dict(lm, diffusion[, align][, anchor]): the losses, unweighted (a stage weighs them)
        #   lm:        CE of the next token, over the tokens with a label
        #   diffusion: |f(unet(z_t, t, c)) - target|^2, c the dream queries' final states,
        #              projected (the UNet's context, to_context);
        #              draws: draw_noise()'s random draws for the n images of vae_pixels (the
        #              dropout coin, the posterior's sample, eps and t)
        #   align:     distance(c, E(caption)) over the dream slots `captions` = (slots, texts)
        #              names, the null condition with them (alignment_loss)
        #   anchor:    |c - c_0|^2 over the dream slots `anchor` = (slots, c_0) names (train.py)
        # The toy's shapes (stage II, up to 8 rows of pairs and documents): input_ids (8, T <= 256);
        # h (8, T, 192); an image written is K = 8 queries, so c is (n, 8, 128), the toy UNet's
        # context; z_t (n, 4, 16, 16). The diffusion loss's gradient runs back through the frozen
        # UNet's cross-attention to c, through the condition projector, down the LLM's layers to
        # the dream queries spliced in at the slots (embed): everything on that path learns from
        # SD's score, nothing of SD itself does.
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        # Right padding under a causal mask: no real token ever attends to a pad, so no attention
        # mask is needed (and SDPA keeps its fast causal path); the pads' labels are -100.
        h = self.llm.hidden_states(inputs_embeds=self.embed(input_ids, clip_pixels))  # (B, T, D)
        zero = torch.zeros((), device=self.device)
        losses = dict(lm=zero, diffusion=zero)
        if (labels[:, 1:] != -100).any():
            logits = self.llm.lm_head(h[:, :-1]).float()  # position i predicts token i + 1
            ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                 reduction="none")  # (B, T - 1), 0 where no label
            n = (labels[:, 1:] != -100).sum(1)  # (B,) labelled tokens per example
            losses["lm"] = ce.sum() / n.sum() if self.config.lm_mean == "token" else \
                (ce.sum(1)[n > 0] / n[n > 0]).mean()
        if vae_pixels is None and captions is None:
            return losses
        context = self.slot_conditions(input_ids, h=h)  # (n, K, C), or (n, L, C) through a mapper
        # condition dropout's null and the alignment's are one where the dropped condition is the
        # queries after "" (DreamConfig.dropout_null): computed once
        shared = vae_pixels is not None and captions is not None and self.config.cond_dropout > 0
        null = self.null_condition() if shared and self.config.dropout_null == "queries" else None
        if vae_pixels is not None:
            losses["diffusion"] = self.diffusion_loss(context, vae_pixels, draws, null)
        if captions is not None:
            slots, texts = captions
            losses["align"] = self.alignment_loss(context[slots.to(self.device)], texts, null)
        if anchor is not None:  # (slots (m,), target (m, K, C)): an MSE holds those slots there
            slots, target = anchor
            losses["anchor"] = F.mse_loss(context[slots.to(self.device)].float(),
                                          target.to(self.device).float())
        return losses

    def slot_conditions(self, input_ids, clip_pixels=None, h=None):
        # (B, T) -> (n, K, C): every dream slot's K queries, their final states projected, in the
        # batch's order (h: the LLM's final states for these ids, (B, T, D), where the caller has them)
        if h is None:
            h = self.llm.hidden_states(inputs_embeds=self.embed(input_ids.to(self.device), clip_pixels))
        dream, _ = self.slot_masks(input_ids.to(self.device))
        return self.to_context(h[dream].view(-1, self.config.n_queries, h.shape[-1]))

    def to_context(self, states):
        # (n, K, D) dream queries' final states -> the UNet's context: (n, K, C) projected, or
        # (n, L, C), the text encoder's shape, through GILL's mapper (bridge "mapper")
        c = self.condition_projector(states)
        return c if self.condition_mapper is None else self.condition_mapper(c)

    def alignment_loss(self, context, captions, null=None):
        # The peers' objective: the conditions (m, L, C) of pairs written against E(caption), the
        # frozen text encoder's states of their captions. Where the denoising loss drops a
        # condition for the null (cond_dropout), the null is aligned to E(""), SD's own null, at
        # that rate: what classifier-free guidance samples with.
        p = self.config.cond_dropout
        target = self.text_states([*captions, ""])  # (m + 1, L, C)
        loss = alignment.distance(context, target[:-1], self.config.align_distance)
        if p > 0:
            null = self.null_condition() if null is None else null  # (1, L, C)
            null = alignment.distance(null, target[-1:], self.config.align_distance)
            loss = (1 - p) * loss + p * null
        return loss

    @torch.no_grad()
    def text_states(self, captions):
        # E(caption): the frozen text encoder's token states, what SD itself is conditioned on and
        # the alignment regresses onto; (n,) captions -> (n, L, C)
        if self.clip.config.text is None:
            raise ValueError("this CLIP has no text tower: no text states (a preset with one: toy, "
                             "tiny-text)")
        ids = alignment.text_ids(self.tokenizer, list(captions), self.clip.config.text.n_positions)
        return self.clip.text_hidden_states(ids.to(self.device))

    def diffusion_loss(self, context, vae_pixels, draws, null=None):
        # SD's denoising loss, with the LLM's condition (n, K, C) in place of CLIP's text features;
        # draws: draw_noise()'s (the dropout coin, the posterior's sample, eps, t); null: the
        # condition dropped ones get, where the caller has it
        cfg, draws = self.config, {k: v.to(self.device) for k, v in draws.items()}
        if cfg.cond_dropout > 0:  # CFG needs the unconditional score too. Computed even when
            # nothing is dropped, so every process of an FSDP run runs the LLM as often
            if null is None:
                null = self.condition("", queries=cfg.dropout_null == "queries")
            null = null.to(context.dtype)
            context = torch.where(draws["drop"][:, None, None], null, context)
        with torch.no_grad():  # the VAE is frozen; a sample of its posterior, as SD was trained
            pixels = vae_pixels.to(self.device, self.vae.quant_conv.weight.dtype)
            mean, logvar = self.vae.encode(pixels)
            std = (0.5 * logvar.float()).exp()
            z0 = self.vae.scaling_factor * (mean.float() + std * draws["posterior"])  # (n, 4, h, w)
        return diffusion.denoising_loss(self.unet, self.noise_scheduler, z0, draws["eps"],
                                        draws["t"], context, cfg.target, cfg.min_snr_gamma)

    def dream_states(self, prompt="", images=(), queries=True):
        # BOS + prompt + a dream slot -> the K queries' final hidden states (1, K, D). An <image> in
        # the prompt is read first (a read slot: image + text -> image). The separator: training
        # captions read "caption <image>" and the tokenizer splits at <image>; the official model's
        # captions were followed by the dream slot directly (caption_sep ""). queries=False: the
        # slot holds the raw <im_patch> embeddings (the official training's dropout null).
        text = prompt.rstrip() + self.prompts.caption_sep if prompt.strip() else ""
        # BOS + text (no EOS), then the slot without <dream_end>
        ids = self.encode_document(text, len(images), "chat")[0][:-1].tolist() + self.dream_slot()[:-1]
        x = self.embed(torch.tensor([ids], device=self.device), self.clip_pixels(images), queries)
        return self.llm.hidden_states(inputs_embeds=x)[:, -self.config.n_queries:]

    def condition(self, prompt="", images=(), queries=True):
        # the dream queries' states, the UNet's context: (1, K, C); differentiable (training's null)
        return self.to_context(self.dream_states(prompt, images, queries))

    def null_condition(self, negative=""):
        # The CFG null, (1, K, C): the dream queries after a negative prompt, by default the empty
        # one, BOS <dream_start>, as the official pipeline computes its unconditional branch.
        # (<dream_end> comes after the queries, so under causal attention it cannot change them.)
        return self.condition(negative)

    def trainable_groups(self):
        # GROUPS, each a list of parameters. "new_tokens" holds whole matrices (shared with "llm"):
        # a trainer masks their gradient to the rows >= n_text_vocab when it trains them without
        # the LLM. The condition's bridge is one group: the projector, and the mapper after it
        # where the model has one.
        emb, head = self.llm.model.embed_tokens.weight, self.llm.lm_head.weight
        bridge = [self.condition_projector, self.condition_mapper or nn.Identity()]
        return {"dream_queries": [self.dream_queries],
                "condition_projector": [p for m in bridge for p in m.parameters()],
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
                prefixes = (group, "condition_mapper") if group == "condition_projector" else (group,)
                out |= {k: (p, 0) for k, p in self.named_parameters()
                        if k.split(".")[0] in prefixes}
            else:
                have = ", ".join(self.trainable_groups())
                raise ValueError(f"unknown group {group!r} (have {have})")
        return out

    def trained_state(self, groups):  # -> {name: CPU tensor}: "dream_queries", "new_tokens.lm_head"
        tensors = self._trained_tensors(groups)
        return {k: p.detach()[row:].cpu().clone() for k, (p, row) in tensors.items()}

    @torch.no_grad()
    def load_trained_state(self, state):
        # the inverse of trained_state, strict: every name must be known and every shape must match
        known = self._trained_tensors(self.trainable_groups())
        for k, v in state.items():
            if k not in known:
                raise ValueError(f"trained state: unknown tensor {k!r} (of no group of this model)")
            p, row = known[k]
            if v.shape != p[row:].shape:
                raise ValueError(f"trained state: {k} is {tuple(v.shape)}, this model's is "
                                 f"{tuple(p[row:].shape)}")
            p[row:].copy_(v)

    # --------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def sample_images(self, context, steps=50, guidance=7.5, sampler="ddim", generator=None,
                      progress=True, negative="", null=None):
        # context (n, K, C) -> n PIL images: the frozen SD draws them; CFG's null from `negative`
        # (or `null`, (1, K, C), given)
        null = None if guidance == 1 else self.null_condition(negative) if null is None else null
        return diffusion.sample_cfg(self.unet, self.vae, self.scheduler_config, context, null,
                                    self.config.image_size, steps, guidance, sampler, generator,
                                    progress)

    @torch.no_grad()
    def generate(self, text, images=(), max_new_tokens=64, temperature=0.0, top_p=1.0, guidance=7.5,
                 steps=50, sampler="ddim", generator=None, force_image=False, max_images=4,
                 progress=True, layout="document", negative="", reply=""):
        # Continues `text` into a document: a list of str and PIL images. Given images (one per
        # <image>) are laid out as `layout` lays them out (a document's: dream slot + read slot; a
        # chat's: a read slot); text and reply as encode_document takes them (a chat of several
        # turns: lists). max_new_tokens counts the sampled tokens, not the slots.
        tok, llm, images = self.token_id, self.llm, list(images)
        ids = self.encode_document(text, len(images), layout, reply)[0][:-1].to(self.device)  # no EOS
        cache = llm.new_cache()
        x = self.embed(ids[None], self.clip_pixels(images))
        h = llm.hidden_states(inputs_embeds=x, cache=cache)[:, -1]
        # tokens never learned as labels (BOS, the slots' insides) are never written
        banned = [self.bos_id] + [tok[s] for s in SPECIAL_TOKENS if s != "<dream_start>"]
        sampling = dict(steps=steps, guidance=guidance, sampler=sampler, generator=generator,
                        progress=progress, negative=negative)
        segments, text_ids = [], []
        for i in range(max_new_tokens):
            logits = llm.lm_head(h).float()  # (1, vocab)
            logits[:, banned] = float("-inf")
            if sum(not isinstance(s, str) for s in segments) >= max_images:
                logits[:, tok["<dream_start>"]] = float("-inf")
            forced = force_image and i == 0
            token = tok["<dream_start>"] if forced else \
                llama.sample(logits, temperature, top_p, generator).item()
            if token == self.eos_id:
                break
            if token != tok["<dream_start>"]:
                text_ids.append(token)
                x = torch.tensor([[token]], device=self.device)
                h = llm.hidden_states(x, cache=cache)[:, -1]
                continue
            segments += [self.tokenizer.decode(text_ids)] if text_ids else []
            text_ids = []
            image, h = self._dream_then_read(cache, sampling)
            segments.append(image)
        return segments + ([self.tokenizer.decode(text_ids)] if text_ids else [])

    def _dream_then_read(self, cache, sampling):
        # <dream_start> was just written: run the K queries, draw the image from their states, then
        # read it back through CLIP, so that the text after it can refer to it.
        # -> (the image, the last hidden state (1, D))
        dream = torch.tensor([self.dream_slot()[:-1]], device=self.device)  # <dream_start> + K
        hq = self.llm.hidden_states(inputs_embeds=self.embed(dream), cache=cache)[:, 1:]  # (1,K,D)
        image = self.sample_images(self.to_context(hq), **sampling)[0]
        read = torch.tensor([self.dream_slot()[-1:] + self.read_slot()], device=self.device)
        x = self.embed(read, self.clip_pixels([image]))  # <dream_end> + the read slot
        return image, self.llm.hidden_states(inputs_embeds=x, cache=cache)[:, -1]

    @torch.no_grad()
    def text_to_image(self, prompt, num_images=1, images=(), **sampling):
        # one condition, num_images noises (batched). An <image> in the prompt (one per image
        # given) is read before the dream slot: image + text -> image.
        condition = self.condition(prompt, images)
        return self.sample_images(condition.expand(num_images, -1, -1), **sampling)

    @torch.no_grad()
    def answer(self, image, question, beams=1, max_new_tokens=64, history=(), answer_start="",
               prompts=None, **generate_kw):
        # image -> text: the question asked as the prompt format asks it (the model's, or `prompts`;
        # a chat's layout: the image read, not dreamt), no image written. beams > 1: beam search
        # (official VQA: 5). history: the chat's earlier turns [(message, reply)], the image in the
        # first message; answer_start: the reply's first words, written for the model (a VQA
        # post-prompt), not returned.
        p = prompts or self.prompts
        messages = [m for m, _ in history] + [question]
        messages[0] = p.question.format(question=messages[0])
        text, reply = p.turns(messages, [r for _, r in history] + [answer_start])
        text, reply = (text, reply) if history else (text[0], reply[0])  # one turn: two strings
        if beams == 1:
            segments = self.generate(text, [image], max_new_tokens=max_new_tokens, max_images=0,
                                     layout="chat", reply=reply, **generate_kw)
            return "".join(segments).strip()
        ids = self.encode_document(text, 1, "chat", reply)[0][:-1].to(self.device)  # no EOS
        x = self.embed(ids[None], self.clip_pixels([image]))
        banned = [self.bos_id] + list(self.token_id.values())  # no slot token: text only
        tokens = self.llm.beam_search(x, beams, max_new_tokens, self.eos_id, banned)
        return self.tokenizer.decode(tokens).strip()


PRESETS = {
    # random backbones in memory, in well under a second: tests, and the pipeline anywhere.
    # LLaMA dim 64 = CLIP width 64 = UNet context 64 (the projectors would bridge any widths);
    # 32 px CLIP (16 patches); a 4x VAE: 64 px images, 16 x 16 latents.
    "tiny": dict(llm="tiny", clip="clip-tiny-vision", sd="tiny",
                 config=DreamConfig(n_queries=8, image_size=64)),
    # tiny, with CLIP's text tower: what the alignment objective regresses onto (plumbing/alignment.py)
    "tiny-text": dict(llm="tiny", clip="clip-tiny", sd="tiny",
                      config=DreamConfig(n_queries=8, image_size=64)),
    # the shapes world's own pretrained backbones, loaded from weights/toy/ (made by
    # python -m weights.train_toy): a 4-layer LLaMA (dim 192), a 64 px CLIP (16 patches), a 4x VAE
    # and a UNet with a 128-wide context
    "toy": dict(folder=Path(__file__).resolve().parent / "weights" / "toy",
                config=DreamConfig(n_queries=8, image_size=64)),
}
TOY_PARTS = ["tokenizer.json", "llm/config.json", "clip/config.json", "vae/config.json",
             "unet/config.json", "scheduler/scheduler_config.json"]


def build(preset="tiny", seed=0, **config) -> DreamLLM:
    # A preset with random init from `seed` (the global RNG is left as it was); `config` overrides
    # DreamConfig fields, e.g. build("tiny", target="v", min_snr_gamma=5.0).
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (have {', '.join(PRESETS)})")
    p = PRESETS[preset]
    if unknown := sorted(set(config) - {f.name for f in fields(DreamConfig)}):
        raise ValueError(f"DreamConfig has no field {unknown[0]!r} (a run of an older version?)")
    config = replace(p["config"], **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if "folder" not in p:
            sd = unet.PRESETS[p["sd"]]
            return DreamLLM(llama.build(p["llm"]), clip.build(p["clip"]), unet.build_unet(sd),
                            unet.build_vae(sd), sd["scheduler"], byte_tokenizer(), config)
        folder = p["folder"]  # backbones from files; DreamLLM's own parts initialised from `seed`
        if missing := [f for f in TOY_PARTS if not (folder / f).is_file()]:
            raise FileNotFoundError(f"preset {preset!r}: {folder / missing[0]} is missing; "
                                    "make the toy backbones with `python -m weights.train_toy`")
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return DreamLLM(llama.load(folder / "llm"), clip.load(folder / "clip"),
                        unet.load_unet(folder / "unet"), unet.load_vae(folder / "vae"), scheduler,
                        tokenizer, config)
