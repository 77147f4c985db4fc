"""weights/card.py, the toy backbones' report card: each measure on models built to pass it and on
models built to fail it (a bag of words, a reader blind to places, features that tie colour to
shape, a drawer that swaps colours, a language model that reads only the last words), and
train_toy's hard negatives (twin) that teach the pass."""
import random

import pytest
import torch

from shapes import data, judge
from weights import card, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

COLOURS, SHAPES, PLACES = list(data.COLORS), list(data.SHAPES), list(data.POSITIONS)
BOUND = [(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]  # 90 conjunctions


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(card, "SIZES", dict(back=60, swaps=60, zero_shot=60, probe_fit=300, probe_test=100,
                                            patches_fit=40, patches_test=30, singles=3, twos=6, per_two=2))


def binding_embedding(shapes):  # [(colour, shape, place)] -> one-hot of each conjunction, summed
    v = torch.zeros(len(BOUND))
    for x in shapes:
        v[BOUND.index(x)] += 1
    return v


def oracle_images(images):  # what each picture shows, bound: the measures' perfect CLIP
    return torch.stack([binding_embedding([(f.color, f.shape, f.position) for f in judge.analyse_scene(im)])
                        for im in images])


def oracle_texts(texts):
    return torch.stack([binding_embedding([(c["color"], c["shape"], c["position"]) for c in judge.parse_caption(t)])
                        for t in texts])


WORDS = COLOURS + SHAPES + PLACES


def bag_images(images):  # counts of each colour, shape and place seen, unbound: a bag of words
    rows = []
    for im in images:
        v = torch.zeros(len(WORDS))
        for f in judge.analyse_scene(im):
            for w in (f.color, f.shape, f.position):
                v[WORDS.index(w)] += 1
        rows.append(v)
    return torch.stack(rows)


def bag_texts(texts):
    rows = []
    for t in texts:
        v = torch.zeros(len(WORDS))
        for claim in judge.parse_caption(t):
            for w in claim.values():
                v[WORDS.index(w)] += 1
        rows.append(v)
    return torch.stack(rows)


def test_swaps_score_a_binder_one_and_a_bag_of_words_one_half(small):
    for what, rights in card.swaps(oracle_images, oracle_texts).items():
        assert len(rights) >= 30 and sum(rights) == len(rights), what
    for what, rights in card.swaps(bag_images, bag_texts).items():
        assert set(rights) == {0.5}, what  # every twin ties with the truth


def test_zero_shot_reads_places_only_where_the_embedding_holds_them(small):
    right = card.zero_shot(oracle_images, oracle_texts)
    assert all(all(r) for r in right.values()) and len(right["place"]) == 60

    def blind(embed):  # the same, with every place the same one: colour and shape, not where
        def f(xs):
            v = embed(xs).view(len(xs), len(COLOURS) * len(SHAPES), len(PLACES))
            return v.sum(-1, keepdim=True).expand_as(v).flatten(1)
        return f
    right = card.zero_shot(blind(oracle_images), blind(oracle_texts))
    assert all(right["colour"]) and all(right["shape"]) and sum(right["place"]) < 0.5 * 60


def test_the_probe_carries_factored_features_to_held_out_pairs_and_not_tied_ones(small):
    def features(tied):  # images -> (n, 1, d): one-hot colour, shape, place, or colour x shape tied
        def f(images):
            rows = []
            for im in images:
                x = judge.analyse_scene(im)[0]
                if tied:
                    v = torch.zeros(len(COLOURS) * len(SHAPES) + len(PLACES))
                    v[COLOURS.index(x.color) * len(SHAPES) + SHAPES.index(x.shape)] = 1
                else:
                    v = torch.zeros(len(WORDS))
                    v[WORDS.index(x.color)] = v[WORDS.index(x.shape)] = 1
                v[-len(PLACES) + PLACES.index(x.position)] = 1
                rows.append(v)
            return torch.stack(rows)[:, None]
        return f
    right = card.probe_held_out(features(tied=False))
    assert all(all(r) for r in right.values()), {k: sum(r) for k, r in right.items()}
    right = card.probe_held_out(features(tied=True))
    # a held-out pair's feature was never on while fitting: the probe knows nothing of it
    assert sum(right["colour"]) < 50 and sum(right["shape"]) < 50 and all(right["place"])


def test_patches_are_read_where_each_holds_its_own_shape_and_not_where_each_holds_the_scene(small):
    def features(own):  # images -> (n, 64, d): each patch its nearest shape's colour, shape, place, or all the scene's
        def one_hot(x):
            v = torch.zeros(len(WORDS))
            v[WORDS.index(x.color)] = v[WORDS.index(x.shape)] = v[WORDS.index(x.position)] = 1
            return v
        def f(images):
            rows = []
            for im in images:
                scene = data.Scene(tuple(judge.analyse_scene(im)))  # as drawn, jitter too
                codes = torch.stack([one_hot(x) for x in scene.shapes])  # (2, d)
                rows.append(codes[data.nearest_shapes(scene, 8)] if own else codes.sum(0).expand(64, -1))
            return torch.stack(rows)
        return f
    right = card.probe_patches(features(own=True))
    assert all(all(r) for r in right.values()) and len(right["place"]) == 2 * card.SIZES["patches_test"]
    right = card.probe_patches(features(own=False))
    # every patch alike: both shapes get one answer, and two shapes never share a place
    assert sum(right["place"]) <= len(right["place"]) / 2


def asked(prompt):  # what a prompt asks, as a scene: "a red circle on the left and ..."
    claims = judge.parse_caption(prompt)
    return data.Scene(tuple(data.Shape(c["color"], c["shape"], "small", c.get("position", "in the middle"))
                            for c in claims))


def test_sd_rows_pass_a_faithful_drawer_and_fail_one_that_swaps_colours(small):
    rows, shown = card.sd_rows(lambda prompts, seed: [data.draw(asked(p)) for p in prompts])
    assert [(r["value"], r["n"]) for r in rows] == [(1.0, 12), (1.0, 12), (1.0, 24)]
    assert len(shown) == 4 + 6 and all(len(images) == 2 for _, images in shown[4:])

    def swapping(prompts, seed):
        scenes = [asked(p) for p in prompts]
        return [data.draw(data.swapped(s, "colour") or s if len(s.shapes) == 2 else s) for s in scenes]
    rows, _ = card.sd_rows(swapping)
    assert [r["value"] for r in rows] == [1.0, 0.0, 1.0]


def test_llm_rows_pass_a_reader_that_looks_back_and_leave_one_that_reads_the_last_words_at_chance(small):
    def looks_back(text, words):  # the colour the caption gave the named shape; the pictures counted
        if text.endswith("That makes"):
            return data.NUMBERS[text.count(data.IMAGE_TOKEN)]
        shape = text.split()[-2]  # "... <image> The circle is"
        told = judge.parse_caption(text.split(data.IMAGE_TOKEN)[0])
        return next(c["color"] for c in told if c["shape"] == shape)
    rows = card.llm_rows(looks_back)
    assert [r["value"] for r in rows] == [1.0, 1.0, 1.0] and rows[0]["n"] == 60 and 0 < rows[1]["n"] < 60

    def last_words(text, words):  # an n-gram model: its choice is fixed by the last two words
        return words[sum(map(len, text.split()[-2:])) % len(words)]
    rows = card.llm_rows(last_words)
    assert rows[0]["value"] < 0.4 and rows[1]["value"] < 0.4 and rows[2]["value"] == 0.5


def test_swapped_exchanges_one_attribute_and_twice_is_the_scene():
    scene = data.Scene((data.Shape("red", "circle", "small", "on the left"),
                        data.Shape("blue", "circle", "large", "on the right")))
    twin = data.swapped(scene, "colour")
    assert [(s.color, s.shape, s.size, s.position) for s in twin.shapes] == [
        ("blue", "circle", "small", "on the left"), ("red", "circle", "large", "on the right")]
    assert data.swapped(twin, "colour") == scene and data.swapped(scene, "shape") is None


def test_train_toys_twins_differ_from_their_scene_in_the_words_of_one_field():
    rng = random.Random(0)
    for i in range(200):
        scene = data.random_scene(rng, "all")
        twin, field = train_toy.twin(scene, rng)
        changed = {f for a, b in zip(scene.shapes, twin.shapes) for f in ("color", "shape", "size", "position")
                   if getattr(a, f) != getattr(b, f)}
        assert changed == {field}
        a, b = train_toy.twin_captions(scene, twin, field, rng)
        assert a != b and len(a.split()) == len(b.split())  # the same form, other words


def test_card_flag_measures_the_committed_backbones_and_writes_card_json(small, tmp_path, capsys):
    import json
    import shutil
    out = tmp_path / "toy"
    shutil.copytree(train_toy.Path(train_toy.__file__).parent / "toy", out)
    (out / "card.json").write_text(json.dumps({"other": 1}))
    train_toy.main(["--card", "--out", str(out), "--threads", "1"])
    report = json.loads((out / "card.json").read_text())
    assert report["other"] == 1 and report["llm"]["seed"] == report["clip"]["seed"] == report["sd"]["seed"] == card.SEED
    rows = report["llm"]["rows"] + report["clip"]["rows"] + report["sd"]["rows"]
    names = [r["name"] for r in rows]
    assert len(names) == 21 and "clip: true caption over its colour-swapped twin" in names
    assert "clip: read layer's patches, two held-out shapes, place" in names
    assert "clip: the same probe of the patch embeddings, shape" in names and "llm: pictures counted" in names
    for r in rows:
        assert 0 <= r["low"] <= r["value"] <= r["high"] + 1e-9 <= 1 + 1e-9 and r["n"] > 0
    assert (out / "samples.png").stat().st_size > 0
    assert "sd: two shapes bound and placed" in capsys.readouterr().out


def test_card_of_a_folder_without_backbones_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_toy.main(["--card", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "weights/train_toy.py" in err


def test_train_toy_trains_a_tokenizer_and_an_llm_that_loads_and_learns(tmp_path, capsys):
    import json
    import math
    out = tmp_path / "toy"
    train_toy.main(["--only", "tokenizer", "llm", "--scale", "0.02", "--out", str(out), "--threads", "1"])
    model = train_toy.llama.load(out / "llm")  # a few steps, loaded as a user loads it
    assert model.cfg.vocab_size == len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    said = capsys.readouterr().out
    loss = float(said.split("held-out loss ")[1].split()[0])
    assert loss < math.log(model.cfg.vocab_size) - 1, said  # a nat below chance, log(vocab): it learns
    assert [r["name"] for r in json.loads((out / "card.json").read_text())["llm"]["rows"]][-1] == "llm: pictures counted"


def test_patch_codes_give_every_patch_the_colour_shape_and_place_of_the_nearest_shape():
    scene = data.Scene((data.Shape("red", "circle", "small", "on the left"),
                        data.Shape("blue", "triangle", "large", "on the right", dx=2)))
    codes = train_toy.patch_codes(scene, patch=8)  # 64 / 8: an 8 x 8 grid, row-major
    assert codes.shape == (64, len(COLOURS) + len(SHAPES) + len(PLACES))
    grid = codes.view(8, 8, -1)
    red_circle = torch.zeros(14)
    red_circle[COLOURS.index("red")] = red_circle[6 + SHAPES.index("circle")] = 1
    red_circle[9 + PLACES.index("on the left")] = 1
    blue_triangle = torch.zeros(14)
    blue_triangle[COLOURS.index("blue")] = blue_triangle[6 + SHAPES.index("triangle")] = 1
    blue_triangle[9 + PLACES.index("on the right")] = 1
    # centres at x 16 and 50: columns 0-3 (x up to 32) are nearer the circle, 4-7 the triangle, every row
    assert (grid[:, :4] == red_circle).all() and (grid[:, 4:] == blue_triangle).all()
    top_bottom = data.Scene((data.Shape("green", "square", "small", "at the top"),
                             data.Shape("yellow", "circle", "small", "at the bottom")))
    rows = train_toy.patch_codes(top_bottom, patch=8).view(8, 8, -1).argmax(-1)  # the colour, first 6
    assert (rows[:4] == COLOURS.index("green")).all() and (rows[4:] == COLOURS.index("yellow")).all()


def test_the_read_part_trains_the_vision_tower_and_leaves_the_text_tower_byte_equal(small, tmp_path):
    # the text tower's token states are the toy UNet's condition: the read part must not move them
    import json
    import shutil
    from safetensors.torch import load_file
    toy, out = train_toy.Path(train_toy.__file__).parent / "toy", tmp_path / "toy"
    out.mkdir()
    shutil.copy(toy / "tokenizer.json", out)
    shutil.copytree(toy / "clip", out / "clip")
    (out / "card.json").write_text(json.dumps({"clip": {"training_minutes": {"clip": 35.8}}}))
    train_toy.main(["--only", "read", "--scale", "0.01", "--out", str(out), "--threads", "1"])
    before, after = load_file(toy / "clip" / "model.safetensors"), load_file(out / "clip" / "model.safetensors")
    assert before.keys() == after.keys()  # the head is dropped: the official layout, as clip.load reads it
    text = [k for k in before if k.startswith(("text_model.", "text_projection."))]
    vision = [k for k in before if k.startswith("vision_model.encoder.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert any(not torch.equal(before[k], after[k]) for k in vision)
    report = json.loads((out / "card.json").read_text())["clip"]
    assert report["training_minutes"]["clip"] == 35.8 and "read" in report["training_minutes"]
    assert any(r["name"] == "clip: read layer's probe on held-out pairs, shape" for r in report["rows"])
