"""report.py: metrics.jsonl read back, the SVG charts, and report.html over a curriculum's stages."""
import json
import re
import xml.dom.minidom

import pytest

import report
from cli import Stop


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
