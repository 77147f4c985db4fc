"""shapes/data.py: the shapes world's determinism, splits, text/scene agreement, the analyser, manifests."""
import collections
import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from shapes import data, judge

N = 600  # examples per stream checked for split properties


def all_single_scenes():
    for c, s, z, p in itertools.product(data.COLORS, data.SHAPES, data.SIZES, data.POSITIONS):
        for d in (-data.JITTER, 0, data.JITTER):
            yield data.Scene((data.Shape(c, s, z, p, d, -d),))


def blur_and_noise(img, rng, radius=1.0, sigma=20.0):
    x = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), np.float32)
    x = x + rng.normal(0, sigma, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def scenes_of(split, n=N):
    for i in range(n):
        yield data.caption_example(0, i, split)[1]
        yield from data.document_example(0, i, split)[1]
        yield data.question_example(0, i, split)[0]


def texts_of(split, n=N):
    for i in range(n):
        yield data.caption_example(0, i, split)[0]
        yield data.document_example(0, i, split)[0]
        yield " ".join(data.question_example(0, i, split)[1:])
    yield from data.text_corpus(0, n, split)


# ----------------------------------------------------------------------------------- determinism

def test_same_seed_same_items_different_seed_different_items():
    for f in (data.caption_example, data.document_example, data.question_example):
        a = [f(3, i) for i in range(50)]
        assert a == [f(3, i) for i in range(50)]
        assert a != [f(4, i) for i in range(50)]
    first = list(itertools.islice(data.documents(7), 5))
    again = list(itertools.islice(data.documents(7), 5))
    for (t1, im1), (t2, im2) in zip(first, again):
        assert t1 == t2 and [i.tobytes() for i in im1] == [i.tobytes() for i in im2]
    other = list(itertools.islice(data.documents(8), 5))
    assert [t for t, _ in first] != [t for t, _ in other]


def flat(item):  # a stream item with its images as bytes, for comparing
    out = []
    for x in item:
        xs = x if isinstance(x, list) else [x]
        out += [y.tobytes() if isinstance(y, Image.Image) else y for y in xs]
    return out


def test_streams_resume_at_an_index():
    # item i is a pure function of (seed, i): a stream started at 10 begins with the 11th item
    for stream in (data.captions, data.documents, data.questions):
        eleventh = next(itertools.islice(stream(1), 10, None))
        assert flat(next(stream(1, start=10))) == flat(eleventh)
        assert flat(next(stream(1, start=11))) != flat(eleventh)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        data.caption_example(0, 0, "test")


# ---------------------------------------------------------------------------------------- splits

def test_train_never_shows_a_held_out_or_validation_combination():
    for scene in scenes_of("train"):
        for s in scene.shapes:
            assert (s.color, s.shape) not in data.HELD_OUT + data.VALIDATION
    held = [re.compile(rf"\b{c} {s}\b") for c, s in data.HELD_OUT + data.VALIDATION]
    for text in texts_of("train"):
        assert not any(h.search(text) for h in held), text


def test_eval_shows_only_held_out_combinations():
    for scene in scenes_of("eval", 200):
        assert all((s.color, s.shape) in data.HELD_OUT for s in scene.shapes)
    assert [(c, s) for _, c, s in data.eval_prompts()] == list(data.HELD_OUT)
    assert all(p == f"a {c} {s}" for p, c, s in data.eval_prompts())


def test_val_shows_only_validation_combinations_none_of_eval():
    for scene in scenes_of("val", 200):
        assert all((s.color, s.shape) in data.VALIDATION for s in scene.shapes)
    assert [(c, s) for _, c, s in data.eval_prompts("val")] == list(data.VALIDATION)
    assert not set(data.VALIDATION) & set(data.HELD_OUT)
    # the example streams of the splits differ: a val question is never an eval one
    assert data.question_example(0, 0, "val")[0] != data.question_example(0, 0, "eval")[0]


def test_train_covers_every_colour_shape_and_allowed_combination():
    seen = {(s.color, s.shape) for scene in scenes_of("train") for s in scene.shapes}
    assert seen == set(data.combos("train"))
    assert {c for c, _ in seen} == set(data.COLORS) and {s for _, s in seen} == set(data.SHAPES)
    assert set(data.combos("all")) == seen | set(data.HELD_OUT) | set(data.VALIDATION)
    # balanced: every colour in two training pairs, every shape in four
    assert sorted(c for c, _ in seen) == sorted(list(data.COLORS) * 2)
    assert sorted(s for _, s in seen) == sorted(list(data.SHAPES) * 4)
    sizes_positions = {(s.size, s.position) for scene in scenes_of("train") for s in scene.shapes}
    assert sizes_positions == set(itertools.product(data.SIZES, data.POSITIONS))


# --------------------------------------------------------------------------------- text vs scene

def test_captions_describe_their_scene():
    counts = set()
    for i in range(N):
        text, scene = data.caption_example(0, i)
        counts.add(len(scene.shapes))
        phrases = text.split(" and ")
        assert len(phrases) == len(scene.shapes)
        for phrase, s in zip(phrases, scene.shapes):
            assert phrase.startswith("a ") and f"{s.color} {s.shape}" in phrase
            assert all(z == s.size for z in data.SIZES if f" {z} " in phrase)
            assert all(p == s.position for p in data.POSITIONS if p in phrase)
        assert data.short_caption(scene) == " and ".join(f"a {s.color} {s.shape}" for s in scene.shapes)
        assert data.caption(scene) == " and ".join(
            f"a {s.size} {s.color} {s.shape} {s.position}" for s in scene.shapes)
    assert counts == {1, 2}


def test_scenes_never_overlap_and_stay_inside():
    for scene in scenes_of("all", 300):
        boxes = []
        for s in scene.shapes:
            (x, y), r = data.POSITIONS[s.position], data.SIZES[s.size]
            x0, y0, x1, y1 = x + s.dx - r, y + s.dy - r, x + s.dx + r, y + s.dy + r
            assert 0 <= x0 and 0 <= y0 and x1 <= data.IMAGE_SIZE and y1 <= data.IMAGE_SIZE
            boxes.append((x0, y0, x1, y1))
        if len(boxes) == 2:
            (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes
            assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0
        assert len({(s.color, s.shape) for s in scene.shapes}) == len(scene.shapes)


def test_documents_have_one_placeholder_per_image():
    lengths = set()
    for i in range(N):
        text, scenes = data.document_example(0, i)
        lengths.add(len(scenes))
        assert text.count(data.IMAGE_TOKEN) == len(scenes)
        for scene in scenes:  # each image is described somewhere in the text
            assert all(f"{s.color} {s.shape}" in text for s in scene.shapes)
    assert lengths == {1, 2, 3}
    for text, images in itertools.islice(data.documents(0), 20):
        assert text.count(data.IMAGE_TOKEN) == len(images)
        assert all(im.size == (data.IMAGE_SIZE,) * 2 and im.mode == "RGB" for im in images)


# every shape the world can show, and the sentence right after a picture of a document
WORLD = [data.Shape(*k) for k in itertools.product(data.COLORS, data.SHAPES, data.SIZES, data.POSITIONS)]


def first_sentence(after):
    return after.strip().split(". ")[0].rstrip(".") + "."


@pytest.mark.parametrize("training", [False, True])
def test_text_after_an_image_often_refers_back_to_it_and_truly(training):
    forms = data.TRAINING_BACK if training else data.BACK
    any_back = {b.format(**vars(s)) for s in WORLD for b in forms}  # every such sentence about any shape
    images = referred = 0
    for i in range(N):
        text, scenes = data.document_example(0, i, training=training)
        plain, plain_scenes = data.document_example(0, i, back=False, training=training)
        assert plain_scenes == scenes  # without them: the same documents
        afters = zip(text.split(data.IMAGE_TOKEN)[1:], plain.split(data.IMAGE_TOKEN)[1:])
        for scene, (after, plain_after) in zip(scenes, afters):
            first = first_sentence(after)
            true = {b.format(**vars(s)) for s in scene.shapes for b in forms}
            images += 1
            referred += first in any_back
            assert first not in any_back or first in true, (text, first)
            assert first_sentence(plain_after) not in any_back
    assert 0.6 < referred / images < 0.8, referred / images  # 7 images in 10


def test_training_documents_never_say_a_colour_with_its_shape_after_a_picture():
    # training's pairs only: "The blue circle is large." would teach "blue" to predict the shape
    paired = {b.format(**vars(s)) for s in WORLD for b in data.BACK if "{color}" in b and "{shape}" in b}
    backs = {b.format(**vars(s)) for s in WORLD for b in data.TRAINING_BACK}
    said = []
    for i in range(N):
        document = data.example("document", 0, i)[0]
        reply = data.example("instruct", 0, i)[3]
        for after in document.split(data.IMAGE_TOKEN)[1:] + reply.split(data.IMAGE_TOKEN)[1:]:
            first = first_sentence(after)
            assert first not in paired, first
            said += [first] if first in backs else []
    claims = [c for s in said for c in judge.parse_caption(s)]
    assert claims and not any("color" in c and "shape" in c for c in claims)
    assert {k for c in claims for k in c} == {"color", "shape", "size", "position"}  # each is said


def test_instructions_are_answered_with_what_they_ask_for():
    forms = set()
    for i in range(N):
        instruction, reply, scenes = data.instruction_example(0, i)
        assert reply.count(data.IMAGE_TOKEN) == len(scenes) and data.IMAGE_TOKEN not in instruction
        if instruction.startswith("Write about"):  # a document of one picture per shape asked for
            forms.add("write")
            assert instruction == data.WRITE.format(data.NUMBERS[len(scenes)])
            assert all(len(scene.shapes) == 1 for scene in scenes) and len(scenes) in (2, 3)
            before = reply.split(data.IMAGE_TOKEN)[:-1]  # each picture is named right before it
            assert all(f"{sc.shapes[0].color} {sc.shapes[0].shape}" in b for sc, b in zip(scenes, before))
        else:  # "Draw a red circle." -> the picture, then a true sentence about it
            forms.add("draw")
            (scene,) = scenes
            assert instruction.rstrip(".") in [d.format(data.caption(scene, form=f)).rstrip(".")
                                               for d in data.DRAW
                                               for f in ("full", "no size", "no position", "short")]
            after = reply.split(data.IMAGE_TOKEN)[1].strip()
            assert after in {b.format(**vars(s)) for s in scene.shapes for b in data.TRAINING_BACK}
        text, images, layout, rep = data.example("instruct", 0, i)
        assert (text, rep, layout, len(images)) == (instruction, reply, "instruct", len(scenes))
    assert forms == {"write", "draw"}
    for i in range(100):  # and never a held-out combination in training
        assert all((s.color, s.shape) not in data.HELD_OUT
                   for sc in data.instruction_example(0, i)[2] for s in sc.shapes)


def answer(scene, question):
    """An independent reading of the question: find the one shape it names, then answer."""
    if question == "How many shapes are there?":
        return "count", {1: "one", 2: "two"}[len(scene.shapes)]
    words = question.rstrip("?")
    named = [s for s in scene.shapes
             if (s.shape in words.split() or "thing" in words or "kind of shape" in words)
             and (f" {s.color} " in f" {words} " or not any(f" {c} " in f" {words} " for c in data.COLORS))
             and (s.position in words or not any(p in words for p in data.POSITIONS))
             and (s.shape in words.split() or not any(k in words.split() for k in data.SHAPES))]
    assert len(named) == 1, (scene, question)
    s = named[0]
    if "colour" in words:
        return "colour", s.color
    if "shape is" in words:
        return "shape", s.shape
    if words.startswith("Where"):
        return "where", s.position
    if "small or large" in words:
        return "size", s.size
    raise AssertionError(f"unexpected question {question!r}")


def test_questions_are_answered_right():
    kinds = set()
    for i in range(N):
        scene, question, ans = data.question_example(0, i)
        kind, expected = answer(scene, question)
        assert expected == ans, (scene, question)
        kinds.add(kind)
    assert kinds == {"colour", "shape", "count", "where", "size"}


def test_training_questions_never_name_a_shape_by_its_pair():
    # train.py's questions (example "vqa") are the question stream's, same scene, kind and answer,
    # but name the shape asked about without its colour-shape pair: a colour or shape question by
    # its place, a where or size question by its colour or its shape; the benchmark's forms ("What
    # shape is the yellow thing?", "Where is the yellow square?") are question_example's default
    pairs = [f" {c} {k} " for c in data.COLORS for k in data.SHAPES]
    kinds = collections.Counter()
    for i in range(N):
        scene, asked, ans = data.question_example(0, i)
        text, images, layout, reply = data.example("vqa", 0, i)
        question = text.removeprefix(f"{data.IMAGE_TOKEN} ")
        assert (layout, reply, images[0].tobytes()) == ("chat", f" {ans}", data.draw(scene).tobytes())
        kind, expected = answer(scene, question)
        assert expected == ans, (scene, question)
        kinds[kind] += question != asked
        words, asked_words = f" {question.rstrip('?')} ", f" {asked.rstrip('?')} "
        if kind in ("colour", "shape"):
            assert not any(f" {w} " in words for w in (*data.COLORS, *data.SHAPES)), question
            assert any(f" {w} " in asked_words for w in (*data.COLORS, *data.SHAPES)), asked
        elif kind in ("where", "size"):
            assert not any(p in words for p in pairs) and any(p in asked_words for p in pairs), question
        else:
            assert question == asked
    assert all(kinds[k] > N / 10 for k in ("colour", "shape", "where", "size")), kinds


def test_text_corpus():
    lines = data.text_corpus(5, 90)
    assert len(lines) == 90 and lines == data.text_corpus(5, 90) and lines != data.text_corpus(6, 90)
    assert all(isinstance(line, str) and line and "\n" not in line for line in lines)
    # captions, documents and Q&A in turn, each the text of its stream's example
    assert lines[0::3] == [data.caption_example(5, j)[0] for j in range(30)]
    assert lines[1::3] == [data.document_example(5, j)[0] for j in range(30)]
    assert lines[2::3] == [f"<image> {q} {a}" for _, q, a in (data.question_example(5, j) for j in range(30))]


# ------------------------------------------------------------------------------- drawing, analysis

def test_draw_keeps_palette_colours_inside_and_background_outside():
    for scene in all_single_scenes():
        s = scene.shapes[0]
        img = data.draw(scene)
        assert img.size == (64, 64) and img.mode == "RGB"
        (x, y) = data.POSITIONS[s.position]
        y_in = y + s.dy + (data.SIZES[s.size] // 2 if s.shape == "triangle" else 0)  # below the apex
        assert img.getpixel((x + s.dx, y_in)) == data.COLORS[s.color]
        assert img.getpixel((0, 0)) == img.getpixel((63, 63)) == data.BACKGROUND
    big = data.draw(scene, size=128)
    assert big.size == (128, 128)


def test_analyser_is_exact_on_clean_images_of_any_size():
    wrong = [(sc, judge.analyse(data.draw(sc))) for sc in all_single_scenes()
             if judge.analyse(data.draw(sc)) != (sc.shapes[0].color, sc.shapes[0].shape)]
    assert not wrong, wrong[:5]
    for scene in list(all_single_scenes())[::17]:
        s = scene.shapes[0]
        assert judge.analyse(data.draw(scene, size=256)) == (s.color, s.shape)
        assert judge.analyse(data.draw(scene, size=48)) == (s.color, s.shape)


@pytest.mark.parametrize("radius,sigma", [(1.0, 20.0), (1.5, 30.0)])
def test_analyser_is_robust_to_blur_and_noise(radius, sigma):
    rng = np.random.default_rng(0)
    scenes = list(all_single_scenes())
    right = sum(judge.analyse(blur_and_noise(data.draw(sc), rng, radius, sigma))
                == (sc.shapes[0].color, sc.shapes[0].shape) for sc in scenes)
    assert right / len(scenes) >= 0.95, right / len(scenes)


def test_analyser_on_empty_and_two_shape_images():
    empty = Image.new("RGB", (64, 64), data.BACKGROUND)
    assert judge.analyse(empty) == (None, None)
    assert judge.analyse(blur_and_noise(empty, np.random.default_rng(1), sigma=15.0)) == (None, None)
    assert judge.analyse(empty.convert("L").convert("RGBA")) == (None, None)
    for (c1, s1), (c2, s2) in [(("red", "circle"), ("blue", "square")), (("green", "triangle"), ("purple", "circle"))]:
        scene = data.Scene((data.Shape(c1, s1, "small", "on the left"), data.Shape(c2, s2, "large", "on the right")))
        assert judge.analyse(data.draw(scene)) == (c2, s2)  # the larger shape


# ------------------------------------------------------------------------------------- manifests

def write_images(folder, n):
    names = []
    for i, (_, scene) in enumerate(data.caption_example(0, j) for j in range(n)):
        (folder / "imgs").mkdir(exist_ok=True)
        data.draw(scene).save(folder / "imgs" / f"{i}.png")
        names.append(f"imgs/{i}.png")
    return names


def test_manifests_round_trip(tmp_path):
    names = write_images(tmp_path, 3)
    pairs = [{"image": n, "text": f"caption {i}"} for i, n in enumerate(names)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n\n")
    got = list(data.read_pairs(tmp_path / "pairs.jsonl"))
    assert [t for t, _ in got] == ["caption 0", "caption 1", "caption 2"]
    for (_, img), n in zip(got, names):
        assert img.mode == "RGB" and img.tobytes() == Image.open(tmp_path / n).convert("RGB").tobytes()
    docs = [{"text": "One. <image> Two. <image>", "images": names[:2]}, {"text": "No images.", "images": []}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    got = list(data.read_documents(str(tmp_path / "docs.jsonl")))
    assert [t for t, _ in got] == [d["text"] for d in docs] and [len(i) for _, i in got] == [2, 0]
    assert got[0][1][1].tobytes() == Image.open(tmp_path / names[1]).convert("RGB").tobytes()


GOOD_PAIR = '{"image": "imgs/0.png", "text": "x"}'
GOOD_DOC = '{"text": "x <image>", "images": ["imgs/0.png"]}'


@pytest.mark.parametrize("reader,bad,problem", [
    ("pairs", '{"image": "imgs/0.png", "text": "x"', "bad JSON"),
    ("pairs", '["imgs/0.png", "x"]', "JSON object"),
    ("pairs", '{"text": "x"}', "missing key 'image'"),
    ("pairs", '{"image": "imgs/0.png", "text": 3}', "'text' should be a str"),
    ("pairs", '{"image": "imgs/nope.png", "text": "x"}', "image file not found"),
    ("pairs", '{"image": "notes.txt", "text": "x"}', "not a readable image"),
    ("docs", '{"text": "x <image> <image>", "images": ["imgs/0.png"]}', "2 <image> placeholders but 1 images"),
    ("docs", '{"text": "x", "images": ["imgs/0.png"]}', "0 <image> placeholders but 1 images"),
    ("docs", '{"text": "x <image>"}', "missing key 'images'"),
    ("docs", '{"text": "x <image>", "images": "imgs/0.png"}', "'images' should be a list"),
    ("docs", '{"text": "x <image>", "images": ["imgs/gone.png"]}', "image file not found"),
])
def test_bad_manifest_lines_name_file_line_and_problem(tmp_path, reader, bad, problem):
    write_images(tmp_path, 1)
    (tmp_path / "notes.txt").write_text("not an image")
    good = GOOD_PAIR if reader == "pairs" else GOOD_DOC
    path = tmp_path / "m.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n")  # the bad line is line 3 (a blank line counts)
    read = data.read_pairs if reader == "pairs" else data.read_documents
    with pytest.raises(ValueError) as e:
        list(read(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and problem in msg and "\n" not in msg


def test_an_opening_is_a_pair_framed_as_a_document_opens_and_unframe_gives_its_caption():
    for e in range(20):
        text, images, layout, reply = data.example("opening", 0, e)
        caption, scene = data.caption_example(0, e)
        assert (layout, reply, len(images)) == ("t2i", "", 1)
        assert text.startswith(tuple(f.split("{}")[0] for f in data.FIRST))
        assert data.unframe(text) == f"{caption} {data.IMAGE_TOKEN}" != text
    for kind in ("t2i", "document", "instruct"):  # nothing else is unframed
        text = data.example(kind, 0, 3)[0]
        assert data.unframe(text) == text
