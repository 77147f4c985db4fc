# Exercise: the two losses (dreamllm.py: DreamLLM.forward)
import pytest
import torch
import torch.nn.functional as F

import dreamllm
from grading import close, expect, fake_read_features, stand_in, stub_hidden_states

IGNORE = -100


@pytest.fixture
def model(monkeypatch):
    # exercise "splice" need not be solved
    stand_in(monkeypatch, "DreamLLM.embed", "DreamLLM.slot_masks")
    m = dreamllm.build("tiny")
    m.read_features = fake_read_features(m)
    m.llm.hidden_states = stub_hidden_states(m)  # a small causal recurrence stands in for the LLM
    m.calls = []

    def diffusion_loss(context, vae_pixels, noise, null=None):  # exercise "vae-sample" need not be solved
        m.calls.append((context, vae_pixels, noise))
        return context.pow(2).mean()
    m.diffusion_loss = diffusion_loss
    return m


def batch(model):
    # two documents laid out by hand (3 dream slots, 2 read slots), labels as encode_document's
    tok, K, N = model.token_id, model.config.n_queries, model.n_patches
    dream = [tok["<dream_start>"]] + [tok["<im_patch>"]] * K + [tok["<dream_end>"]]
    read = [tok["<im_start>"]] + [tok["<im_patch>"]] * N + [tok["<im_end>"]]
    text = lambda s: list(s.encode())
    rows = [[model.bos_id] + text("a") + dream + read + text("b") + [model.eos_id],
            [model.bos_id] + dream + text("c") + dream + read + text("de") + [model.eos_id]]
    T = max(map(len, rows))
    ids, labels = torch.full((2, T), model.eos_id), torch.full((2, T), IGNORE)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        learnt = [v if v < 256 or v in (tok["<dream_start>"], model.eos_id) else IGNORE
                  for v in row[1:]]  # bytes, <dream_start> and EOS
        labels[b, 1:len(row)] = torch.tensor(learnt)
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=ids, labels=labels, clip_pixels=torch.rand(2, 3, 32, 32, generator=g),
                vae_pixels=torch.rand(3, 3, 64, 64, generator=g) * 2 - 1,
                draws={"eps": "the draws"})


def by_hand(model, b):
    h = model.llm.hidden_states(inputs_embeds=model.embed(b["input_ids"], b["clip_pixels"]))
    logits = model.llm.lm_head(h[:, :-1])
    lm = F.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    dream, _ = model.slot_masks(b["input_ids"])
    context = model.condition_projector(h[dream].view(3, model.config.n_queries, -1))
    return lm, context


def test_the_lm_loss(model):
    b = batch(model)
    with torch.no_grad():
        got = model(**b)
        lm, _ = by_hand(model, b)
    expect(isinstance(got, dict) and {"lm", "diffusion"} <= set(got),
           f"forward must return dict(lm=..., diffusion=...), got {got!r:.80}")
    close(got["lm"], lm, "lm: cross-entropy of position i's logits against the label of "
          "token i + 1")


def test_the_condition_of_each_image(model):
    b = batch(model)
    with torch.no_grad():
        got = model(**b)
        _, context = by_hand(model, b)
    expect(len(model.calls) == 1,
           f"diffusion_loss was called {len(model.calls)} times, expected once")
    given, pixels, draws = model.calls[0]
    close(given, context, "the context given to diffusion_loss: condition_projector of the states "
          "at each dream slot's K <im_patch> positions, (3 images, K, C)")
    expect(pixels is b["vae_pixels"] and draws is b["draws"], "vae_pixels and draws go to "
           "diffusion_loss as given")
    close(got["diffusion"], context.pow(2).mean(), "diffusion: what diffusion_loss returned")


def test_no_images_no_labels(model):
    b = batch(model)
    no_labels = torch.full_like(b["labels"], IGNORE)
    with torch.no_grad():
        got = model(b["input_ids"], no_labels, b["clip_pixels"])
    expect(not model.calls, "without vae_pixels, diffusion_loss must not be called")
    close(got["lm"], torch.tensor(0.0), "lm with no label at all")
    close(got["diffusion"], torch.tensor(0.0), "diffusion without vae_pixels")


def test_the_diffusion_loss_trains_the_dream_queries(model):
    model.dream_queries.grad = None
    model(**batch(model))["diffusion"].backward()
    g = model.dream_queries.grad
    expect(g is not None and g.abs().sum() > 0, "no gradient from the diffusion loss reached the "
           "dream queries: the context must be computed from the LLM's states, with autograd")
