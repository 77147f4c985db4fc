# Exercise: the generation loop's read-back (dreamllm.py: DreamLLM._dream_then_read)
import pytest
import torch
from PIL import Image

import dreamllm
from grading import StubCache, close, expect, fake_read_features, stand_in, stub_hidden_states


@pytest.fixture
def model(monkeypatch):
    # exercise "splice" need not be solved
    stand_in(monkeypatch, "DreamLLM.embed", "DreamLLM.slot_masks")
    m = dreamllm.build("tiny")
    m.read_features = fake_read_features(m)
    m.llm.hidden_states = stub_hidden_states(m, decay=0.9)  # a causal recurrence with a cache
    m.drawn = []

    def sample_images(context, **sampling):  # for SD: a flat colour that depends on the condition
        m.drawn.append((context.clone(), sampling))
        rgb = (torch.sigmoid(context.mean(1)[0, :3] * 100) * 255).round().int().tolist()
        return [Image.new("RGB", (64, 64), tuple(rgb)) for _ in range(len(context))]
    m.sample_images = sample_images
    return m


SAMPLING = dict(steps=3, guidance=2.0, sampler="ddim", generator=None, progress=False)


def run(model, prompt="Look at a red circle. "):
    cache = StubCache()
    ids = [model.bos_id] + list(prompt.encode())
    with torch.no_grad():
        model.llm.hidden_states(torch.tensor([ids]), cache=cache)  # the document so far
        image, h = model._dream_then_read(cache, dict(SAMPLING))
    return ids, cache, image, h


def test_the_dream_queries_states_are_the_condition(model):
    ids, _, image, _ = run(model)
    expect(len(model.drawn) == 1,
           f"sample_images was called {len(model.drawn)} times, expected once")
    K, tok = model.config.n_queries, model.token_id
    seq = ids + [tok["<dream_start>"]] + [tok["<im_patch>"]] * K
    with torch.no_grad():
        h = model.llm.hidden_states(inputs_embeds=model.embed(torch.tensor([seq])))
        want = model.condition_projector(h[:, -K:])
    context, sampling = model.drawn[0]
    close(context, want, "the condition drawn from: condition_projector of the K queries' states, "
          "after the document and <dream_start>, (1, K, C)")
    expect(sampling == SAMPLING, f"sample_images must get the sampling arguments as given: "
           f"{SAMPLING}, got {sampling}")


def test_the_image_is_read_back(model):
    ids, cache, image, h = run(model)
    expect(isinstance(image, Image.Image), f"the first result must be the drawn PIL image, got "
           f"{type(image).__name__}")
    tok, K = model.token_id, model.config.n_queries
    seq = (ids + [tok["<dream_start>"]] + [tok["<im_patch>"]] * K + [tok["<dream_end>"]]
           + [tok["<im_start>"]] + [tok["<im_patch>"]] * model.n_patches + [tok["<im_end>"]])
    with torch.no_grad():
        states = model.llm.hidden_states(inputs_embeds=model.embed(torch.tensor([seq]),
                                                                   model.clip_pixels([image])))
    close(h, states[:, -1], "the returned state: the last one after <dream_end> and a read slot "
          "holding the drawn image's features, (1, D)")
    expect(len(cache) == len(seq), f"the cache has seen {len(cache)} tokens; expected "
           f"{len(seq)}: the document, <dream_start> + K queries, <dream_end> + the read slot")


def test_what_follows_depends_on_the_picture(model):
    _, _, image_a, h_a = run(model, "Look at a red circle. ")
    _, _, image_b, h_b = run(model, "A blue square, then. ")
    expect(image_a.getpixel((0, 0)) != image_b.getpixel((0, 0)), "two prompts drew the same image")
    expect(not torch.allclose(h_a, h_b), "the state after two different images is the same")
