"""sample.py on a tiny checkpoint (CPU): images, the interleaved document's HTML, answers, bad input
(--eval and document.json: tests/test_benchmark.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import dreamllm
import sample
import train
from shapes import data

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # see conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread):
    # (--eval, the benchmark: tests/test_benchmark.py)
    out = tmp_path_factory.mktemp("run")
    train.main(["--preset", "tiny", "--stage", "I-comprehension", "--steps", "2", "--batch-size", "2", "--device", "cpu",
                "--out", str(out)])
    return str(out)


def run(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def one_line_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def fails(argv, capsys):
    # in-process: sample.main exits with status 1 and a one-line message on stderr
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("sample.py: "), err
    return err[0]


def test_prompt_writes_pngs_and_a_grid(ckpt, tmp_path):
    r = run("--ckpt", ckpt, "--prompt", "a red circle", "--num-images", "2", "--steps", "5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["a_red_circle_0.png", "a_red_circle_1.png", "grid.png"]
    assert Image.open(tmp_path / "a_red_circle_0.png").size == (64, 64)
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 64  # two images, scaled up, side by side
    assert not (Path(ckpt) / "grid.png").exists()


def test_document_html_references_images_that_exist(ckpt, tmp_path):
    text = "Here is a <b>red</b> circle & more. <image>"  # a final <image>: an image is written there
    r = run("--ckpt", ckpt, "--document", text, "--steps", "5", "--max-new-tokens", "6", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    page = (tmp_path / "document.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and 'charset="utf-8"' in page
    assert "&lt;b&gt;red&lt;/b&gt; circle &amp; more." in page and "<b>red</b>" not in page  # escaped
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) >= 1
    for src in sources:
        assert Image.open(tmp_path / src).size == (64, 64)


def test_answer_asks_in_the_training_format_and_prints_the_reply(ckpt, tmp_path, capsys, monkeypatch):
    picture, asked = tmp_path / "q.png", []
    data.draw(data.caption_example(0, 0, "eval")[1]).save(picture)
    generate = dreamllm.DreamLLM.generate

    def spy(self, text, images=(), **kw):
        asked.append((text, images, kw["max_images"]))
        generate(self, text, images, **kw)  # really run it, then answer for the test
        return [" blue"]
    monkeypatch.setattr(dreamllm.DreamLLM, "generate", spy)
    sample.main(["--ckpt", ckpt, "--image", str(picture), "--question", "What colour is it?",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().out == "blue\n"
    (text, images, max_images), = asked
    assert text == "<image> What colour is it?" and max_images == 0  # data.py's "<image> {question} {answer}"
    assert images[0].tobytes() == Image.open(picture).convert("RGB").tobytes()
    assert not any((tmp_path / "o").iterdir())  # answering writes no file


def test_bad_input_exits_with_one_line(ckpt, tmp_path, capsys):
    assert "no checkpoint" in one_line_error(run("--ckpt", str(tmp_path / "none"), "--prompt", "a red circle"))
    one_line_error(run("--ckpt", ckpt, "--prompt", "x", "--no-such-flag"))
    r = run("-h")
    assert r.returncode == 0 and "--document" in r.stdout and "--eval" in r.stdout
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    assert "not a readable image" in fails(["--ckpt", ckpt, "--image", str(not_an_image), "--question", "what?"], capsys)
    assert "preset tiny, not toy" in fails(["--ckpt", ckpt, "--preset", "toy", "--prompt", "a red circle"], capsys)
    assert "checkpoint's folder" in fails(["--ckpt", ckpt, "--prompt", "a red circle", "--out", ckpt], capsys)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ckpt, "--image", str(not_an_image)])  # no --question
    assert e.value.code == 2


def test_best_of_ranks_the_draws_and_keeps_them_all(ckpt, tmp_path, monkeypatch):
    # the tiny preset's CLIP is a vision tower alone: no text to score against, said in one line
    r = run("--ckpt", ckpt, "--prompt", "a red circle", "--best-of", "2", "--steps", "1", "--out", str(tmp_path / "a"))
    assert "no text tower" in one_line_error(r) and "--scorer" in one_line_error(r)
    # ranked by the scorer's numbers, every draw kept
    monkeypatch.setattr(sample, "clip_scorer", lambda model, folder=None: lambda images, text: torch.tensor(
        [1.0, 5.0, 2.0][:len(images)]))
    out = tmp_path / "b"
    sample.main(["--ckpt", ckpt, "--prompt", "a red circle", "--best-of", "3", "--steps", "1", "--out", str(out)])
    ranked = json.loads((out / "best_of.json").read_text())["images"]
    assert [(r["seed"], r["clip_score"], r["best"]) for r in ranked] == [(0, 1.0, False), (1, 5.0, True), (2, 2.0, False)]
    assert (out / "a_red_circle_best.png").read_bytes() == (out / "a_red_circle_1.png").read_bytes()
    assert (out / "grid.png").is_file()
    r = run("--ckpt", ckpt, "--prompt", "a red circle", "--best-of", "0", "--out", str(tmp_path / "c"))
    assert "--best-of must be at least 1" in r.stderr and r.returncode != 0
