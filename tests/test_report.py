"""shapes/report.py: metrics.jsonl read back, the SVG charts, and report.html over a curriculum's stages."""
import dataclasses
import json
import re
import xml.dom.minidom

import pytest

from plumbing.cli import Stop
from shapes import benchmark, report


def write_metrics(folder, stage, losses):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step, (lm, diffusion) in enumerate(losses, 1):
            f.write(json.dumps(dict(stage=stage, step=step, loss=lm + diffusion, lm=lm,
                                    diffusion=diffusion, lr=1e-3, steps_per_s=5.0,
                                    seconds=step / 5)) + "\n")


def test_metrics_keep_the_last_record_of_a_step_and_skip_a_line_cut_short(tmp_path):
    write_metrics(tmp_path / "run", "II", [(1.0, 0.5), (0.8, 0.4)])
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:  # resumed from step 1, then a crash
        f.write(json.dumps(dict(stage="II", step=2, loss=9.0, lm=8.0, diffusion=1.0)) + "\n")
        f.write('{"stage": "II", "step": 3, "lo')
    metrics = report.read_metrics(tmp_path / "run")
    assert list(metrics) == [1, 2] and metrics[2]["lm"] == 8.0
    assert report.read_metrics(tmp_path / "nothing") == {}


def test_running_mean():
    pts = [(1, 1.0), (2, 3.0), (3, 5.0), (4, 7.0)]
    assert report.smooth(pts, 2) == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0)]
    assert report.smooth(pts, 1) == pts


def test_chart_is_valid_svg_with_a_line_per_loss_on_a_log_scale():
    svg = report.svg_curves({"lm": [(s, 2.0 / s) for s in range(1, 51)],
                             "diffusion": [(s, 0.0) for s in range(1, 51)]}, "stage II <&>")
    xml.dom.minidom.parseString(svg)  # well formed, the title escaped
    assert svg.count("<polyline") == 2  # lm: raw and mean; diffusion: all zero, nothing to draw
    assert re.findall(r">1e(-?\d+)<", svg) == ["-2", "-1", "0", "1"]  # 0.04 .. 2: its decades
    assert "nothing logged" in report.svg_curves({"lm": []}, "empty")


def test_report_over_a_curriculum_and_a_benchmark(tmp_path):
    run, evaluation = tmp_path / "toy", tmp_path / "eval"
    (run).mkdir()
    (run / "curriculum.json").write_text(json.dumps(dict(stages=["I-creation", "II", "III"])))
    write_metrics(run / "I-creation", "I-creation", [(0.0, 0.3), (0.0, 0.2)])
    write_metrics(run / "II", "II", [(1.0, 0.3), (0.9, 0.2)])  # III not begun: no chart
    evaluation.mkdir()
    rows = [dict(name="VQA: all", n=200, value=0.5, low=0.43, high=0.57),
            dict(name="document: back statements true", n=0, value=None, low=None, high=None)]
    document = dict(opening="Here is a <b>.", segments=[dict(image="documents/0_0.png"),
                                                        dict(text=" It is red.")])
    (evaluation / "eval.json").write_text(json.dumps(dict(rows=rows,
                                                          details=dict(documents=[document]))))
    (evaluation / "eval_grid.png").write_bytes(b"png")
    page = report.write(run, evaluation, evaluation / "report.html").read_text()
    assert page.count("<svg") == 2 and "stage II: 2 steps" in page
    assert "<td>VQA: all</td><td>200</td><td>0.50</td><td>[0.43, 0.57]</td>" in page
    assert "<td>0</td><td>-</td>" in page  # N = 0: no value
    assert 'src="eval_grid.png"' in page and "eval_two_shapes.png" not in page  # only what exists
    assert "Here is a &lt;b&gt;." in page and 'src="documents/0_0.png"' in page
    with pytest.raises(Stop, match="no such folder"):
        report.write(tmp_path / "missing", evaluation, tmp_path / "r.html")


def test_report_sets_a_run_beside_our_reference_runs(tmp_path):
    # our runs of the preset (docs/reference/<preset>/): its curves dashed, its row and our runs' range
    references, run, evaluation = tmp_path / "reference", tmp_path / "toy", tmp_path / "eval"
    run.mkdir()
    (run / "curriculum.json").write_text(json.dumps(dict(preset="toy", stages=["III"])))
    write_metrics(run / "III", "III", [(1.0, 0.3), (0.9, 0.2)])
    write_metrics(references / "toy" / "III", "III", [(1.2, 0.4), (1.1, 0.3)])
    checkpoint = run / "III" / "step-2"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(dict(preset="toy", stage="III")))
    ours = {"rows": {"III": [dict(name="VQA: all", n=200, value=0.68, low=0.6, high=0.7),
                             dict(name="create: both", n=64, value=0.72, low=0.6, high=0.8)]},
            "runs": {"III": {"VQA: all": [0.66, 0.68, 0.70], "create: both": [0.38, 0.72, 0.5]}}}
    (references / "toy" / "eval.json").write_text(json.dumps(ours))
    evaluation.mkdir()
    rows = [dict(name="VQA: all", n=200, value=0.69, low=0.62, high=0.75),  # inside: 0.66 to 0.70
            dict(name="create: both", n=64, value=0.20, low=0.1, high=0.3)]  # below 0.38
    (evaluation / "eval.json").write_text(json.dumps(dict(rows=rows, model=str(checkpoint))))
    page = report.write(run, evaluation, evaluation / "report.html", references=references)
    assert page.read_text().count("stroke-dasharray") == 2  # lm and diffusion of our run
    text = page.read_text()
    assert "<tr><td>VQA: all</td><td>200</td><td>0.69</td><td>[0.62, 0.75]</td><td>0.68</td>" \
           "<td>0.66 to 0.70</td></tr>" in text
    assert '<tr class="no"><td>create: both</td>' in text and "<td>0.38 to 0.72</td>" in text
    assert "our 3 runs" in text
    line = report.summary(run, evaluation, references=references)
    assert line.startswith("beside our 3 runs of stage III") and "1 rows outside" in line
    assert "create: both 0.20 (ours 0.38 to 0.72)" in line and "VQA" not in line
    rows[1]["value"] = 0.5  # inside
    (evaluation / "eval.json").write_text(json.dumps(dict(rows=rows, model=str(checkpoint))))
    assert report.summary(run, evaluation, references=references).endswith("every row within their range")
    # our runs' settings recorded: a benchmark run otherwise (fewer images) says so, in both places
    settings = dict(seed=0, sampling=dict(steps=30), sizes=dict(images=16, questions=200))
    (references / "toy" / "eval.json").write_text(json.dumps(dict(ours, settings=settings)))
    same = dict(rows=rows, model=str(checkpoint), **settings)
    (evaluation / "eval.json").write_text(json.dumps(same))
    assert report.summary(run, evaluation, references=references).endswith("every row within their range")
    (evaluation / "eval.json").write_text(json.dumps(dict(same, sizes=dict(images=4, questions=200))))
    line = report.summary(run, evaluation, references=references)
    assert line.endswith("(run otherwise than ours: images 4 (ours 16); a guide, not a test)")
    text = report.write(run, evaluation, evaluation / "report.html", references=references).read_text()
    assert "ran otherwise than ours (images 4 (ours 16))" in text
    # a preset we never ran: the plain table, no dashes
    (checkpoint / "config.json").write_text(json.dumps(dict(preset="tiny", stage="III")))
    (run / "curriculum.json").write_text(json.dumps(dict(preset="tiny", stages=["III"])))
    text = report.write(run, evaluation, evaluation / "report.html", references=references).read_text()
    assert "stroke-dasharray" not in text and "our 3 runs" not in text
    assert "<td>create: both</td><td>64</td><td>0.50</td><td>[0.10, 0.30]</td></tr>" in text
    assert report.summary(run, evaluation, references=references) is None


def test_our_reference_runs_are_whole():
    # docs/reference/toy/, what report.html sets a run beside: every stage of the toy curriculum, its
    # curves, its benchmark rows, and the same rows in each of our runs, the reference's first
    from plumbing import recipes
    ours = json.loads((report.REFERENCE / "toy" / "eval.json").read_text())
    assert ours["settings"]["sizes"] == dataclasses.asdict(benchmark.Sizes())  # the defaults
    assert ours["settings"]["sampling"] == benchmark.SAMPLING and ours["settings"]["seed"] == 0
    for stage, _ in recipes.CURRICULA["toy"]:
        assert report.read_metrics(report.REFERENCE / "toy" / stage), stage
        rows, runs = ours["rows"][stage], ours["runs"][stage]
        assert [r["name"] for r in rows] == list(runs)
        assert all(len(v) == len(ours["runs"]["III"]["VQA: all"]) >= 3 for v in runs.values())
        assert [r["value"] for r in rows] == [v[0] for v in runs.values()]


def test_summary_png_shows_the_drawings_a_document_and_each_stages_curves(tmp_path):
    from PIL import Image
    run, evaluation = tmp_path / "toy", tmp_path / "eval"
    run.mkdir()
    (run / "curriculum.json").write_text(json.dumps(dict(stages=["I-creation", "II"])))
    write_metrics(run / "I-creation", "I-creation", [(0.0, 0.3 / s) for s in range(1, 40)])
    write_metrics(run / "II", "II", [(2.0 / s, 0.1) for s in range(1, 40)])
    (evaluation / "documents").mkdir(parents=True)
    Image.new("RGB", (120, 90), (10, 200, 10)).save(evaluation / "held_out.png")  # the drawings
    Image.new("RGB", (64, 64), (200, 10, 200)).save(evaluation / "documents" / "0_0.png")
    document = dict(opening="Here is a red circle.", segments=[dict(image="documents/0_0.png"),
                                                              dict(text=" It is red.")])
    (evaluation / "eval.json").write_text(json.dumps(dict(rows=[], details=dict(documents=[document]))))
    report.write(run, evaluation, evaluation / "report.html")
    picture = Image.open(evaluation / "summary.png").convert("RGB")
    colours = set(picture.getdata())
    assert picture.getpixel((8 + 60, 22 + 45)) == (10, 200, 10)  # the drawings, top left
    assert (200, 10, 200) in colours  # the document's picture, scaled up beside them
    lm, diffusion = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in
                     (report.COLOURS["lm"], report.COLOURS["diffusion"]))
    assert lm in colours and diffusion in colours  # II's LM curve, both stages' diffusion
    left_chart = picture.crop((0, picture.height - 200, picture.width // 4, picture.height))
    assert lm not in set(left_chart.getdata())  # I-creation logged no LM loss: no line of it
