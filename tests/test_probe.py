"""tools/probe.py: linear probes of the frozen CLIP, fitted on training's pairs, tested on held-out ones."""
import pytest
import torch

from plumbing import cli
from tools import probe

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_a_probe_reads_what_the_features_hold_and_not_shuffled_labels():
    # the toy CLIP's read layer tells a shape on fresh pictures of training's pairs; the same probe
    # fitted on shuffled labels reads nothing (a third, by chance)
    model = cli.build_model("toy").eval()
    read = model.config.clip_layer % (model.clip.config.vision.n_layers + 1)
    shape = {"shape": probe.ATTRIBUTES["shape"]}
    [row] = probe.probe(model, [read], n_train=300, n_test=100, attributes=shape,
                        pools={"flat": probe.POOLS["flat"]})
    assert row["seen"] >= 0.9 and 0 <= row["held_out"] <= 1, row
    scenes, images = probe.pictures("train", 300, "shuffled")
    x = probe.POOLS["flat"](probe.patch_features(model, images, read))
    y = probe.classes_of(scenes, "shape", probe.data.SHAPES)
    shuffled = y[:200][torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert (probe.fit(x[:200], shuffled, 3)(x[200:]) == y[200:]).float().mean() < 0.6


def test_main_prints_each_layer_and_view_and_marks_the_one_read(capsys):
    probe.main(["--preset", "tiny", "--layers", "0", "-1", "--pictures", "20", "--tests", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert "colour" in lines[1] and "position" in lines[1]
    rows = lines[2:]
    L = cli.build_model("tiny").clip.config.vision.n_layers
    assert [r.split()[:2] for r in rows] == [["0", "flat"], ["0", "mean"], [f"{L}", "flat"],
                                             [f"{L}", "mean"]]  # the tiny reads L - 1: no mark
    for r in rows:
        for cell in r.split()[2:]:
            assert cell == "/" or 0 <= float(cell) <= 1


def test_bad_layers_and_sizes_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--preset", "tiny", "--layers", "99"])
    assert e.value.code == 1 and "--layers 99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        probe.main(["--pictures", "3"])
    assert e.value.code == 2 and "--pictures must be at least 10" in capsys.readouterr().err
