"""shapes/benchmark.py and its judges: judge.analyse_scene on drawn scenes, judge.parse_caption on every
template, the Wilson interval, the benchmark end to end on the tiny preset (and with an oracle
that must score 1 everywhere, a blank painter that must score 0), sample.py's document.json."""
import dataclasses
import html
import json
import random
import re

import pytest
import torch
from PIL import Image

import dreamllm
import sample
import train
from plumbing import cli
from shapes import benchmark, data, judge

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
TINY = benchmark.Sizes(images=2, two_shapes=3, two_shape_images=2, questions=10, captions=3,
                       documents=2, answer_tokens=3, caption_tokens=6, document_tokens=5)
FAST = dict(benchmark.SAMPLING, steps=2)
ROWS = ["create: held-out shape, colour", "create: held-out shape, shape",
        "create: held-out shape, both", "create: two shapes bound and placed",
        "create: number of shapes", "VQA: colour", "VQA: shape", "VQA: count", "VQA: where",
        "VQA: size", "VQA: all", "VQA: all, training's combinations",
        "caption: all shapes named, all true",
        "document: the picture asked for", "document: refers back",
        "document: back statements true", "document: ends"]


def attributes(shapes):
    return [(s.color, s.shape, s.size, s.position, s.dx, s.dy) for s in shapes]


# ------------------------------------------------------------------------------------ the judges

@pytest.mark.parametrize("split", ["train", "eval"])
def test_analyse_scene_recovers_every_drawn_shape(split):
    # colour, shape, size, position and even the jitter, of one or two shapes: accuracy 1.0
    scenes = [data.random_scene(random.Random(i), split) for i in range(150)]
    right = [attributes(judge.analyse_scene(data.draw(sc))) ==
             attributes(sorted(sc.shapes, key=lambda s: data.POSITIONS[s.position]))
             for sc in scenes]
    assert sum(right) / len(right) == 1.0, [sc for sc, r in zip(scenes, right) if not r][:3]
    assert {len(sc.shapes) for sc in scenes} == {1, 2}
    for sc in scenes[:20]:  # analyse's verdict is analyse_scene's largest shape
        big = benchmark.largest(judge.analyse_scene(data.draw(sc)))
        assert (big.color, big.shape) == judge.analyse(data.draw(sc))


def test_analyse_scene_order_sizes_and_nothing():
    scene = data.Scene((data.Shape("red", "square", "large", "at the bottom"),
                        data.Shape("blue", "circle", "small", "at the top")))
    found = judge.analyse_scene(data.draw(scene, size=128))  # any size: read on the 64 grid
    assert [(f.color, f.position, f.size) for f in found] == [("blue", "at the top", "small"),
                                                             ("red", "at the bottom", "large")]
    assert found[1].pixels > 2 * found[0].pixels
    canvas = Image.new("RGB", (64, 64), data.BACKGROUND)
    assert judge.analyse_scene(canvas) == []
    canvas.paste(data.COLORS["red"], (5, 5, 8, 8))  # 9 pixels: under MIN_PIXELS, noise
    assert judge.analyse_scene(canvas) == []


def test_parse_caption_reads_every_form():
    scene = data.Scene((data.Shape("red", "circle", "small", "on the left"),
                        data.Shape("blue", "square", "large", "on the right")))
    fields = {"full": ("size", "color", "shape", "position"), "no size": ("color", "shape",
              "position"), "no position": ("size", "color", "shape"), "short": ("color", "shape")}
    for form, keys in fields.items():
        claims = [{k: getattr(s, k) for k in keys} for s in scene.shapes]
        text = data.caption(scene, form=form)
        assert judge.parse_caption(text) == claims, text
        for template in data.FIRST + data.NEXT + data.AFTER:  # "Here is {}." and the like
            assert judge.parse_caption(template.format(text)) == claims, template
    s = scene.shapes[1]
    for template in data.BACK + data.TRAINING_BACK:  # "The {shape} is {color}." names what it formats
        keys = re.findall(r"{(\w+)}", template)
        assert judge.parse_caption(template.format(**vars(s))) == [{k: getattr(s, k) for k in keys}]
    assert judge.parse_caption("It is a blue triangle.") == [dict(color="blue", shape="triangle")]
    assert judge.parse_caption("That square is at the top.") == [dict(shape="square",
                                                                     position="at the top")]
    assert judge.parse_caption("The red square is small.") == [dict(color="red", shape="square",
                                                                   size="small")]
    for nothing in ("", "That makes two pictures.", "Let us look at some shapes.", "circles"):
        assert judge.parse_caption(nothing) == []
    # a phrase that names a colour twice is two claims; case and spacing do not matter
    assert judge.parse_caption("A red blue circle In  the middle") == [
        dict(color="red"), dict(color="blue", shape="circle", position="in the middle")]


def test_every_claim_of_a_training_document_is_true_of_its_pictures():
    for i in range(100):
        text, scenes = data.document_example(0, i, "eval")
        shapes = [s for sc in scenes for s in sc.shapes]
        claims = judge.parse_caption(text)
        assert claims and all(any(benchmark.true_of(c, s) for s in shapes) for c in claims), text


def test_back_statements_leave_out_sentences_that_announce_a_picture():
    said = benchmark.back_statements(" It is a red circle. Next comes a blue square. The square "
                                     "is small. That makes two pictures.")
    assert said == [dict(color="red", shape="circle"), dict(shape="square", size="small")]


def test_wilson_interval_by_hand():
    # z = 1.96, n = 10: z^2/n = 0.38416; centre (k/n + 0.19208) / 1.38416; half-width
    # 1.96 / 1.38416 * sqrt(p (1 - p) / 10 + 0.009604)
    for k, (low, high) in {0: (0.0, 0.27754), 10: (0.72246, 1.0), 5: (0.23659, 0.76341)}.items():
        assert benchmark.wilson(k, 10) == pytest.approx((low, high), abs=1e-5)
    assert benchmark.wilson(0, 0) == (0.0, 1.0)
    assert benchmark.row("x", [True, False, True, True]) == dict(
        name="x", n=4, value=0.75, low=pytest.approx(0.3006, abs=1e-4),
        high=pytest.approx(0.9544, abs=1e-4))


# ------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny(one_thread):
    return cli.build_model("tiny").eval()


def test_benchmark_writes_every_row_with_the_sizes_as_n(tiny, tmp_path):
    rows = benchmark.benchmark(tiny, tmp_path, seed=1, sampling=FAST, sizes=TINY)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [r["name"] for r in rows] == [r["name"] for r in report["rows"]] == ROWS
    n = {r["name"]: r["n"] for r in rows}
    singles, twos = 4 * TINY.images, TINY.two_shapes * TINY.two_shape_images
    assert [n[r] for r in ROWS[:5]] == [singles] * 3 + [twos, singles + twos]
    assert sum(n[f"VQA: {k}"] for k in benchmark.KINDS) == n["VQA: all"] == TINY.questions
    assert n["VQA: all, training's combinations"] == TINY.questions
    assert n["caption: all shapes named, all true"] == TINY.captions
    assert [n[r] for r in ROWS[13:15] + ROWS[16:]] == [TINY.documents] * 3
    docs = report["details"]["documents"]
    assert n["document: back statements true"] == sum(len(d["statements"]) for d in docs)
    for r in rows:
        assert r["low"] <= r["high"] and (r["value"] is None or r["low"] <= r["value"] <= r["high"])
    assert len(report["details"]["single"]) == singles and report["sizes"]["images"] == TINY.images
    # the page: every row, every picture it shows beside it
    page = (tmp_path / "eval.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and all(html.escape(r) in page for r in ROWS)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert {"eval_grid.png", "eval_two_shapes.png"} <= set(sources) and len(sources) >= 4
    assert all((tmp_path / s).is_file() for s in sources)
    # the same seed, the same run
    again = benchmark.benchmark(tiny, tmp_path / "again", seed=1, sampling=FAST, sizes=TINY)
    details = json.loads((tmp_path / "again" / "eval.json").read_text())["details"]
    assert again == rows and details == report["details"]


def test_the_control_asks_of_training_pairs_in_pictures_training_never_drew():
    # "VQA: all, training's combinations": the split's own colour-shape pairs, none held out, but
    # not the examples train.py trains on (its question i of seed s)
    asked = [data.question_example("benchmark/0", i, "train") for i in range(200)]
    pairs = {(s.color, s.shape) for scene, _, _ in asked for s in scene.shapes}
    assert pairs == set(data.combos("train"))
    trained = [data.question_example(0, i, "train") for i in range(200)]
    assert sum(a == t for a, t in zip(asked, trained)) == 0  # another stream, not a shifted one


def test_page_escapes_every_text(tiny, tmp_path):
    report = dict(rows=[benchmark.row("<rows>", [True])], about="a & b", details=dict(
        vqa=[dict(question="<q>", answer="a", reply="<b>x</b>", right=False)],
        vqa_seen=[dict(question="<seen>", answer="a", reply="a", right=True)],
        captions=[dict(truth="t", caption="<i>c", right=True)],
        documents=[dict(opening="<o>", segments=[dict(text="<t>"), dict(image="d/0.png",
                        seen=["<s>"])], statements=[], ended=True)]))
    page = benchmark.page(report)
    for raw in ("<rows>", "<q>", "<seen>", "<b>x", "<i>c", "<o>", "<t>", "<s>", "a & b"):
        assert raw not in page and html.escape(raw) in page


def oracle(model, monkeypatch, paint):
    # a model that draws what it is told (paint(scene) -> image), answers from a table of the
    # benchmark's questions, captions what it sees and says of each picture what it is
    def shape_of(claim):
        return data.Shape(claim["color"], claim["shape"], claim.get("size", "large"),
                          claim.get("position", "in the middle"))

    def draw_all(model, prompts, k, sampling, g, desc, condition=None):
        return [[paint(data.Scene(tuple(map(shape_of, judge.parse_caption(p)))))] * k
                for p in prompts]
    answers = {}
    for i in range(TINY.questions):  # held-out pictures, and fresh ones of training's pairs
        for scene, question, answer in (data.question_example(0, i, "eval"),
                                        data.question_example("benchmark/0", i, "train")):
            answers[question, data.draw(scene).tobytes()] = answer

    def generate(text, images=(), layout="document", **kw):
        if layout == "i2t":  # a caption of what is there
            return [data.caption(data.Scene(tuple(judge.analyse_scene(images[0]))))]
        scene = data.Scene((shape_of(judge.parse_caption(text)[0]),))
        return [paint(scene), " It is a {color} {shape}. The {shape} is {size}.".format(
            **vars(scene.shapes[0]))]
    monkeypatch.setattr(benchmark, "draw_all", draw_all)
    monkeypatch.setattr(model, "answer", lambda image, q, **kw: answers[q, image.tobytes()])
    monkeypatch.setattr(model, "generate", generate)


def test_an_oracle_scores_one_everywhere_and_a_blank_painter_zero(tiny, tmp_path, monkeypatch):
    oracle(tiny, monkeypatch, data.draw)
    sizes = dataclasses.replace(TINY, document_tokens=60)  # it writes under 50 bytes, then ends
    rows = benchmark.benchmark(tiny, tmp_path, sampling=FAST, sizes=sizes)
    assert {r["name"]: r["value"] for r in rows} == {name: 1.0 for name in ROWS}
    rows = benchmark.benchmark(tiny, tmp_path, sampling=FAST, sizes=TINY)  # 5: it runs out
    assert [r["value"] for r in rows if r["name"] == "document: ends"] == [0.0]
    blank = Image.new("RGB", (64, 64), data.BACKGROUND)
    oracle(tiny, monkeypatch, lambda scene: blank)
    rows = benchmark.benchmark(tiny, tmp_path, sampling=FAST, sizes=TINY)
    values = {r["name"]: r["value"] for r in rows}
    assert [values[r] for r in ROWS[:5] + ROWS[13:14]] == [0.0] * 6
    assert values["document: back statements true"] == 0.0  # nothing there to be true of


def test_the_validation_split_asks_only_of_validation_pairs(tiny, tmp_path, monkeypatch):
    asked = []
    blank = Image.new("RGB", (64, 64), data.BACKGROUND)
    monkeypatch.setattr(benchmark, "draw_all", lambda model, prompts, k, *a, **kw: asked.extend(prompts) or
                        [[blank] * k for _ in prompts])
    benchmark.benchmark(tiny, tmp_path, sampling=FAST, sizes=TINY, split="val")
    report = json.loads((tmp_path / "eval.json").read_text())
    val = [re.compile(rf"\b{c} {s}\b") for c, s in data.VALIDATION]
    assert report["split"] == "val" and asked and all(any(v.search(p) for v in val) for p in asked)
    questions = [d["question"] for d in report["details"]["vqa"]]
    assert questions and report["about"].startswith("split val (yellow square, purple circle)")


def test_main_untrained_and_bad_input(tmp_path, capsys):
    benchmark.main(["--untrained", "--preset", "tiny", "--quick", "--steps", "2", "--questions",
                    "3", "--document-tokens", "4", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model"] == "tiny, untrained" and report["sizes"]["questions"] == 3
    assert "VQA: all" in capsys.readouterr().out
    for argv, code, says in [(["--images", "0"], 2, "--images must be at least 1"),
                             (["--ckpt", str(tmp_path / "none")], 1, "no checkpoint there")]:
        with pytest.raises(SystemExit) as e:
            benchmark.main(argv + ["--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == code and len(err) == 1 and says in err[0], err


def test_text_encoder_draws_from_e_of_each_prompt_and_judges_creation_only(tmp_path, capsys,
                                                                           monkeypatch):
    # --text-encoder: no LLM; SD drawn from its own text encoder's states E(prompt), null E("")
    seen, sample = [], dreamllm.DreamLLM.sample_images

    def recording(self, context, **kw):
        seen.append((self, context, kw["null"]))
        return sample(self, context, **kw)
    monkeypatch.setattr(dreamllm.DreamLLM, "sample_images", recording)
    benchmark.main(["--text-encoder", "--preset", "tiny-text", "--quick", "--steps", "2",
                    "--out", str(tmp_path)])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [r["name"] for r in report["rows"]] == [r for r in ROWS if r.startswith("create:")]
    assert "text encoder" in report["model"]
    model, context, null = seen[0]
    first = data.eval_prompts()[0][0]
    assert torch.equal(context[0], model.text_states([first])[0])
    assert torch.equal(null, model.text_states([""]))
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--text-encoder", "--preset", "tiny", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "no text encoder" in err[0], err
    assert not (tmp_path / "o").exists()


def test_drawings_show_what_the_prompt_asks_and_vary_the_rest():
    # the fitted conditions' data: the asked colours, shapes and places; sizes and places vary
    pictures = benchmark.drawings([("red", "circle", "on the left"), ("blue", "square", "on the right")],
                                  6, random.Random(0), data.IMAGE_SIZE)
    assert pictures.shape == (6, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and pictures.min() >= -1
    for x in pictures:
        image = Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        found = sorted((f.color, f.shape, f.position) for f in judge.analyse_scene(image))
        assert found == [("blue", "square", "on the right"), ("red", "circle", "on the left")]
    lone = benchmark.drawings([("green", "circle", None)], 40, random.Random(1), data.IMAGE_SIZE)
    seen = [judge.analyse_scene(Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0)
                                                .numpy())) for x in lone]
    assert all(len(f) == 1 and (f[0].color, f[0].shape) == ("green", "circle") for f in seen)
    assert len({f[0].position for f in seen}) >= 4 and len({f[0].size for f in seen}) == 2


def test_fitted_conditions_lower_the_frozen_unets_loss_on_fresh_drawings(capsys, tmp_path):
    # fitted by the denoising loss from E(prompt); judged on drawings the fit never saw, with the
    # same noise and timesteps for both conditions, so only the condition differs
    torch.manual_seed(0)
    model = cli.build_model("tiny-text", seed=0).eval()
    sizes = dataclasses.replace(TINY, two_shapes=1)
    fitted = benchmark.fitted_conditions(model, sizes, 0, steps=40)
    prompt, colour, shape = data.eval_prompts()[0]
    assert not torch.equal(fitted(prompt), model.text_states([prompt]))
    assert torch.equal(fitted(""), model.text_states([""]))  # CFG's null stays E("")
    with torch.no_grad():
        mean, _ = model.vae.encode(benchmark.drawings([(colour, shape, None)], 64, random.Random(9),
                                                      model.config.image_size))
        z0, g = model.vae.scaling_factor * mean, torch.Generator().manual_seed(1)
        eps = torch.randn(z0.shape, generator=g)
        t = torch.randint(model.noise_scheduler.num_train_timesteps, (len(z0),), generator=g)
        loss = {name: benchmark.diffusion.denoising_loss(model.unet, model.noise_scheduler, z0, eps, t,
                                                         c.expand(len(z0), -1, -1)).item()
                for name, c in (("E", model.text_states([prompt])), ("fitted", fitted(prompt)))}
    assert loss["fitted"] < loss["E"], loss
    # the flag: creation rows only, the model named, and bad values refused in one line
    benchmark.main(["--fit-condition", "2", "--preset", "tiny-text", "--quick", "--steps", "2",
                    "--out", str(tmp_path)])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [r["name"] for r in report["rows"]] == [r for r in ROWS if r.startswith("create:")]
    assert "fitted to each prompt (2 steps" in report["model"]
    for argv, code, says in [(["--fit-condition", "-1"], 2, "--fit-condition must be at least 1"),
                             (["--fit-condition", "2", "--preset", "tiny"], 1, "no text encoder")]:
        with pytest.raises(SystemExit) as e:
            benchmark.main(argv + ["--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == code and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- sample.py's hooks

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("run")
    train.main(["--preset", "tiny", "--stage", "I-comprehension", "--steps", "2", "--batch-size",
                "2", "--device", "cpu", "--out", str(out)])
    return str(out)


def test_document_json_lists_the_document_in_order(ckpt, tmp_path):
    text = 'Here is a "red" circle & more. <image>'
    sample.main(["--ckpt", ckpt, "--document", text, "--steps", "2", "--max-new-tokens", "5",
                 "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "document.json").read_text(encoding="utf-8"))
    prompt = text.removesuffix("<image>")
    assert doc["prompt"] == prompt and doc["segments"][0] == {"text": prompt}
    assert doc["segments"][1] == {"image": "document_1.png"}  # the image asked for, first
    images = [s["image"] for s in doc["segments"] if "image" in s]
    assert images == [f"document_{i + 1}.png" for i in range(len(images))]
    assert all(Image.open(tmp_path / name).size == (64, 64) for name in images)
    assert all(list(s) in (["text"], ["image"]) for s in doc["segments"])
    page = (tmp_path / "document.html").read_text(encoding="utf-8")
    assert re.findall(r'<img src="([^"]+)"', page) == images


def test_sample_eval_runs_the_benchmark(ckpt, tmp_path, monkeypatch, capsys):
    # sample.py sets two sizes; the others (made small here) are the benchmark's defaults
    monkeypatch.setattr(benchmark, "Sizes", lambda **kw: dataclasses.replace(TINY, **kw))
    sample.main(["--ckpt", ckpt, "--eval", "--eval-images", "1", "--eval-questions", "2",
                 "--steps", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "eval.json").read_text())
    n = {r["name"]: r["n"] for r in report["rows"]}
    assert list(n) == ROWS and n["create: held-out shape, both"] == 4 and n["VQA: all"] == 2
    assert report["model"].endswith("step-2") and report["sampling"]["steps"] == 2
    assert "document: ends" in capsys.readouterr().out
    assert (tmp_path / "eval_grid.png").is_file() and (tmp_path / "eval.html").is_file()
