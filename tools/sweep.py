"""The researcher's bench: a study is a few variants of a train.py run, each trained from a few
seeds, each run benchmarked (benchmark.py) on the validation pairs (data.VALIDATION; --eval-sizes
"--split eval" for the reported ones), and the variants tabulated with 95% intervals.

    python -m tools.sweep variants             # the loss variants (STUDIES below), 3 seeds
    python -m tools.sweep queries --seeds 2 --dry-run     # the runs it would make; trains nothing
    python -m tools.sweep synergy --jobs 2 --out out/sweeps/synergy-2
    python -m tools.sweep --grid "--target epsilon,v --min-snr-gamma 5" --seeds 3
    python -m tools.sweep --grid "--stage II --init out/toy --lr 1e-4,3e-4" --out out/sweeps/lr
    python -m tools.sweep variants --set "--steps 100" --eval-sizes "--quick"  # a smaller try

A grid is one line of train.py flags: each flag with comma-separated values is a dimension, the
cross product of the dimensions x the seeds are the runs, a flag without a comma applies to all;
a quoted value is one value ("--mix 'i2t,vqa'").

Each run is a plain train.py run folder, <--out>/<variant>/seed-<s>/, trained by its own train.py
process (one thread each, --jobs at once) and then benchmarked into <run>/eval/. Run the same
command again to go on: a run at its final step is skipped, one begun is continued (--resume), an
evaluation newer than its checkpoint (of the same sizes) is kept. Ctrl-C: every run saves and stops.
Written to --out: results.json (every run's rows; per variant the mean over seeds and the pooled
counts, each with a 95% interval, and its difference from the first variant seed by seed),
results.md (the three tables), results.html (the tables, the loss curves per variant, each
variant's held-out grid).
"""
import html
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr
from dataclasses import asdict, dataclass, fields, replace
from itertools import product
from pathlib import Path

from tqdm import tqdm

import train
from plumbing import checkpoint, cli
from plumbing.cli import Stop
from shapes import benchmark, data, pages, report

ROOT = Path(__file__).resolve().parent.parent  # the project: train.py, shapes/benchmark.py
CREATION = ["create: held-out shape, both", "create: two shapes bound and placed",
            "create: number of shapes"]
BOTH = ["create: held-out shape, both", "create: two shapes bound and placed", "VQA: all",
        "caption: all shapes named, all true", "document: the picture asked for"]
# the creation studies benchmark creation at the benchmark's own sizes (64 + 64 images) and the
# rest at one item each: about 45 s a run on one thread, not 60+
CREATION_EVAL = "--questions 1 --captions 1 --documents 1"

# A study: its runs as data. "runs": (variant, train.py flags), each trained from every seed, the
# first the reference the others are compared with seed by seed;
# "base": runs made first, per seed, that a variant starts from by naming it, e.g. --init {start}
# (each base sees the bases before it); "rows": the benchmark's rows its table shows; "eval": its
# benchmark.py flags. Each is sized for 3 seeds in about 45 min on 2 cores (the toy trains stage
# I-creation at ~13 steps/s on 2 threads, README; on one thread, two runs at once, ~5).
STUDIES = {
    # The paper trains the dream queries and projector by the plain epsilon MSE of SD, with no
    # condition dropout (DreamLLM's official configs). These are the loss's variants as dreamllm.py
    # has them, each one flag: the target's space (v: Salimans & Ho 2022), min-SNR-gamma weighting
    # (Hang et al. 2023: faster convergence at gamma 5), and dropping the toy recipe's 10%
    # condition dropout (what guidance needs; docs/recipe.md: 0.47 / 0.88 without).
    "variants": dict(
        question="Which diffusion loss trains stage I-creation best?",
        common="--preset toy --stage I-creation --steps 600",
        runs=[("epsilon", "--target epsilon"), ("v", "--target v"),
              ("min-snr-5", "--min-snr-gamma 5"), ("no-cond-dropout", "--cond-dropout 0")],
        rows=CREATION, eval=CREATION_EVAL),
    # The number of dream queries K: the paper's ablation (Table 6) gave zero-shot COCO FID
    # 9.56 / 8.46 / 14.24 for K = 32 / 64 / 128: more is not better, 64 was chosen. The toy's
    # preset has K = 8 for 64 px images; here 2 to 32.
    "queries": dict(
        question="How many dream queries does the toy need?",
        common="--preset toy --stage I-creation --steps 600",
        runs=[(f"K-{k}", f"--n-queries {k}") for k in (2, 4, 8, 16, 32)],
        rows=CREATION, eval=CREATION_EVAL),
    # The synergy (sec. 5.1, Table 4 and Fig. 5): DreamLLM trained on creation and comprehension
    # together does better at both than either alone: creation helps comprehension (VQA, captions)
    # and comprehension helps creation (FID). Here from one start per seed (stage I, both halves,
    # in the main job's order: reading first), stage II on pairs written alone (t2i), on pairs read
    # and questions alone (i2t, vqa), or on both (t2i, i2t, vqa): the joint arm sees the two
    # others' data, each half as often; joint-matched twice as long, on exactly the examples of
    # both arms (300 pairs written, 150 read, 150 questions), as the paper's joint model had all
    # of both.
    "synergy": dict(
        question="Does creation help comprehension, and comprehension creation?",
        common="--preset toy",
        base=[("start-reading", "--stage I-comprehension --steps 300"),
              ("start", "--stage I-creation --steps 600 --init {start-reading}")],
        runs=[("creation-only", "--stage II --steps 300 --mix t2i --init {start}"),
              ("comprehension-only", "--stage II --steps 300 --mix i2t,vqa --init {start}"),
              ("joint", "--stage II --steps 300 --mix t2i,i2t,vqa --init {start}"),
              ("joint-matched", "--stage II --steps 600 --mix t2i,i2t,t2i,vqa --init {start}")],
        rows=BOTH, eval="--split eval"),  # a finding reported, not a choice made: HELD_OUT's
    # Stage II, where the main job's runs part (docs/log.md, 2026-12-04: one seed's held-out shape
    # 0.81 -> 0.59 there, its colour kept): from each seed's own stage I, as the main job trains
    # it, stage II as the recipe has it, with the anchor (which holds the pairs' conditions where
    # stage I left them) three times as strong, and at half the lr. Judged on VALIDATION: a
    # choice of recipe.
    "stage-ii": dict(
        question="What in stage II moves the drawing, and what holds it?",
        common="--preset toy",
        base=[("I-comprehension", "--stage I-comprehension --steps 1500"),
              ("I-creation", "--stage I-creation --steps 2000 --init {I-comprehension}")],
        runs=[("recipe", "--stage II --steps 600 --init {I-creation}"),
              ("anchor-30", "--stage II --steps 600 --anchor-weight 30 --init {I-creation}"),
              ("lr-5e-5", "--stage II --steps 600 --lr 5e-5 --init {I-creation}")],
        rows=BOTH, eval=""),
    # Score distillation against alignment (sec. 2.1): DreamLLM learns its condition through the
    # frozen UNet's score; GILL, Emu and NExT-GPT regress it onto the text encoder's states of the
    # caption (alignment.py). Both through GILL's mapper, so the UNet reads the same (L, C) under
    # each objective; DreamLLM's own bridge (the K projected states) beside them. Stage
    # I-creation, the LLM frozen, the same pairs. (The toy's recipe is "both": recipes.py.)
    "objective": dict(
        question="Does score distillation draw better than alignment to the text encoder?",
        common="--preset toy --stage I-creation --steps 600",
        runs=[("score", "--objective score --bridge mapper"),
              ("align", "--objective align --bridge mapper"),
              ("align-cosine", "--objective align --bridge mapper --align-distance cosine"),
              ("both", "--objective both --bridge mapper"),
              ("score-projector", "--objective score --bridge projector")],
        rows=CREATION, eval=CREATION_EVAL),
}
GRID_ROWS = BOTH  # a grid's table, unless --rows
# what a sweep gives each run itself, or would not finish with ("--stage all": see check())
SWEPT = ("--out", "--seed", "--resume", "--stop-after")


# ------------------------------------------------------------------------------ flags and grids

def split_outside_quotes(text, sep=None):
    # "a 'b c' d" -> ["a", "'b c'", "d"] (sep None: whitespace); quotes are kept, to be read later
    parts, part, quote = [], "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == sep or (sep is None and ch.isspace()):
            parts.append(part)
            part = ""
            continue
        part += ch
    if quote:
        raise ValueError(f"{text!r}: a quote is not closed")
    return [p for p in parts + [part] if p or sep is not None]


def unquote(text):  # "'i2t,vqa'" -> "i2t,vqa"; out/"my run" -> out/my run
    return "".join(shlex.split(text))


def parse_flags(text, grid=False):
    # "--lr 1e-4,3e-4 --whiten --mix 'a,b'" -> [("--lr", values), ("--whiten", [None]), ...], each
    # flag at most once. values: the value as one (grid False), or split at commas outside quotes
    # (grid True): [1e-4, 3e-4] and ["a,b"]
    flags = []
    for token in split_outside_quotes(text):
        name, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if name:
            if name in {f for f, _ in flags}:
                raise ValueError(f"{name} is given twice")
            flags.append((name, [None]))
            if not eq:
                continue
        if not flags:
            raise ValueError(f"{token!r}: a value before any --flag")
        if flags[-1][1] != [None]:
            raise ValueError(f"{flags[-1][0]}: a second value {token!r} (alternatives are "
                             "comma-separated: --lr 1e-4,3e-4)")
        values = [unquote(v) for v in (split_outside_quotes(value, ",") if grid else [value])]
        if "" in values:
            raise ValueError(f"{flags[-1][0]} {value}: an empty value")
        flags[-1] = (flags[-1][0], values)
    return flags


def argv_of(flags):  # [("--lr", "1e-4"), ("--whiten", None)] -> ["--lr", "1e-4", "--whiten"]
    return [t for name, value in flags for t in ([name] if value is None else [name, value])]


def merge(*lists):  # lists of (flag, value): a later one's flag replaces an earlier one's
    out = {}
    for flags in lists:
        out.update(flags)
    return list(out.items())


def grid_variants(text):
    # a grid line -> [(variant name, [(flag, value)])]: the cross product of its dimensions
    flags = parse_flags(text, grid=True)
    if not flags:
        raise ValueError("--grid: no flags (e.g. --grid \"--target epsilon,v\")")
    dims = [(f, vs) for f, vs in flags if len(vs) > 1]
    variants = []
    for choice in product(*[vs for _, vs in dims]):
        picked = dict(zip([f for f, _ in dims], choice))
        name = "_".join(f"{f.lstrip('-')}={v}" for f, v in picked.items()) or "run"
        name = re.sub(r"[^\w.=+-]+", "-", name)  # a folder's name
        variants.append((name, [(f, picked.get(f, vs[0])) for f, vs in flags]))
    if len({n for n, _ in variants}) < len(variants):
        raise ValueError("--grid: two variants would share a folder name; give values that "
                         "differ in letters or digits")
    return variants


# ----------------------------------------------------------------------------------- the plan

@dataclass
class Run:
    variant: str
    seed: int
    argv: list         # train.py's arguments, --seed and --out included
    folder: Path
    steps: int         # its final step, as train.py reads its arguments
    needs: list        # the folders of the runs it starts from (--init of a base)
    evaluate: bool     # bases are not benchmarked
    level: int = 0     # 0: needs nothing; else 1 + its needs' level


def check(argv, what):
    # train.py's own parser on a run's arguments: a bad value fails here, before anything trains
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            args = train.parse_args(argv)
    except SystemExit:
        said = err.getvalue().strip().splitlines()[-1:] or ["refused"]
        said = said[0].split(": error: ", 1)[-1].removesuffix(" (see -h)")
        raise ValueError(f"{what}: train.py says: {said}") from None
    if args.stage == "all":
        raise ValueError(f"{what}: --stage all is a curriculum of runs; a sweep's run is one "
                         "stage (start one from another with --init)")
    return args


def plan(study, grid, seeds, out, extra=""):
    # -> the runs, in the order they are made: the bases (each across the seeds), then the variants
    if grid is not None:  # each run one stage: I-creation, unless the grid names another
        common, base, variants = [("--stage", "I-creation")], [], grid_variants(grid)
    else:
        s = STUDIES[study]
        common = [(f, vs[0]) for f, vs in parse_flags(s["common"])]
        base = [(n, [(f, vs[0]) for f, vs in parse_flags(a)]) for n, a in s.get("base", [])]
        variants = [(n, [(f, vs[0]) for f, vs in parse_flags(a)]) for n, a in s["runs"]]
    overrides = [(f, vs[0]) for f, vs in parse_flags(extra)]
    for name, flags in [("--set", overrides), *base, *variants]:
        if given := [f for f, _ in flags if f in SWEPT]:
            raise ValueError(f"{name}: {given[0]} is not for a sweep's run (the sweep gives "
                             "--out, --seed, --resume itself; a run goes to its end)")
    runs, level = [], {}
    for i, (name, flags) in enumerate(base + variants):
        named = {b for v in dict(flags).values() if v for b in re.findall(r"\{([\w-]+)\}", v)}
        if unknown := named - {b for b, _ in base[:i]}:
            raise ValueError(f"{name}: {{{sorted(unknown)[0]}}} names no base run before it")
        for seed in range(seeds):
            folder = Path(out) / name / f"seed-{seed}"
            needs = [Path(out) / b / f"seed-{seed}" for b in sorted(named)]
            filled = [(f, v if v is None else re.sub(
                r"\{([\w-]+)\}", lambda m: str(Path(out) / m[1] / f"seed-{seed}"), v))
                for f, v in flags]
            argv = argv_of(merge(common, filled, overrides,
                                 [("--seed", str(seed)), ("--out", str(folder))]))
            args = check(argv, f"{name} (seed {seed})")
            level[folder] = 1 + max((level[n] for n in needs), default=-1)
            runs.append(Run(name, seed, argv, folder, args.steps, needs, i >= len(base),
                            level[folder]))
    return runs


def state(run):
    # -> ("new" | "resume" | "done", the checkpoint's step or 0); a CheckpointError goes up
    found = checkpoint.read_run(run.folder)
    if found is None:
        return "new", 0
    if found["step"] >= run.steps:  # done; under the recipe as it is now? (train.py checks a resume)
        import train
        now = train.stage_recipe(train.parse_args(run.argv))
        if found.get("recipe", now) != now:
            raise checkpoint.CheckpointError(f"{run.folder}: trained under another recipe of stage "
                                             f"{found['stage']}; give the sweep another --out")
        return "done", found["step"]
    return "resume", found["step"]


def dry_run(runs):
    # one line per run: its train.py command as a shell would take it, and what a sweep would do
    for run in runs:
        what, step = state(run)
        note = {"new": "", "resume": f"  # resume from step {step}",
                "done": f"  # done ({step} steps), skipped"}[what]
        print(f"python train.py {shlex.join(run.argv)}{note}")


# -------------------------------------------------------------------------------- evaluation

def eval_request(text):
    # --eval-sizes: benchmark.py's flags -> (its argv, the sizes and sampling it will record), read
    # as benchmark.py reads them, so a kept eval.json can be checked to be of the same sizes
    p = cli.Parser(prog="python -m tools.sweep --eval-sizes", add_help=False)
    p.add_argument("--quick", action="store_true")
    for f in fields(benchmark.Sizes):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int)
    p.add_argument("--steps", type=int, default=benchmark.SAMPLING["steps"])
    p.add_argument("--guidance", type=float, default=benchmark.SAMPLING["guidance"])
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=benchmark.SAMPLING["sampler"])
    p.add_argument("--device")
    # sweeps choose recipes: on the validation pairs, unless asked otherwise
    p.add_argument("--split", choices=list(data.SPLITS), default="val")
    flags = [(f, vs[0]) for f, vs in parse_flags(text)]
    a = p.parse_args(argv_of(flags))
    argv = argv_of([(f, v) for f, v in flags if f != "--split"]) + ["--split", a.split]
    given = {f.name: getattr(a, f.name) for f in fields(benchmark.Sizes)
             if getattr(a, f.name) is not None}
    if bad := [k for k, v in dict(given, steps=a.steps).items() if v < 1]:
        p.error(f"--{bad[0].replace('_', '-')} must be at least 1")
    sizes = replace(benchmark.QUICK if a.quick else benchmark.Sizes(), **given)
    sampling = dict(benchmark.SAMPLING, steps=a.steps, guidance=a.guidance, sampler=a.sampler)
    return argv, dict(sizes=asdict(sizes), sampling=sampling, split=a.split)


def eval_is_fresh(run, request):
    # eval.json newer than the checkpoint, and of the sizes and sampling asked for
    found, path = checkpoint.read_run(run.folder), run.folder / "eval" / "eval.json"
    if found is None or not path.is_file():
        return False
    if path.stat().st_mtime < (found["path"] / "config.json").stat().st_mtime:
        return False
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return all(done.get(k) == v for k, v in request.items())


# ------------------------------------------------------------------------------------ running

def launch(script, argv, log):
    # one script ("train.py", or a module: "-m shapes.benchmark") as its own process on one thread
    # (the runs share the cores), its output to log; the project on its path, so that a module
    # runs from any folder -> (exit status, the log's last line: train.py's and the benchmark's
    # errors are one line)
    path = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    command = script.split() if script.startswith("-m ") else [str(ROOT / script)]
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ python {script} {shlex.join(argv)}\n")
        f.flush()
        rc = subprocess.run([sys.executable, *command, *argv], stdout=f,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    lines = [ln for ln in Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip()]
    return rc, (lines[-1] if lines else "")


def do(run, eval_argv, request, failed, stopping):
    # one run: trained (skipped, continued or begun), then benchmarked -> a line saying what it did
    if bad := [str(n) for n in run.needs if n in failed]:
        failed[run.folder] = f"its base {bad[0]} failed"
        return f"{run.folder}: not made ({failed[run.folder]})"
    if stopping.is_set():
        return f"{run.folder}: not begun (stopping)"
    said, t0 = [], time.time()
    what, step = state(run)
    if what == "done":
        said.append("trained (skipped)")
    else:
        run.folder.mkdir(parents=True, exist_ok=True)
        rc, last = launch("train.py", run.argv + (["--resume"] if what == "resume" else []),
                          run.folder / "train.log")
        if rc != 0:
            failed[run.folder] = f"train.py exited {rc}: {last}"
            return f"{run.folder}: FAILED ({failed[run.folder]}; see train.log)"
        said.append(f"trained steps {step}..{run.steps} in {time.time() - t0:.0f} s")
    if run.evaluate and eval_is_fresh(run, request):
        said.append("evaluated (kept)")
    elif run.evaluate and not stopping.is_set():
        t0 = time.time()
        argv = ["--ckpt", str(run.folder), "--out", str(run.folder / "eval"), "--seed",
                str(run.seed), *eval_argv]
        rc, last = launch("-m shapes.benchmark", argv, run.folder / "eval.log")
        if rc != 0:
            failed[run.folder] = f"python -m shapes.benchmark exited {rc}: {last}"
            return f"{run.folder}: FAILED ({failed[run.folder]}; see eval.log)"
        said.append(f"evaluated in {time.time() - t0:.0f} s")
    return f"{run.folder}: {', '.join(said)}"


def sweep(runs, jobs, eval_argv, request):
    # the runs level by level (a base before what starts from it), `jobs` processes at once
    failed, stopping = {}, threading.Event()
    bar = tqdm(total=len(runs), desc="runs", unit="run", dynamic_ncols=True, disable=None)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for level in sorted({r.level for r in runs}):
            batch = [r for r in runs if r.level == level]
            for line in pool.map(lambda r: do(r, eval_argv, request, failed, stopping), batch):
                tqdm.write(line)
                bar.update()
    except KeyboardInterrupt:  # the runs got the Ctrl-C too: each saves and stops
        stopping.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return failed


# ---------------------------------------------------------------------------------- statistics

# t's 0.975 quantile for df = 1..10 (any table of Student's t): a 95% interval over n seeds uses
# df = n - 1, and with 2 or 3 seeds it is far wider than the normal's +-1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def t975(df):
    # past the table, the Cornish-Fisher expansion of t about the normal's z = 1.96 (Abramowitz &
    # Stegun ch. 26), three terms: 2.2280 at df 10 (the table's 2.228), closer from there on
    if df in T975:
        return T975[df]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def t_interval(values, lowest=0.0):
    # the seeds' values (one per run) -> (mean, low, high), clipped to [lowest, 1] (a proportion,
    # or with lowest -1 a difference of two); one value: no spread to measure, no interval
    if not values:
        return None, None, None
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, max(lowest, mean - half), min(1.0, mean + half)


def summarise(rows_by_seed):
    # [[row of seed 0, ...], ...] (benchmark.py's rows) -> per row name, two answers to "how
    # good is the variant": seeds: the mean of the seeds' proportions with a t interval: the
    # spread of what training from another seed gives, the question a sweep asks (but with 3
    # seeds, wide); pooled: the successes and N summed over the seeds with a Wilson interval:
    # the benchmark's sampling noise alone, narrow, as if the seeds' items were one big test (it
    # ignores how the seeds' models differ). Seeds' intervals well apart: a difference; pooled
    # ones apart but seeds' overlapping: more seeds needed.
    names = list(dict.fromkeys(r["name"] for rows in rows_by_seed for r in rows))
    out = []
    for name in names:
        found = [r for rows in rows_by_seed for r in rows if r["name"] == name]
        values = [r["value"] for r in found if r["n"] and r["value"] is not None]
        mean, low, high = t_interval(values)
        k = sum(round(r["value"] * r["n"]) for r in found if r["n"] and r["value"] is not None)
        n = sum(r["n"] for r in found if r["value"] is not None)
        p_low, p_high = benchmark.wilson(k, n)
        out.append(dict(name=name, seeds=dict(n=len(values), mean=mean, low=low, high=high),
                        pooled=dict(k=k, n=n, value=k / n if n else None, low=p_low,
                                    high=p_high)))
    return out


def paired(per_run, variant, reference):
    # [{variant, seed, rows}] -> per row name, the variant's value minus the reference's at each
    # seed both were measured at, with a t interval of those differences. Runs of one seed share
    # the data's order and the noise, so much of what a seed changes cancels: a difference the
    # seeds' own intervals cannot tell apart may show here
    value = {(r["variant"], r["seed"], row["name"]): row["value"] for r in per_run
             for row in r["rows"] or [] if row["n"] and row["value"] is not None}
    diffs = {}
    for (v, seed, name), x in value.items():
        if v == variant and (reference, seed, name) in value:
            diffs.setdefault(name, []).append(x - value[reference, seed, name])
    return [dict(zip(("name", "n", "mean", "low", "high"), (name, len(d), *t_interval(d, -1.0))))
            for name, d in diffs.items()]


# ------------------------------------------------------------------------------------ results

def collect(runs, title, question, rows, request=None):
    # the evaluated runs' eval.json -> results (what results.json holds); rows: the table's
    # columns, each the benchmark rows whose names start so, in the order given; request: count
    # only evaluations of these sizes, newer than their checkpoint (eval_is_fresh)
    per_run, variants = [], {}
    for run in runs:
        if not run.evaluate:
            continue
        path = run.folder / "eval" / "eval.json"
        fresh = path.is_file() and (request is None or eval_is_fresh(run, request))
        got = json.loads(path.read_text(encoding="utf-8"))["rows"] if fresh else None
        per_run.append(dict(variant=run.variant, seed=run.seed, folder=str(run.folder),
                            args=run.argv, rows=got))
        variants.setdefault(run.variant, [])
    for name in variants:
        mine = [r for r in per_run if r["variant"] == name]
        done = [r for r in mine if r["rows"] is not None]
        variants[name] = dict(name=name, seeds=[r["seed"] for r in done], of=len(mine),
                              rows=summarise([r["rows"] for r in done]),
                              paired=paired(per_run, name, next(iter(variants))))
    found = list(dict.fromkeys(r["name"] for run in per_run for r in run["rows"] or []))
    columns = list(dict.fromkeys(n for x in rows for n in found if n.startswith(x)))
    return dict(title=title, question=question, table_rows=columns if found else list(rows),
                runs=per_run, variants=list(variants.values()))


def cell(stats, kind):  # "0.53 [0.41, 0.65]", "+0.12 [+0.02, +0.22]"; "-" for nothing measured
    value = stats["value"] if kind == "pooled" else stats["mean"]
    if value is None:
        return "-"
    f = "+.2f" if kind == "paired" else ".2f"
    interval = "[-]" if stats["low"] is None else f"[{stats['low']:{f}}, {stats['high']:{f}}]"
    return f"{value:{f}} {interval}" + (f" n={stats['n']}" if kind == "pooled" else "")


def table(results, kind="seeds"):
    # -> [header, then one row per variant]: cells for results["table_rows"]; kind: "seeds",
    # "pooled" or "paired" (each variant but the first, minus the first)
    head = ["variant", "seeds", *results["table_rows"]]
    body = []
    for v in results["variants"][1:] if kind == "paired" else results["variants"]:
        by_name = {r["name"]: r for r in v["paired"]} if kind == "paired" else \
            {r["name"]: r[kind] for r in v["rows"]}
        seeds = f"{len(v['seeds'])}" + ("" if len(v["seeds"]) == v["of"] else f" of {v['of']}")
        body.append([v["name"], seeds, *(cell(by_name[n], kind) if n in by_name else "-"
                                         for n in results["table_rows"])])
    return [head, *body]


SAYS = {"seeds": "mean over seeds [95% t interval: what another seed would give]",
        "pooled": "pooled over seeds [95% Wilson interval of the summed counts: the items' noise "
                  "only]",
        "paired": "minus {first}, seed by seed [95% t interval of the differences]"}


def says(results, kind):
    return SAYS[kind].format(first=results["variants"][0]["name"] if results["variants"] else "")


def markdown(results):
    lines = [f"# {results['title']}", "", results["question"], ""]
    for kind in SAYS:
        head, *rows = table(results, kind)
        line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        lines += [f"{says(results, kind)}:", "", line(head), "|" + "---|" * len(head),
                  *map(line, rows), ""]
    return "\n".join(lines)


def page(results, runs, out):
    # results.html in `out`: the tables, the loss curves per variant, the held-out grids; every
    # path relative to `out`
    e = html.escape
    body = [f"<h1>{e(results['title'])}</h1><p>{e(results['question'])}</p>"]
    for kind in SAYS:
        head, *rows = table(results, kind)
        body.append(f"<p>{e(says(results, kind))}</p>" + pages.table(head, rows))
    names = list(dict.fromkeys(r.variant for r in runs))  # bases first, then the variants
    body.append("<h2>Training: the losses, a line per seed</h2>")
    for name in names:
        metrics = {r.seed: report.read_metrics(r.folder) for r in runs if r.variant == name}
        for loss in ("diffusion", "align", "lm"):
            series = {f"seed {s}": [(step, m.get(loss, 0)) for step, m in ms.items()]
                      for s, ms in metrics.items()}
            if any(y > 0 for pts in series.values() for _, y in pts):
                body.append(report.svg_curves(series, f"{name}: {loss} loss"))
    evaluated = [n for n in names if any(r.evaluate for r in runs if r.variant == n)]
    grids = [[r.folder / "eval" / "eval_grid.png" for name in evaluated for r in runs
              if r.variant == name and r.seed == seed]  # a row per seed, a grid per variant
             for seed in sorted({r.seed for r in runs})]
    body.append("<h2>Held-out single shapes (eval_grid.png), a row per seed</h2>" + pages.table(
        evaluated, [[f'<img src="{e(Path(os.path.relpath(g, out)).as_posix())}" width="100%">'
                     if g.is_file() else "-" for g in row] for row in grids], escape=False))
    return pages.page(results["title"], body)


def write_results(runs, out, title, question, rows, request=None):
    results = collect(runs, title, question, rows, request)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    (out / "results.html").write_text(page(results, runs, out), encoding="utf-8")
    return results


# --------------------------------------------------------------------------------------- main

def main(argv=None):
    p = cli.Parser(prog="python -m tools.sweep", description="Train a study's variants x seeds "
                   "with train.py, benchmark each run, tabulate the variants with 95% intervals.",
                   formatter_class=cli.Help)
    p.add_argument("study", nargs="?", choices=list(STUDIES),
                   help="a study (STUDIES in tools/sweep.py); or --grid")
    p.add_argument("--grid", help='train.py flags, comma-separated values a dimension, e.g. '
                   '"--target epsilon,v --min-snr-gamma 5"')
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every variant")
    p.add_argument("--out", help="the sweep's folder (default: out/sweeps/<study or 'grid'>)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="train.py / shapes.benchmark processes at once, one thread each")
    p.add_argument("--set", metavar="FLAGS", help="train.py flags for every run, "
                   "over the study's, e.g. \"--steps 100 --device cpu\"")
    p.add_argument("--eval-sizes", metavar="FLAGS", help="shapes.benchmark's flags, e.g. "
                   "\"--quick --steps 10\" (default: the study's; a grid: the benchmark's own)")
    p.add_argument("--rows", nargs="+", metavar="PREFIX", help="the benchmark rows to tabulate, "
                   "by the start of their names, e.g. VQA 'create: two' (default: the study's)")
    p.add_argument("--dry-run", action="store_true", help="print each run's train.py command, "
                   "bases first, and exit; trains nothing")
    args = p.parse_args(argv)
    if (args.study is None) == (args.grid is None):
        p.error("give a study (" + ", ".join(STUDIES) + ") or --grid, one of the two")
    for name in ("seeds", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    name = args.study or "grid"
    out = Path(args.out or f"out/sweeps/{name}")
    study = STUDIES.get(args.study, {})
    try:
        runs = plan(args.study, args.grid, args.seeds, out, args.set or "")
        eval_argv, request = eval_request(args.eval_sizes if args.eval_sizes is not None
                                          else study.get("eval", ""))
    except ValueError as e:
        p.error(str(e))
    rows = args.rows or study.get("rows", GRID_ROWS)
    if args.dry_run:
        return cli.main(lambda: dry_run(runs), "python -m tools.sweep")
    title = (f"sweep {name}" + (f": {args.grid}" if args.grid else "") +
             f", {args.seeds} seed{'s' if args.seeds > 1 else ''}")
    question = study.get("question", "A grid of train.py runs.")

    def go():
        failed = sweep(runs, args.jobs, eval_argv, request)
        results = write_results(runs, out, title, question, rows, request)
        print(f"\n{markdown(results)}\nwrote {out / 'results.md'}, results.json, results.html")
        if failed:
            folder, why = next(iter(failed.items()))
            raise Stop(f"{len(failed)} of {len(runs)} runs failed, e.g. {folder}: {why}; run "
                       "again to retry them")
    cli.main(go, "python -m tools.sweep")


if __name__ == "__main__":
    main()
