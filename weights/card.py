"""The toy backbones' report card: can they bind two shapes' colours, shapes and places, and does
the LLM look back at what it was told, before a DreamLLM is judged on top of them?

    python -m weights.train_toy --card          # the card of weights/toy/, training nothing

weights/train_toy.py prints a part's rows as soon as it has trained it and writes them all to
weights/toy/card.json; it also turns its models into the plain functions the measures read.
Every row is a proportion of fresh items drawn from SEED, a seed no training used, with its N
and 95% Wilson interval (benchmark.row):
  clip: swaps      two-shape scenes: the true caption scores above its twin with the two shapes'
                   colours (places, shapes) exchanged (data.swapped); a tie counts a half, so a
                   text tower that ignores word order scores 0.50, a bag of words (Winoground, ARO)
  clip: zero-shot  single shapes against all 90 prompts "a {colour} {shape} {place}": each right
  clip: probe      a linear probe (probe.py) of the layer a DreamLLM reads, fitted on single
                   shapes of training's colour-shape pairs, tested on data.HELD_OUT's: what a
                   reader trained on the split can read of pairs it never saw
  clip: layer 0    the same probe of the patch embeddings (each patch's pixels, linearly
                   embedded and layer-normed, before any block): what this reader makes of the
                   pixels themselves, beside what it makes of the read layer (not a bound: the
                   tower can carry colour to held-out pairs better than the pixels do)
  clip: patches    two shapes of held-out pairs in one picture, each read off its own patches of the
                   read layer (a linear probe of single patches, fitted on training's pairs, each
                   patch labelled by its nearest shape; the majority of a shape's patches): can a
                   reader pick one of two shapes and read it, or does every patch hold the scene?
  llm              "Here is a red circle. <image> The circle is" -> "red" (of the six colours), after
                   one- and two-shape captions; "... <image> That makes" -> the pictures' count:
                   does it look back at what it was told, or only at the last few words?
  sd               the toy SD drawn from its own text encoder's states E(prompt), DDIM 30 steps,
                   guidance 2, judged by judge.analyse_scene: held-out single shapes, both colour
                   and shape right; two shapes of held-out pairs, each colour bound to its shape and
                   placed ("a green circle on the left and a red square on the right"); the count
The measures take plain functions (images -> embeddings, texts -> embeddings, prompts -> images),
so tests/test_card.py checks each on models built to pass or fail it.
"""
import random

import torch
import torch.nn.functional as F

from shapes import benchmark, data, judge
from tools import probe

SEED = 777  # the card's scenes; train_toy's parts draw theirs from --seed (0) and its neighbours
SIZES = dict(back=300, swaps=400, zero_shot=450, probe_fit=2000, probe_test=500, patches_fit=300,
             patches_test=200, singles=120, twos=32, per_two=4)
# singles: 120 pictures of each of the 4 held-out prompts, N 480; at N 96 a row of 0.97 has the interval
# [0.91, 0.99] and cannot say whether the UNet meets its 0.97 (docs/log.md, 2026-12-06, tenth session)
# the probe's fit, chosen on data.VALIDATION's pairs (fitted on training's, never on HELD_OUT's):
# 1000 full-batch Adam steps read them best (colour / shape 1.00 / 0.92, against 1.00 / 0.66 at
# probe.fit's 200; docs/log.md, 2026-12-04, third session)
PROBE = dict(steps=1000, l2=1e-3)


def scenes(kind, n, split="all", n_shapes=1):
    return [data.random_scene(random.Random(f"card/{SEED}/{kind}/{i}"), split, n_shapes)
            for i in range(n)]


# ------------------------------------------------------------------------------------ CLIP

@torch.no_grad()
def swaps(image_embeddings, text_embeddings):
    # -> {"colour": [1, 0.5 or 0 per scene], "place": ..., "shape": ...}: the true caption's
    # cosine against its twin's, on two-shape scenes (fewer rows where the twin is the truth)
    two = scenes("swaps", SIZES["swaps"], n_shapes=2)
    img = F.normalize(image_embeddings([data.draw(s) for s in two]).float(), dim=-1)
    truth = F.normalize(text_embeddings([data.caption(s, form="no size") for s in two]).float(), dim=-1)
    true = (img * truth).sum(-1)
    rights = {}
    for what in data.FIELDS:
        keep = [i for i, s in enumerate(two) if data.swapped(s, what) is not None]
        twins = [data.caption(data.swapped(two[i], what), form="no size") for i in keep]
        twin = (img[keep] * F.normalize(text_embeddings(twins).float(), dim=-1)).sum(-1)
        rights[what] = ((true[keep] > twin).float() + 0.5 * (true[keep] == twin).float()).tolist()
    return rights


@torch.no_grad()
def zero_shot(image_embeddings, text_embeddings):
    # -> {"colour": [bool], "shape": ..., "place": ...}: single shapes, the best of 90 prompts
    prompts = [(c, s, p) for c in data.COLORS for s in data.SHAPES for p in data.POSITIONS]
    txt = F.normalize(text_embeddings([f"a {c} {s} {p}" for c, s, p in prompts]).float(), dim=-1)
    singles = scenes("zero-shot", SIZES["zero_shot"])
    img = F.normalize(image_embeddings([data.draw(s) for s in singles]).float(), dim=-1)
    best = [prompts[j] for j in (img @ txt.T).argmax(-1).tolist()]
    truth = [(s.shapes[0].color, s.shapes[0].shape, s.shapes[0].position) for s in singles]
    return {what: [b[k] == t[k] for b, t in zip(best, truth)] for k, what in enumerate(data.FIELDS)}


def probe_held_out(patch_features):
    # -> {"colour": [bool], ...}: linear probes of flat patch features (images -> (n, N, width))
    # fitted on training's pairs, each tested on fresh single shapes of HELD_OUT's
    fit_scenes = scenes("probe-fit", SIZES["probe_fit"], "train")
    test_scenes = scenes("probe-test", SIZES["probe_test"], "eval")
    x_fit, x_test = (probe.POOLS["flat"](patch_features([data.draw(s) for s in group]))
                     for group in (fit_scenes, test_scenes))
    rights = {}
    for what, field in data.FIELDS.items():
        classes = data.VALUES[field]
        predict = probe.fit(x_fit, probe.classes_of(fit_scenes, field, classes), len(classes), **PROBE)
        rights[what] = (predict(x_test) == probe.classes_of(test_scenes, field, classes)).tolist()
    return rights


def probe_patches(patch_features):
    # -> {"colour": [bool], ...}: linear probes of single patches (images -> (n, N, width)), each
    # patch labelled by the shape nearest it (data.nearest_shapes), fitted on two-shape scenes of
    # training's pairs, tested on HELD_OUT's; each shape read by the majority of its own patches:
    # what a reader that picks one of two shapes by its patches can read of it (two per scene)
    fit_scenes = scenes("patches-fit", SIZES["patches_fit"], "train", n_shapes=2)
    test_scenes = scenes("patches-test", SIZES["patches_test"], "eval", n_shapes=2)
    x_fit, x_test = (patch_features([data.draw(s) for s in group]) for group in (fit_scenes, test_scenes))
    grid = round(x_fit.shape[1] ** 0.5)
    owners_fit, owners_test = ([torch.tensor(data.nearest_shapes(s, grid)) for s in group]
                               for group in (fit_scenes, test_scenes))  # each (N,): a patch's shape
    rights = {}
    for what, field in data.FIELDS.items():
        classes = data.VALUES[field]
        labels = torch.cat([torch.tensor([classes.index(getattr(x, field)) for x in s.shapes])[owner]
                            for s, owner in zip(fit_scenes, owners_fit)])  # each fitted patch's class
        predict = probe.fit(x_fit.flatten(0, 1), labels, len(classes), **PROBE)
        guesses = predict(x_test.flatten(0, 1)).view(len(test_scenes), -1)  # (scenes, N)
        rights[what] = [guess[owner == k].mode().values.item() == classes.index(getattr(x, field))
                        for s, owner, guess in zip(test_scenes, owners_test, guesses)
                        for k, x in enumerate(s.shapes)]
    return rights


def clip_rows(image_embeddings, text_embeddings, patch_features, pixel_features):
    rows = [benchmark.row(f"clip: true caption over its {what}-swapped twin", r)
            for what, r in swaps(image_embeddings, text_embeddings).items()]
    rows += [benchmark.row(f"clip: zero-shot single shape, {what}", r)
             for what, r in zero_shot(image_embeddings, text_embeddings).items()]
    rows += [benchmark.row(f"clip: read layer's probe on held-out pairs, {what}", r)
             for what, r in probe_held_out(patch_features).items()]
    rows += [benchmark.row(f"clip: the same probe of the patch embeddings, {what}", r)
             for what, r in probe_held_out(pixel_features).items()]
    rows += [benchmark.row(f"clip: read layer's patches, two held-out shapes, {what}", r)
             for what, r in probe_patches(patch_features).items()]
    return rows


# ------------------------------------------------------------------------------------ LLM

def llm_rows(next_word):
    # next_word(text, words) -> the word of `words` the LLM ranks first to follow `text`. Does it say
    # back what it was told a picture holds? A model blind to its context scores about chance (1/6
    # for a colour, 1/2 for the count), whatever its n-gram priors.
    colours, rows = list(data.COLORS), []
    for n_shapes in (1, 2):
        said = []
        for i, scene in enumerate(scenes("back", SIZES["back"], n_shapes=n_shapes)):
            if len({s.shape for s in scene.shapes}) < n_shapes:
                continue  # "The circle is" must name one shape
            s = scene.shapes[i % n_shapes]
            text = f"Here is {data.caption(scene, form='no size')}. {data.IMAGE_TOKEN} The {s.shape} is"
            said.append(next_word(text, colours) == s.color)
        rows.append(benchmark.row(f"llm: colour said back, {('one shape', 'two shapes')[n_shapes - 1]}", said))
    counted = []
    for i in range(SIZES["back"]):  # "Here is a red circle. <image> Next comes ... <image> That makes" -> two
        rng = random.Random(f"card/{SEED}/count/{i}")
        k = 2 + i % 2
        parts = [rng.choice(data.NEXT if j else data.FIRST).format(data.caption(data.random_scene(rng, "all", 1), rng))
                 + f" {data.IMAGE_TOKEN}" for j in range(k)]
        counted.append(next_word(" ".join(parts) + " That makes", ["two", "three"]) == data.NUMBERS[k])
    return rows + [benchmark.row("llm: pictures counted", counted)]


# ------------------------------------------------------------------------------------ SD

def sd_rows(draw):
    # draw(prompts, seed) -> one PIL image per prompt. -> (rows, [(prompt, [images])] for a grid)
    k, m = SIZES["singles"], SIZES["per_two"]
    singles = [(p, c, s) for p, c, s in data.eval_prompts() for _ in range(k)]  # "a blue triangle"
    twos = [s for s in scenes("two", SIZES["twos"], "eval", n_shapes=2) for _ in range(m)]  # held-out pairs
    prompts = [p for p, _, _ in singles] + [data.caption(s, form="no size") for s in twos]
    images = draw(prompts, SEED)
    found = [judge.analyse_scene(im) for im in images]  # [Found] per image
    single = [(big := benchmark.largest(f)) is not None and (big.color, big.shape) == (c, s)
              for f, (_, c, s) in zip(found, singles)]
    two = [sorted((x.color, x.shape, x.position) for x in f) == sorted((x.color, x.shape, x.position) for x in s.shapes)
           for f, s in zip(found[len(singles):], twos)]
    counts = [len(f) == (1 if i < len(singles) else 2) for i, f in enumerate(found)]
    rows = [benchmark.row("sd: held-out single shape, both right", single),
            benchmark.row("sd: two shapes bound and placed", two),
            benchmark.row("sd: number of shapes", counts)]
    shown = [(prompts[i], images[i:i + min(k, 8)]) for i in range(0, len(singles), k)]
    shown += [(prompts[i], images[i:i + m]) for i in range(len(singles), min(len(prompts), len(singles) + 8 * m), m)]
    return rows, shown


def table(rows):  # the card as text: value, interval, N
    return "\n".join(f"  {r['name']:<52} {r['value']:.2f} [{r['low']:.2f}, {r['high']:.2f}]  N={r['n']}"
                     for r in rows)
