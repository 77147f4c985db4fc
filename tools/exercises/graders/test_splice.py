# Exercise: the dream-query splice (dreamllm.py: DreamLLM.slot_masks, DreamLLM.embed)
import pytest
import torch

import dreamllm
from grading import close, expect, fake_read_features


@pytest.fixture(scope="module")
def model():
    m = dreamllm.build("tiny")  # K = 8, N = 16, D = 64
    m.read_features = fake_read_features(m)  # CLIP and its projector, stood in for
    return m


def batch(model):
    # two rows laid out by hand; -> ids (2, T), the dream and read masks, (row, first patch) of
    # each slot in order
    tok = model.token_id
    K, N = model.config.n_queries, model.n_patches
    dream = [tok["<dream_start>"]] + [tok["<im_patch>"]] * K + [tok["<dream_end>"]]
    read = [tok["<im_start>"]] + [tok["<im_patch>"]] * N + [tok["<im_end>"]]
    text = lambda s: list(s.encode())
    rows = [[model.bos_id] + text("ab") + dream + read + text("c"),
            [model.bos_id] + read + text("x") + dream + read + text("yz") + dream]
    T = max(map(len, rows))
    ids = torch.full((2, T), model.eos_id)
    masks = {k: torch.zeros(2, T, dtype=torch.bool) for k in ("dream", "read")}
    slots = {"dream": [], "read": []}
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        for i, v in enumerate(row):
            kind = {tok["<dream_start>"]: "dream", tok["<im_start>"]: "read"}.get(v)
            if kind:
                n = K if kind == "dream" else N
                masks[kind][b, i + 1:i + 1 + n] = True
                slots[kind].append((b, i + 1))
    return ids, masks, slots


def pixels(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_slot_masks(model):
    ids, masks, _ = batch(model)
    dream, read = model.slot_masks(ids)
    for got, kind in ((dream, "dream"), (read, "read")):
        expect(isinstance(got, torch.Tensor) and got.shape == ids.shape,
               f"the {kind} mask: expected a (2, {ids.shape[1]}) tensor")
        wrong = (got.bool() != masks[kind]).nonzero().tolist()
        expect(not wrong, f"the {kind} mask is wrong at (row, position) {wrong[:5]}: it must mark "
               f"exactly the <im_patch> tokens inside {kind} slots, not the delimiters")


def test_embed_fills_the_slots_in_order(model):
    ids, masks, slots = batch(model)
    clip_pixels = pixels(3)
    with torch.no_grad():
        got = model.embed(ids, clip_pixels)
        plain = model.llm.model.embed_tokens(ids)
        features = model.read_features(clip_pixels)
    K, N = model.config.n_queries, model.n_patches
    expect(got.shape == plain.shape,
           f"embed: expected shape {tuple(plain.shape)}, got {tuple(got.shape)}")
    for j, (b, i) in enumerate(slots["dream"]):
        close(got[b, i:i + K], model.dream_queries, f"the K rows of dream slot {j} (row {b}, from "
              f"position {i}): the dream queries")
    for j, (b, i) in enumerate(slots["read"]):
        close(got[b, i:i + N], features[j], f"the N rows of read slot {j} (row {b}, from position "
              f"{i}): image {j}'s features")
    other = ~(masks["dream"] | masks["read"])
    close(got[other], plain[other], "the rows outside the slots: the token embeddings")


def test_embed_without_images(model):
    ids, _, _ = batch(model)
    ids = ids[:1, :13]  # BOS, "ab", one dream slot: no read slot
    with torch.no_grad():
        got = model.embed(ids)
    close(got[0, 4:12], model.dream_queries, "the dream queries of a sequence without read slots "
          "(clip_pixels None)")


def test_queries_false_leaves_the_dream_slots_as_tokens(model):
    ids, _, _ = batch(model)
    ids = ids[:1, :13]
    with torch.no_grad():
        got = model.embed(ids, None, queries=False)
        close(got, model.llm.model.embed_tokens(ids), "embed(ids, queries=False): the token "
              "embeddings, <im_patch> rows of dream slots included")


def test_the_dream_queries_receive_the_gradient(model):
    ids, _, slots = batch(model)
    model.dream_queries.grad = None
    model.embed(ids, pixels(3)).sum().backward()
    n = len(slots["dream"])
    expect(model.dream_queries.grad is not None, "no gradient reached the dream queries: fill the "
           "slots with an operation autograd follows (masked_scatter, or torch.where)")
    close(model.dream_queries.grad, torch.full_like(model.dream_queries, float(n)),
          f"d sum(embed) / d dream_queries: each query sits in {n} dream slots")
    model.dream_queries.grad = None
