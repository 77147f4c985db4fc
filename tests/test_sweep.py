"""tools/sweep.py: the grid's parser, the plans --dry-run prints (each study, a grid), the statistics
against values worked by hand, the tables, bad input, and one sweep end to end on the tiny preset
(2 variants x 2 seeds, trained and benchmarked, then run again: everything kept)."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import train
from tools import sweep

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def fails(argv, capsys, code):
    # sweep.main(argv) exits with `code` and one line on stderr; returns that line
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(err) == 1 and err[0].startswith("python -m tools.sweep"), err
    assert "Traceback" not in err[0]
    return err[0]


# ---- the grid -----------------------------------------------------------------------------------

def test_a_grid_is_the_cross_product_of_its_comma_flags():
    variants = sweep.grid_variants("--lr 1e-4,3e-4 --target epsilon,v,x0 --whiten --steps 5")
    assert [name for name, _ in variants] == [
        f"lr={lr}_target={t}" for lr in ("1e-4", "3e-4") for t in ("epsilon", "v", "x0")]
    # every variant has every flag, in the order given; a flag without a comma is in all as given
    name, flags = variants[4]
    assert flags == [("--lr", "3e-4"), ("--target", "v"), ("--whiten", None), ("--steps", "5")]
    assert sweep.argv_of(flags) == ["--lr", "3e-4", "--target", "v", "--whiten", "--steps", "5"]
    # no dimension: one variant
    assert sweep.grid_variants("--min-snr-gamma 5") == [("run", [("--min-snr-gamma", "5")])]


def test_a_quoted_value_is_one_value():
    variants = sweep.grid_variants("--mix 'i2t,vqa',t2i --init \"out/my run\" --lr=1e-4,2e-4")
    assert [dict(flags)["--mix"] for _, flags in variants] == ["i2t,vqa"] * 2 + ["t2i"] * 2
    assert {dict(flags)["--init"] for _, flags in variants} == {"out/my run"}
    assert [dict(flags)["--lr"] for _, flags in variants] == ["1e-4", "2e-4"] * 2
    assert [n for n, _ in variants][0] == "mix=i2t-vqa_lr=1e-4"  # a folder's name
    # a study's flags (not a grid): commas are part of the value
    assert sweep.parse_flags("--mix i2t,vqa --stage II") == [("--mix", ["i2t,vqa"]),
                                                             ("--stage", ["II"])]


@pytest.mark.parametrize("grid, says", [
    ("", "no flags"), ("target epsilon,v", "a value before any --flag"),
    ("--lr 1e-4 3e-4", "a second value"), ("--lr 1e-4,", "an empty value"),
    ("--lr 1e-4 --lr 2e-4", "given twice"), ("--mix 'i2t,vqa", "not closed")])
def test_a_malformed_grid_is_refused(grid, says):
    with pytest.raises(ValueError, match=says):
        sweep.grid_variants(grid)


# ---- the plans ----------------------------------------------------------------------------------

def dry(argv, capsys):  # sweep.main(argv + --dry-run) -> its lines, each a train.py command
    assert sweep.main([*argv, "--dry-run"]) is None  # no SystemExit: status 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("python train.py ") for line in lines), lines
    return lines


@pytest.mark.parametrize("study", list(sweep.STUDIES))
def test_dry_run_prints_every_run_bases_first_and_trains_nothing(study, tmp_path, capsys):
    out = tmp_path / "sweep"
    lines = dry([study, "--seeds", "2", "--out", str(out)], capsys)
    s = sweep.STUDIES[study]
    names = [n for n, _ in s.get("base", [])] + [n for n, _ in s["runs"]]
    assert len(lines) == 2 * len(names)
    for i, line in enumerate(lines):  # each name across the seeds, in the study's order
        name, seed = names[i // 2], i % 2
        args = train.parse_args(shlex.split(line)[2:])  # the full arguments, as train.py reads them
        assert (args.out, args.seed) == (str(out / name / f"seed-{seed}"), seed)
        own = dict(s.get("base", []) + s["runs"])[name]  # the variant's flags, all there
        assert all(t in shlex.split(line) for t in shlex.split(own) if "{" not in t), (own, line)
        if "{" in own:  # a base named: that base's run of the same seed
            base = own.split("{")[1].split("}")[0]
            assert args.init == str(out / base / f"seed-{seed}")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing made
    # --set: flags for every run, over the study's
    lines = dry([study, "--seeds", "1", "--out", str(out), "--set", "--steps 5"], capsys)
    assert all(train.parse_args(shlex.split(line)[2:]).steps == 5 for line in lines)


def test_the_studies_say_what_the_brief_asks(capsys, tmp_path):
    lines = dry(["queries", "--seeds", "1", "--out", str(tmp_path / "q")], capsys)
    assert [train.parse_args(shlex.split(x)[2:]).n_queries for x in lines] == [2, 4, 8, 16, 32]
    lines = dry(["synergy", "--seeds", "1", "--out", str(tmp_path / "s")], capsys)
    stages = [(a.stage, a.mix) for a in (train.parse_args(shlex.split(x)[2:]) for x in lines)]
    assert stages == [("I-comprehension", None), ("I-creation", None), ("II", "t2i"),
                      ("II", "i2t,vqa"), ("II", "t2i,i2t,vqa"), ("II", "t2i,i2t,t2i,vqa")]
    # the matched joint arm sees exactly both arms' examples: 300 pairs written, 150 read, 150 asked
    steps = [train.parse_args(shlex.split(x)[2:]).steps for x in lines]
    assert steps[2:] == [300, 300, 300, 600]
    lines = dry(["objective", "--seeds", "1", "--out", str(tmp_path / "o")], capsys)
    arms = [(a.objective, a.bridge, a.align_distance)
            for a in (train.parse_args(shlex.split(x)[2:]) for x in lines)]
    assert arms == [("score", "mapper", None), ("align", "mapper", None),
                    ("align", "mapper", "cosine"), ("both", "mapper", None),
                    ("score", "projector", None)]


def test_dry_run_of_a_grid(capsys, tmp_path):
    grid = "--preset tiny --stage II --init out/x --target epsilon,v --lr 1e-4,3e-4"
    lines = dry(["--grid", grid, "--seeds", "3", "--out", str(tmp_path / "g")], capsys)
    assert len(lines) == 2 * 2 * 3
    args = [train.parse_args(shlex.split(x)[2:]) for x in lines]
    assert [(a.target, a.lr, a.seed) for a in args] == [
        (t, lr, s) for t in ("epsilon", "v") for lr in (1e-4, 3e-4) for s in range(3)]
    assert all(a.preset == "tiny" and a.stage == "II" and a.init == "out/x" for a in args)
    assert args[5].out == str(tmp_path / "g" / "target=epsilon_lr=3e-4" / "seed-2")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("argv, code, says", [
    (["nope"], 2, "invalid choice"),
    ([], 2, "give a study"),
    (["variants", "--grid", "--lr 1e-4,2e-4"], 2, "one of the two"),
    (["variants", "--seeds", "0"], 2, "--seeds must be at least 1"),
    (["--grid", "--lr 1e-4 3e-4"], 2, "a second value"),
    (["--grid", "--target epsilon,w"], 2, "target=w (seed 0): train.py says: argument --target"),
    (["--grid", "--lr 2,1e-4"], 2, "--lr 2.0: must be a learning rate"),
    (["--grid", "--no-such-flag 1,2"], 2, "unrecognized arguments: --no-such-flag"),
    (["--grid", "--target epsilon,v --seed 3"], 2, "--seed is not for a sweep's run"),
    (["--grid", "--stage all"], 2, "--stage all is a curriculum"),
    (["--grid", "--init {start}"], 2, "{start} names no base run"),
    (["variants", "--eval-sizes", "--images 0"], 2, "--images must be at least 1"),
    (["variants", "--eval-sizes", "--ckpt x"], 2, "unrecognized arguments: --ckpt"),
])
def test_bad_input_is_one_line(argv, code, says, capsys, tmp_path):
    line = fails([*argv, "--out", str(tmp_path / "s")], capsys, code)
    assert says in line, line
    assert not (tmp_path / "s").exists()


# ---- the statistics -----------------------------------------------------------------------------

def test_sweeps_choose_on_the_validation_pairs_unless_asked():
    argv, request = sweep.eval_request("--quick")
    assert argv[-2:] == ["--split", "val"] and request["split"] == "val"
    argv, request = sweep.eval_request("--split eval --images 2")
    assert argv == ["--images", "2", "--split", "eval"] and request["split"] == "eval"
    assert request["sizes"]["images"] == 2


def test_t_interval_by_hand():
    # 0.4, 0.5, 0.6: mean 0.5, sd 0.1, df 2: t 4.303; half-width 4.303 * 0.1 / sqrt(3) = 0.248434
    mean, low, high = sweep.t_interval([0.4, 0.5, 0.6])
    assert (mean, low, high) == pytest.approx((0.5, 0.251566, 0.748434), abs=1e-6)
    # 0.2, 0.4: sd 0.141421, df 1: t 12.706; half-width 12.706 * 0.141421 / sqrt(2) = 1.2706:
    # the interval of a proportion, clipped to [0, 1]
    assert sweep.t_interval([0.2, 0.4]) == pytest.approx((0.3, 0.0, 1.0))
    assert sweep.t_interval([0.7]) == (0.7, None, None) and sweep.t_interval([]) == (None,) * 3
    # past the table: 2.201 (df 11), 2.042 (df 30), 1.962 (df 1000) in any table of t
    assert [round(sweep.t975(df), 3) for df in (11, 30, 1000)] == [2.201, 2.042, 1.962]


def rows(**values):  # benchmark.py's rows: name -> (successes, n)
    return [dict(name=name.replace("_", " "), n=n, value=k / n if n else None, low=0, high=1)
            for name, (k, n) in values.items()]


def test_summarise_gives_the_seeds_mean_and_the_pooled_counts_by_hand():
    seeds = [rows(a=(5, 10), b=(0, 0)), rows(a=(6, 10), b=(1, 2)), rows(a=(7, 10), b=(2, 2))]
    a, b = sweep.summarise(seeds)
    # seeds: 0.5, 0.6, 0.7: mean 0.6, half-width 4.303 * 0.1 / sqrt(3) = 0.248434
    assert a["seeds"] == dict(n=3, mean=pytest.approx(0.6), low=pytest.approx(0.351566, abs=1e-6),
                              high=pytest.approx(0.848434, abs=1e-6))
    # pooled: 18 of 30; Wilson with z = 1.96: z^2/n = 0.128053, centre (0.6 + 0.064027) /
    # 1.128053 = 0.588648, half-width 1.96 / 1.128053 * sqrt(0.24/30 + 3.8416/3600) = 0.165448
    assert a["pooled"] == dict(k=18, n=30, value=pytest.approx(0.6),
                               low=pytest.approx(0.423200, abs=1e-5),
                               high=pytest.approx(0.754096, abs=1e-5))
    # a row of N = 0 counts for nothing: b's seeds are 0.5 and 1.0, its pool 3 of 4
    assert b["name"] == "b" and b["seeds"]["n"] == 2 and b["seeds"]["mean"] == pytest.approx(0.75)
    assert (b["pooled"]["k"], b["pooled"]["n"]) == (3, 4)


def test_tables_on_fake_results(tmp_path):
    out = tmp_path / "sweep"
    runs = []
    for variant, values in [("v|1", (5, 7)), ("v2", (2, None))]:
        for seed, k in enumerate(values):
            folder = out / variant / f"seed-{seed}"
            runs.append(sweep.Run(variant, seed, ["--seed", str(seed)], folder, 2, [], True))
            if k is not None:  # v2's seed 1: not evaluated (yet)
                (folder / "eval").mkdir(parents=True)
                (folder / "eval" / "eval.json").write_text(json.dumps(dict(
                    rows=rows(VQA_all=(k, 10), VQA_colour=(1, 2), create_x=(0, 4)))))
                (folder / "eval" / "eval_grid.png").write_bytes(b"png")
    results = sweep.write_results(runs, out, "a title", "a question?", ["VQA"])
    assert results["table_rows"] == ["VQA all", "VQA colour"]  # the rows starting so
    md = (out / "results.md").read_text().splitlines()
    assert md[:3] == ["# a title", "", "a question?"]
    head = "| variant | seeds | VQA all | VQA colour |"
    assert md.count(head) == 3  # the seeds' table, the pooled one, the differences from the first
    i = md.index(head)
    assert md[i + 1] == "|---|---|---|---|"
    # v|1: 0.5 and 0.7: mean 0.6, half-width 12.706 * 0.141421 / sqrt(2) = 1.2706: clipped
    assert md[i + 2] == "| v\\|1 | 2 | 0.60 [0.00, 1.00] | 0.50 [0.50, 0.50] |"  # no spread
    assert md[i + 3] == "| v2 | 1 of 2 | 0.20 [-] | 0.50 [-] |"  # one seed: no interval
    j = md.index(head, i + 1)
    assert md[j + 2].startswith("| v\\|1 | 2 | 0.60 [0.39, 0.78] n=20 |")  # 12 of 20, Wilson
    k = md.index(head, j + 1)  # v2 - v|1 at the one seed both have: 0.2 - 0.5, no interval
    assert md[k - 2] == "minus v|1, seed by seed [95% t interval of the differences]:"
    assert md[k + 2:] == ["| v2 | 1 of 2 | -0.30 [-] | +0.00 [-] |"]  # the first is not compared
    saved = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"], r["rows"] is not None) for r in saved["runs"]] == [
        ("v|1", 0, True), ("v|1", 1, True), ("v2", 0, True), ("v2", 1, False)]
    page = (out / "results.html").read_text()
    assert "<td>v|1</td>" in page and "0.60 [0.00, 1.00]" in page
    assert page.count('<img src="') == 3 and 'src="v2/seed-0/eval/eval_grid.png"' in page


def test_a_run_begun_is_continued_and_a_failed_base_stops_what_starts_from_it(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    begun = out / "target=epsilon" / "seed-0" / "step-2"  # a checkpoint at step 2 of 4
    begun.mkdir(parents=True)
    for name in ("model.safetensors", "train_state.safetensors"):
        (begun / name).write_bytes(b"")
    (begun / "config.json").write_text(json.dumps(dict(
        preset="tiny", stage="I-creation", groups=[], step=2, steps=4, seed=0, dream_config={},
        args={})))
    argv = ["--grid", "--preset tiny --steps 4 --target epsilon,v", "--seeds", "1", "--out",
            str(out)]
    lines = dry(argv, capsys)
    assert lines[0].endswith("# resume from step 2") and lines[1].endswith("seed-0")
    calls = []  # every process the sweep would start; each fails, as train.py would, in a line

    def launch(script, argv, log):
        calls.append((script, argv))
        return 1, f"{script}: it broke"
    monkeypatch.setattr(sweep, "launch", launch)
    line = fails(argv, capsys, 1)
    assert line.startswith("python -m tools.sweep: 2 of 2 runs failed") and "train.py: it broke" in line
    assert sorted((s, a[-1] == "--resume") for s, a in calls) == [("train.py", False),
                                                                  ("train.py", True)]
    assert json.loads((out / "results.json").read_text())["runs"][0]["rows"] is None
    # a base that fails: nothing that starts from it is begun
    calls.clear()
    fails(["synergy", "--seeds", "1", "--out", str(tmp_path / "synergy")], capsys, 1)
    assert [a[a.index("--out") + 1] for _, a in calls] == [
        str(tmp_path / "synergy" / "start-reading" / "seed-0")]


# ---- end to end ---------------------------------------------------------------------------------

def test_a_tiny_sweep_end_to_end_and_again(tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = ("--preset tiny --stage I-creation --steps 2 --batch-size 2 --device cpu "
            "--target epsilon,v")
    sizes = ("--images 1 --two-shapes 1 --two-shape-images 1 --questions 2 --captions 1 "
             "--documents 1 --document-tokens 4 --steps 2 --device cpu")
    argv = ["--grid", grid, "--seeds", "2", "--jobs", "2", "--eval-sizes", sizes, "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "tools.sweep", *argv], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [(v["name"], v["seeds"]) for v in results["variants"]] == [
        ("target=epsilon", [0, 1]), ("target=v", [0, 1])]
    assert len(results["runs"]) == 4 and all(run["rows"] for run in results["runs"])
    pooled = {r["name"]: r["pooled"] for r in results["variants"][0]["rows"]}
    # 2 seeds x 2 prompts x 1 image: a sweep asks of the validation pairs (data.VALIDATION)
    assert pooled["create: held-out shape, both"]["n"] == 2 * 2
    assert all(json.loads((run / "eval" / "eval.json").read_text())["split"] == "val"
               for run in out.glob("*/seed-*"))
    assert pooled["VQA: all"]["n"] == 2 * 2
    for v, target in (("target=epsilon", "epsilon"), ("target=v", "v")):
        for seed in (0, 1):
            config = json.loads(next((out / v / f"seed-{seed}").glob("step-2/config.json"))
                                .read_text())
            assert (config["seed"], config["dream_config"]["target"]) == (seed, target)
    assert (out / "results.md").is_file() and "| target=v | 2 |" in (out / "results.md").read_text()
    page = (out / "results.html").read_text()
    assert 'src="target=v/seed-1/eval/eval_grid.png"' in page and "<svg" in page
    # again: every run and every evaluation kept, nothing retrained
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/**/*") if p.is_file()}
    assert sweep.main(argv) is None
    said = capsys.readouterr().out
    assert said.count("trained (skipped), evaluated (kept)") == 4, said
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    lines = dry(argv, capsys)
    assert len(lines) == 4 and all(x.endswith("# done (2 steps), skipped") for x in lines)
