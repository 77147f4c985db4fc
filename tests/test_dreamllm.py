# DreamLLM on the tiny preset (random backbones, CPU): the sequence layout and its labels, the
# embedding resize, which parameters train, the diffusion loss against a hand computation for each
# target, classifier-free guidance, and the interleaved generation loop.
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clip
import diffusion
import dreamllm
import llama
import unet
from dreamllm import SPECIAL_TOKENS, DreamConfig, DreamLLM


def picture(color, size=64):
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).ellipse((size // 6, size // 6, 5 * size // 6, 5 * size // 6), fill=color)
    return im


def docs():  # 4 one-image documents, text after each image
    return [(f"a {c} circle: <image> it is {c}.", [picture(c)]) for c in ("red", "blue", "green", "black")]


@pytest.fixture(scope="module")
def model():
    return dreamllm.build("tiny")


def with_noise(m, batch, seed):
    # a training step's draws for the batch's images: image i from a generator seeded seed + i
    if "vae_pixels" in batch:
        n = len(batch["vae_pixels"])
        batch["draws"] = m.draw_noise([torch.Generator().manual_seed(seed + i) for i in range(n)])
    return batch


def losses(m, documents, seed=0):
    return m(**with_noise(m, m.collate(documents), seed))


def eos_never(m):
    # a hook on lm_head so that EOS is never the likeliest token: the text always continues
    return m.llm.lm_head.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, torch.tensor([m.eos_id]), -1e4))


# ---- tokenizer, vocabulary --------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_and_specials_are_single_tokens(model):
    tok = model.tokenizer
    for s in ["a red circle", "héllo wörld ✓ 🙂", "  two  spaces\nnewline\t", ""]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert ids == list(s.encode("utf-8"))  # one token per byte, id = byte value
        assert tok.decode(ids) == s
    for name in SPECIAL_TOKENS + ["<s>", "</s>"]:
        ids = tok.encode(f"x{name}y", add_special_tokens=False).ids
        assert ids == [ord("x"), tok.token_to_id(name), ord("y")]
    assert len(set(model.token_id.values())) == len(SPECIAL_TOKENS)
    assert tok.get_vocab_size(with_added_tokens=True) == 256 + 2 + len(SPECIAL_TOKENS)
    assert dreamllm.byte_tokenizer().to_str() == dreamllm.byte_tokenizer().to_str()  # deterministic


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_resize_keeps_old_rows_and_new_rows_are_the_mean(tied):
    torch.manual_seed(0)
    llm = llama.Llama(llama.LlamaConfig(**{**vars(llama.PRESETS["tiny"]), "tie_embeddings": tied}))
    old_emb, old_head = llm.model.embed_tokens.weight.detach().clone(), llm.lm_head.weight.detach().clone()
    sd = unet.PRESETS["tiny"]
    m = DreamLLM(llm, clip.build("clip-tiny-vision"), unet.build_unet(sd), unet.build_vae(sd), sd["scheduler"],
                 dreamllm.byte_tokenizer(), DreamConfig(n_queries=8, image_size=64))
    n, emb, head = 256 + 2 + len(SPECIAL_TOKENS), m.llm.model.embed_tokens, m.llm.lm_head
    assert emb.weight.shape == head.weight.shape == (n, 64) and m.llm.cfg.vocab_size == n
    assert torch.equal(emb.weight[:256], old_emb)
    assert torch.allclose(emb.weight[256:], old_emb.mean(0).expand(n - 256, -1))
    if tied:
        assert head.weight is emb.weight
    else:
        assert torch.equal(head.weight[:256], old_head)
        assert torch.allclose(head.weight[256:], old_head.mean(0).expand(n - 256, -1))
    out = losses(m, docs()[:1])
    assert out["lm"].isfinite() and out["diffusion"].isfinite()


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = dreamllm.build("tiny"), dreamllm.build("tiny"), dreamllm.build("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["dream_queries"], sc["dream_queries"])
    assert a.dream_queries.shape == (8, 64) and a.condition_projector.bias is None
    assert a.visual_projector.bias is not None and a.n_patches == 16


# ---- documents -> sequences ----------------------------------------------------------------------------

def test_sequence_layout_and_labels(model):
    t, K, N = model.token_id, 8, 16
    ids, labels = model.encode_document("ab<image>c", 1)
    dream = [t["<dream_start>"]] + [t["<im_patch>"]] * K + [t["<dream_end>"]]
    read = [t["<im_start>"]] + [t["<im_patch>"]] * N + [t["<im_end>"]]
    expected = [model.bos_id, ord("a"), ord("b")] + dream + read + [ord("c"), model.eos_id]
    assert ids.tolist() == expected
    s = 3  # <dream_start>'s position
    want = [-100, ord("a"), ord("b"), t["<dream_start>"]] + [-100] * (K + 1 + N + 2) + [ord("c"), model.eos_id]
    assert labels.tolist() == want
    assert labels[s] == t["<dream_start>"] and (labels[s + 1:s + len(dream) + len(read)] == -100).all()
    with pytest.raises(ValueError, match="2 <image> placeholders but 1"):
        model.encode_document("<image> and <image>", 1)


def test_collate_pads_right_and_keeps_image_order(model):
    ims = [picture(c) for c in ("red", "blue", "green")]
    batch = model.collate([("x<image>y<image>", ims[:2]), ("much longer text<image>", ims[2:]), ("none", [])])
    lengths = [len(model.encode_document(*d)[0]) for d in [("x<image>y<image>", 2), ("much longer text<image>", 1),
                                                            ("none", 0)]]
    assert batch["input_ids"].shape == (3, max(lengths))
    # the pixels of each image, in order: CLIP's for the read slots, the VAE's for the diffusion loss
    assert torch.equal(batch["clip_pixels"], torch.stack([clip.preprocess(im, 32) for im in ims]))
    assert torch.equal(batch["vae_pixels"], torch.stack([unet.preprocess(im, 64) for im in ims]))
    assert batch["vae_pixels"].min() >= -1 and batch["vae_pixels"].max() <= 1
    for b, n in enumerate(lengths):
        assert (batch["input_ids"][b, n:] == model.eos_id).all()
        assert (batch["labels"][b, n:] == -100).all()
        assert batch["input_ids"][b, :n].tolist() == model.encode_document(*[("x<image>y<image>", 2),
                                                                            ("much longer text<image>", 1),
                                                                            ("none", 0)][b])[0].tolist()


def test_embed_fills_slots_in_order(model):
    ims = [picture(c) for c in ("red", "blue", "green")]
    batch = model.collate([("x<image>y<image>", ims[:2]), ("z<image>", ims[2:])])
    ids = batch["input_ids"]
    with torch.no_grad():
        x = model.embed(ids, model.clip_pixels(ims))
        features = model.visual_projector(model.clip.image_features(model.clip_pixels(ims), -2)[:, 1:])  # (3, N, D)
        plain = model.llm.model.embed_tokens(ids)
    t, image = model.token_id, 0
    for b in range(2):
        row = ids[b].tolist()
        starts = [i for i, v in enumerate(row) if v == t["<dream_start>"]]
        reads = [i for i, v in enumerate(row) if v == t["<im_start>"]]
        for s, r in zip(starts, reads):
            assert torch.equal(x[b, s + 1:s + 9], model.dream_queries.detach())
            assert torch.allclose(x[b, r + 1:r + 17], features[image], atol=1e-6)
            image += 1
        other = [i for i, v in enumerate(row) if v != t["<im_patch>"]]
        assert torch.equal(x[b, other], plain[b, other])  # text, BOS/EOS, slot delimiters untouched
    assert image == 3


def test_layouts_are_the_official_data_builders(model):
    # omni/data/builders/builder_dreamllm.py, kind by kind, on replicas of its examples
    t, K, N, X = model.token_id, 8, 16, -100
    bos, eos = model.bos_id, model.eos_id

    def enc(s):
        return model.tokenizer.encode(s, add_special_tokens=False).ids
    D = [t["<dream_start>"]] + [t["<im_patch>"]] * K + [t["<dream_end>"]]  # dream slot
    R = [t["<im_start>"]] + [t["<im_patch>"]] * N + [t["<im_end>"]]        # read slot
    # an image-text pair, creation: BOS caption <dream slot> EOS, and no label at all
    ids, lab = model.encode_document("a red circle<image>", 1, "t2i")
    assert ids.tolist() == [bos] + enc("a red circle") + D + [eos] and (lab == X).all()
    # comprehension: BOS <read slot> caption EOS; the caption and EOS labelled
    ids, lab = model.encode_document("<image>a red circle", 1, "i2t")
    assert ids.tolist() == [bos] + R + enc("a red circle") + [eos]
    assert lab.tolist() == [X] * (1 + len(R)) + enc("a red circle") + [eos]
    # a conversation: the image read; only the assistant's reply and EOS labelled
    ids, lab = model.encode_document("<image>What colour is it?", 1, "chat", " red")
    assert ids.tolist() == [bos] + R + enc("What colour is it?") + enc(" red") + [eos]
    assert lab.tolist() == [X] * (1 + len(R) + len(enc("What colour is it?"))) + enc(" red") + [eos]
    # an interleaved document: each image dreamt, then read; <dream_start> the one labelled slot token
    ids, lab = model.encode_document("Here:<image>It is red.", 1, "document")
    assert ids.tolist() == [bos] + enc("Here:") + D + R + enc("It is red.") + [eos]
    assert lab.tolist() == [X] + enc("Here:") + [D[0]] + [X] * (len(D) - 1 + len(R)) + enc("It is red.") + [eos]
    # an instructed document (SFT): the instruction unlabelled, the document after it as a document
    ids, lab = model.encode_document("Draw it.", 1, "instruct", " Here:<image>")
    assert ids.tolist() == [bos] + enc("Draw it.") + enc(" Here:") + D + R + [eos]
    assert lab.tolist() == [X] * (1 + len(enc("Draw it."))) + enc(" Here:") + [D[0]] + [X] * (len(D) - 1 + len(R)) + [eos]


def test_collate_gives_each_slot_its_images(model):
    # the read slots' images to CLIP, the dream slots' to the VAE, each in order of appearance
    red, blue, green = (picture(c) for c in ("red", "blue", "green"))
    batch = model.collate([("a red circle<image>", [red], "t2i", ""), ("<image>blue", [blue], "i2t", ""),
                           ("x<image>", [green])], flips=[False, True])
    assert torch.equal(batch["clip_pixels"], torch.stack([clip.preprocess(im, 32) for im in (blue, green)]))
    vae = torch.stack([unet.preprocess(red, 64), unet.preprocess(green, 64).flip(-1)])
    assert torch.equal(batch["vae_pixels"], vae)  # the second, mirrored as flips says
    assert "vae_pixels" not in model.collate([("<image>blue", [blue], "i2t", "")])


# ---- losses ------------------------------------------------------------------------------------------

def test_lm_loss_is_shifted_cross_entropy_on_labels(model):
    batch = model.collate(docs()[:2], diffusion=False)
    assert "vae_pixels" not in batch
    with torch.no_grad():
        out = model(**batch)
        logits = model.llm(inputs_embeds=model.embed(batch["input_ids"], batch["clip_pixels"]))
    keep = batch["labels"][:, 1:] != -100
    hand = F.cross_entropy(logits[:, :-1][keep], batch["labels"][:, 1:][keep])
    assert torch.allclose(out["lm"], hand, rtol=1e-6) and out["diffusion"] == 0
    # lm_mean "example": each example's mean over its labels, then the mean over the examples
    per = [F.cross_entropy(logits[b, :-1][keep[b]], batch["labels"][b, 1:][keep[b]]) for b in (0, 1)]
    assert keep[0].sum() != keep[1].sum()  # else the two means agree
    model.config.lm_mean = "example"
    try:
        with torch.no_grad():
            mean = model(**batch)["lm"]
    finally:
        model.config.lm_mean = "token"
    assert torch.allclose(mean, (per[0] + per[1]) / 2, rtol=1e-6)


def hand_diffusion_loss(m, batch, seed, prediction_type, target, gamma, null=False):
    # The whole diffusion loss redone step by step, from the same draws in the same order (for each
    # image from its own generator: dropout, posterior sample, noise, timestep), with the textbook
    # formulas.
    ids, n = batch["input_ids"], len(batch["vae_pixels"])
    with torch.no_grad():
        h = m.llm.hidden_states(inputs_embeds=m.embed(ids, batch["clip_pixels"]))
        if null:  # the condition of every image replaced by the null condition
            context = null(m).expand(n, -1, -1)
        else:
            starts = (ids == m.token_id["<dream_start>"]).nonzero().tolist()
            context = torch.stack([m.condition_projector(h[b, s + 1:s + 1 + 8]) for b, s in starts])
        mean, logvar = m.vae.encode(batch["vae_pixels"])
        post, eps, t = [], [], []
        for i in range(n):
            g = torch.Generator().manual_seed(seed + i)
            torch.rand(1, generator=g)
            post.append(torch.randn(mean.shape[1:], generator=g))
            eps.append(torch.randn(mean.shape[1:], generator=g))
            t.append(torch.randint(0, 1000, (), generator=g))
        post, eps, t = torch.stack(post), torch.stack(eps), torch.stack(t)
        z0 = m.vae.scaling_factor * (mean + torch.exp(logvar / 2) * post)
        abar = m.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        z_t = a * z0 + s * eps
        out = m.unet(z_t, t, context)
    if prediction_type == "epsilon":
        eps_hat = out
        x0_hat = (z_t - s * eps_hat) / a
    else:  # v = a eps - s x0  and  z_t = a x0 + s eps
        x0_hat = a * z_t - s * out
        eps_hat = a * out + s * z_t
    v_hat, v = a * eps_hat - s * x0_hat, a * eps - s * z0
    pred, goal = {"epsilon": (eps_hat, eps), "v": (v_hat, v), "x0": (x0_hat, z0)}[target]
    mse = ((pred - goal) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (abar / (1 - abar)).flatten()
        w = {"epsilon": torch.minimum(snr, torch.tensor(gamma)) / snr,
             "v": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1),
             "x0": torch.minimum(snr, torch.tensor(gamma))}[target]
        mse = w * mse
    return mse.mean()


@pytest.mark.parametrize("prediction_type,target,gamma", [
    ("epsilon", "epsilon", None), ("epsilon", "v", None), ("epsilon", "x0", None),
    ("epsilon", "epsilon", 5.0), ("epsilon", "v", 5.0), ("epsilon", "x0", 5.0),
    ("v_prediction", "epsilon", None), ("v_prediction", "v", 5.0), ("v_prediction", "x0", 1.0)])
def test_diffusion_loss_equals_hand_computation(prediction_type, target, gamma):
    m = dreamllm.build("tiny", cond_dropout=0.0, target=target, min_snr_gamma=gamma)
    if prediction_type != "epsilon":  # the same frozen UNet, read as a v-predictor
        m.scheduler_config["prediction_type"] = prediction_type
        m.noise_scheduler = diffusion.DDPM(m.scheduler_config)
    batch = m.collate(docs())
    with torch.no_grad():
        out = m(**with_noise(m, batch, 7))
    hand = hand_diffusion_loss(m, batch, 7, prediction_type, target, gamma)
    assert torch.allclose(out["diffusion"], hand, rtol=1e-5, atol=0), (out["diffusion"], hand)
    with torch.no_grad():  # and the draws really come from the generators: other seeds, another loss
        assert not torch.allclose(m(**with_noise(m, batch, 8))["diffusion"], hand)


def official_null(m):
    # the official training's dropout null: the LLM over BOS <dream_start> <im_patch> x K <dream_end>
    # EOS with the raw <im_patch> embeddings (no dream queries), the states at positions 2..2+K
    t = m.token_id
    ids = torch.tensor([[m.bos_id, t["<dream_start>"]] + [t["<im_patch>"]] * 8 + [t["<dream_end>"], m.eos_id]])
    h = m.llm.hidden_states(inputs_embeds=m.llm.model.embed_tokens(ids))
    return m.condition_projector(h[:, 2:2 + 8])


@pytest.mark.parametrize("which", ["patches", "queries"])
def test_condition_dropout_uses_the_null_condition(which):
    m = dreamllm.build("tiny", cond_dropout=0.999, dropout_null=which)  # (rand() < 0.999: all dropped)
    batch = m.collate(docs()[:2])
    with torch.no_grad():
        out = m(**with_noise(m, batch, 3))
        null = official_null if which == "patches" else (lambda m: m.null_condition())
        hand = hand_diffusion_loss(m, batch, 3, "epsilon", "epsilon", None, null=null)
        other = hand_diffusion_loss(m, batch, 3, "epsilon", "epsilon", None,
                                    null=(lambda m: m.null_condition()) if which == "patches" else official_null)
    assert torch.allclose(out["diffusion"], hand, rtol=1e-5) and not torch.allclose(out["diffusion"], other)
    q = m.null_condition()
    assert q.shape == (1, 8, 64)
    # CFG's null is the condition of an image that opens a document (an empty prompt)
    ids = m.encode_document("<image> after", 1)[0][None]
    with torch.no_grad():
        h = m.llm.hidden_states(inputs_embeds=m.embed(ids, m.clip_pixels([picture("red")])))
    assert torch.allclose(q, m.condition_projector(h[:, 2:2 + 8]), atol=1e-6)
    q.sum().backward()  # differentiable in the queries
    assert m.dream_queries.grad.abs().sum() > 0


def test_by_default_no_condition_is_dropped():  # as the release was trained: no config sets it
    assert dreamllm.DreamConfig().cond_dropout == 0.0 and dreamllm.DreamConfig().dropout_null == "patches"


def test_batch_without_images_has_no_diffusion_loss(model):
    with torch.no_grad():
        out = losses(model, [("just text", []), ("more text here", [])])
    assert out["diffusion"] == 0 and out["lm"] > 0


def test_forward_is_reproducible_from_the_generator(model):
    batch = model.collate(docs()[:2])
    with torch.no_grad():
        a, b = (model(**with_noise(model, batch, 5))["diffusion"] for _ in range(2))
    assert torch.equal(a, b)


STAGES = {"I": ["dream_queries", "condition_projector", "visual_projector"],  # both halves at once
          "II": ["dream_queries", "condition_projector", "visual_projector", "llm"]}


@pytest.mark.parametrize("stage", STAGES)
def test_frozen_modules_get_no_gradient_and_stay_bit_identical(stage):
    m = dreamllm.build("tiny")
    groups = m.trainable_groups()
    m.requires_grad_(False)  # as train.py does: only the stage's groups train
    for name in STAGES[stage]:
        for p in groups[name]:
            p.requires_grad_(True)
    frozen = {"clip": m.clip, "vae": m.vae, "unet": m.unet} | ({"llm": m.llm} if stage == "I" else {})
    before = {k: {n: p.detach().clone() for n, p in mod.named_parameters()} for k, mod in frozen.items()}
    llm_before = m.llm.model.layers[0].mlp.up_proj.weight.detach().clone()
    trained = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-3)
    batch = m.collate(docs())
    for step in range(3):
        opt.zero_grad()
        out = m(**with_noise(m, batch, 10 * step))
        (out["lm"] + 10 * out["diffusion"]).backward()
        for k, mod in frozen.items():
            assert all(p.grad is None for p in mod.parameters()), f"{k} received a gradient"
        for name in ["dream_queries", "condition_projector", "visual_projector"]:
            for p in groups[name]:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"
        opt.step()
    for k, mod in frozen.items():
        for n, p in mod.named_parameters():
            assert torch.equal(p, before[k][n]), f"{k}.{n} changed"
    if stage == "II":  # the LLM did train
        assert not torch.equal(m.llm.model.layers[0].mlp.up_proj.weight, llm_before)


# ---- sampling ----------------------------------------------------------------------------------------

def final_latents(m, monkeypatch, **kw):
    # sample_images, returning the latent it decodes (captured at the VAE) besides the images
    seen = []
    decode = m.vae.decode
    monkeypatch.setattr(m.vae, "decode", lambda z: seen.append(z) or decode(z))
    images = m.sample_images(progress=False, **kw)
    return images, seen[-1]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_one_is_the_conditional_prediction(model, monkeypatch, sampler):
    context = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    _, z1 = final_latents(model, monkeypatch, context=context, steps=3, guidance=1.0, sampler=sampler,
                          generator=torch.Generator().manual_seed(2))
    _, z3 = final_latents(model, monkeypatch, context=context, steps=3, guidance=3.0, sampler=sampler,
                          generator=torch.Generator().manual_seed(2))
    # by hand: the same draws, the conditional UNet output only / CFG with the null condition
    hand = {}
    for g_scale in (1.0, 3.0):
        gen = torch.Generator().manual_seed(2)
        sched = (diffusion.DDIM if sampler == "ddim" else diffusion.DDPM)(model.scheduler_config)
        sched.set_timesteps(3)
        z = torch.randn(2, 4, 16, 16, generator=gen)
        with torch.no_grad():
            null = model.null_condition().expand(2, -1, -1)
            for t in sched.timesteps:
                cond = model.unet(z, t, context)
                out = cond if g_scale == 1 else model.unet(z, t, null) + g_scale * (cond - model.unet(z, t, null))
                z = sched.step(out, t, z, generator=gen)
        hand[g_scale] = z / model.vae.scaling_factor
    assert torch.allclose(z1, hand[1.0], atol=1e-5) and torch.allclose(z3, hand[3.0], atol=1e-4)
    assert not torch.allclose(z1, z3, atol=1e-3)


def test_text_to_image_gives_pil_images_of_the_right_size(model):
    images = model.text_to_image("a red circle", num_images=3, steps=2, guidance=2.0, progress=False,
                                 generator=torch.Generator().manual_seed(0))
    assert len(images) == 3 and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in images)


def test_forced_dream_start_writes_an_image_then_text_that_matches_recomputation(model, monkeypatch):
    sampled = []
    sample = llama.sample
    def recording(*args, **kw):  # llama.sample, keeping the token ids the loop draws
        sampled.append(sample(*args, **kw).item())
        return torch.tensor(sampled[-1])
    monkeypatch.setattr(llama, "sample", recording)
    hook = eos_never(model)
    try:
        segments = model.generate("a picture", force_image=True, max_new_tokens=6, max_images=1, steps=2,
                                  progress=False, generator=torch.Generator().manual_seed(0))
        assert len(segments) == 2 and isinstance(segments[0], Image.Image) and segments[0].size == (64, 64)
        assert isinstance(segments[1], str) and len(sampled) == 5  # 1 forced <dream_start> + 5 sampled tokens
        assert model.tokenizer.decode(sampled) == segments[1]
        # the KV-cache loop equals one pass over the whole document in the training layout
        ids = model.encode_document("a picture<image>", 1)[0][:-1].tolist() + sampled
        with torch.no_grad():
            logits = model.llm(inputs_embeds=model.embed(torch.tensor([ids]), model.clip_pixels(segments[:1])))[0]
        banned = [model.bos_id] + list(model.token_id.values())  # <dream_start> too: max_images reached
        logits[:, banned] = float("-inf")
        assert logits[-len(sampled) - 1:-1].argmax(-1).tolist() == sampled
    finally:
        hook.remove()


def test_sampled_dream_start_writes_images_up_to_max_images(model):
    # push <dream_start> to the top at every step: max_images caps the images, then text follows
    hook = model.llm.lm_head.register_forward_hook(
        lambda mod, inp, out: out.index_fill(-1, torch.tensor([model.token_id["<dream_start>"]]), 1e4))
    eos = eos_never(model)
    try:
        segments = model.generate("draw", max_new_tokens=5, steps=1, max_images=2, progress=False)
        assert [type(s) for s in segments] == [Image.Image, Image.Image, str] and len(segments[2]) > 0
        assert all(isinstance(s, str) for s in model.generate("draw", max_new_tokens=3, max_images=0))
    finally:
        hook.remove()
        eos.remove()


def test_answer_returns_text(model):
    hook = eos_never(model)
    try:
        reply = model.answer(picture("red"), "what is it?", max_new_tokens=4)
    finally:
        hook.remove()
    assert isinstance(reply, str) and len(reply) > 0
    with pytest.raises(ValueError):  # an <image> without an image
        model.generate("<image>", [])


def test_a_chat_of_several_turns_is_checked_as_the_tokenizer_reads_it(model):
    ids, labels = model.encode_document(["<image> What is it?", " And its colour?"], 1, "chat",
                                        [" a circle", " red"])
    learned = [i for i, l in zip(ids.tolist(), labels.tolist()) if l != -100]
    assert model.tokenizer.decode([i for i in learned if i != model.eos_id]) == " a circle red"
    assert learned.count(model.eos_id) == 2  # each reply's end, the last the example's
    with pytest.raises(ValueError, match="lists of one length"):
        model.encode_document(["a", "b"], 0, "chat", " c")
    with pytest.raises(ValueError, match="only the last reply may be empty"):
        model.encode_document(["a", "b"], 0, "chat", ["", "c"])
    with pytest.raises(ValueError, match="<im_start>"):  # forged across a turn's two parts
        model.encode_document(["q <im_sta", "q"], 0, "chat", ["rt> r", "s"])
    with pytest.raises(ValueError, match="placeholders"):  # an <image> made of two parts
        model.encode_document("a <ima", 0, "chat", "ge> b")
