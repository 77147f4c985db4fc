"""python -m tools.exercises: the project's own code as exercises, and their graders.

    python -m tools.exercises list                          # the exercises, in reading order
    python -m tools.exercises show rope                     # the statement and hints (--solution: ours)
    python -m tools.exercises make rope ddim --out ~/dream  # a copy of the project, those bodies blanked
    python -m tools.exercises make all --out ~/dream        # every exercise blanked
    python -m tools.exercises check rope --dir ~/dream      # grade a copy: exit 0 only if all pass
    python -m tools.exercises check all --dir .             # grade the project itself
    python -m tools.exercises experiments                   # questions for the shapes world, with keys

An exercise is named by its id or its number. check runs the graders (pytest, CPU) in a fresh
process whose working folder is --dir, so they import that copy's modules.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .blank import ExerciseError, blank_exercises, body_source, copy_project
from .catalogue import BY_ID, EXERCISES, EXPERIMENTS

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent               # the project this package belongs to (tools/exercises/)
GRADERS = HERE / "graders"
NUMBER = {e.id: n for n, e in enumerate(EXERCISES, 1)}


def pick(names):
    # ids or numbers, or "all" -> the exercises, in the list's order, each once
    if "all" in names:
        return list(EXERCISES)
    chosen = set()
    for name in names:
        if name.isdigit() and 1 <= int(name) <= len(EXERCISES):
            name = EXERCISES[int(name) - 1].id
        if name not in BY_ID:
            raise ExerciseError(f"unknown exercise {name!r} "
                                "(see `python -m tools.exercises list`)", 2)
        chosen.add(name)
    return [e for e in EXERCISES if e.id in chosen]


# --------------------------------------------------------------------------------------- commands

def cmd_list(args):
    if args.json:
        rows = [dict(id=e.id, title=e.title, functions=list(e.functions)) for e in EXERCISES]
        print(json.dumps(rows, indent=1))
        return 0
    for e in EXERCISES:
        print(f"{NUMBER[e.id]:>2}  {e.id:<19} {e.title}")
        print(f"{'':23}{', '.join(e.functions)}")
    print(f"\n{len(EXERCISES)} exercises; `python -m tools.exercises show ID` for one, "
          "`python -m tools.exercises experiments` for the experiments")
    return 0


def cmd_show(args):
    for e in pick(args.ids):
        print(f"exercise {NUMBER[e.id]}: {e.title}  [{e.id}]\n")
        print("write the body of: " + ", ".join(e.functions) + "\n")
        print(e.statement + "\n")
        for h in e.hints:
            print(textwrap.fill(h, 96, initial_indent="hint: ", subsequent_indent="      "))
        print(f"\ngrade it: python -m tools.exercises check {e.id} --dir YOUR_COPY  "
              f"(tools/exercises/{e.grader})")
        if args.solution:
            for f in e.functions:
                path, qualname = f.split(":")
                source = (PROJECT / path).read_bytes().decode("utf-8")
                body = body_source(source, qualname)
                print(f"\n--- the project's body of {f} ---\n{body}", end="")
        print()
    return 0


def cmd_make(args):
    chosen = pick(args.ids)
    out = Path(args.out).expanduser()
    n = copy_project(PROJECT, out)
    blank_exercises(out, chosen, NUMBER)
    print(f"wrote {n} files to {out}, with {len(chosen)} exercise(s) to write:")
    for e in chosen:
        print(f"  {NUMBER[e.id]:>2} {e.id:<19} {', '.join(e.functions)}")
    ids = " ".join(e.id for e in chosen) if len(chosen) < len(EXERCISES) else "all"
    print(f"grade them: python -m tools.exercises check {ids} --dir {out}")
    return 0


def run_graders(chosen, folder, timeout):
    # One pytest process for all the chosen graders. -> {id: [check, ...]}, each check a dict of
    # name, outcome ("passed" | "failed" | "error"), message, seconds; and pytest's own output.
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        path = [str(folder)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        env = dict(os.environ, EXERCISES_DIR=str(folder), EXERCISES_REPORT=str(report),
                   PYTHONPATH=os.pathsep.join(path), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        # --import-mode=append: the graders' folder goes last on sys.path, so `import llama`
        # finds the copy's (the working folder, first), never this project's
        cmd = [sys.executable, "-m", "pytest", "-q", "-c", str(GRADERS / "pytest.ini"),
               "--rootdir", str(GRADERS), "--import-mode=append",
               *[str(HERE / e.grader) for e in chosen]]
        try:
            done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            output = f"the graders ran past --timeout {timeout} s and were stopped"
        lines = report.read_text().splitlines() if report.exists() else []
    results = {e.id: [] for e in chosen}
    by_file = {Path(e.grader).name: e.id for e in chosen}
    for line in lines:
        check = json.loads(line)
        results[by_file[check.pop("file")]].append(check)
    return results, output


def cmd_check(args):
    chosen = pick(args.ids)
    folder = Path(args.dir).expanduser().resolve()
    if not folder.is_dir():
        raise ExerciseError(f"--dir {args.dir}: no such folder", 2)
    files = sorted({f.split(":")[0] for e in chosen for f in e.functions})
    if missing := [f for f in files if not (folder / f).is_file()]:
        raise ExerciseError(f"--dir {folder}: has no {missing[0]}; is it a copy of the project?", 2)
    t0 = time.perf_counter()
    results, output = run_graders(chosen, folder, args.timeout)
    summary, all_pass = [], True
    for e in chosen:
        checks = results[e.id]
        ok = bool(checks) and all(c["outcome"] == "passed" for c in checks)
        all_pass &= ok
        summary.append(dict(id=e.id, number=NUMBER[e.id], title=e.title, passed=ok,
                            seconds=round(sum(c["seconds"] for c in checks), 3), checks=checks))
    if args.json:
        print(json.dumps(dict(dir=str(folder), passed=all_pass, exercises=summary), indent=1))
        return 0 if all_pass else 1
    for s in summary:
        checks = s["checks"]
        print(f"exercise {s['number']}, {s['id']}: {s['title']}")
        for c in checks:
            print(f"  {'ok  ' if c['outcome'] == 'passed' else 'FAIL'}  {c['name']}")
            if c["outcome"] != "passed":
                print(textwrap.indent(explain(c["message"]), " " * 8))
        n = sum(c["outcome"] == "passed" for c in checks)
        print(f"  {n} of {len(checks)} checks pass ({s['seconds']:.2f} s)\n" if checks else
              "  the grader ran no check (see pytest's output below)\n")
    if not all(results.values()):
        print(output.strip()[-3000:])
    print(f"{'all pass' if all_pass else 'not yet'}: {sum(s['passed'] for s in summary)} of "
          f"{len(summary)} exercise(s) pass, in {time.perf_counter() - t0:.1f} s")
    return 0 if all_pass else 1


def explain(message):
    # the first lines of a failure, with a word for the exercise not written yet
    if "NotImplementedError: exercise" in message:
        return "not written yet (NotImplementedError)"
    lines = message.strip().splitlines()
    return "\n".join(lines[:12] + (["..."] if len(lines) > 12 else []))


def cmd_experiments(args):
    chosen = [x for x in EXPERIMENTS if not args.ids or x.id in args.ids]
    if args.ids and len(chosen) < len(set(args.ids)):
        unknown = sorted(set(args.ids) - {x.id for x in EXPERIMENTS})[0]
        raise ExerciseError(f"unknown experiment {unknown!r} (have "
                            f"{', '.join(x.id for x in EXPERIMENTS)})", 2)
    for x in chosen:
        print(f"[{x.id}] {x.question}\n")
        for c in x.commands:
            print(f"    {c}")
        print(f"\ntime here: {x.time}")
        if x.read:
            print("read: " + ", ".join(x.read))
        if args.answers:
            print("\nanswer key:\n" + textwrap.indent(x.answer, "  "))
        print()
    print("times: measured on a 2-core CPU, one thread (OMP_NUM_THREADS=1: docs/instructor.md)")
    if not args.answers:
        print("(--answers shows the keys, from measured runs)")
    return 0


# ------------------------------------------------------------------------------------------ the CLI

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, as the project's scripts
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def main(argv=None):
    p = Parser(prog="python -m tools.exercises", description="Exercises made from this project's "
               "code, and their graders.", formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="ids: see `list`; a number works too, and `all` means every exercise")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    s = sub.add_parser("list", help="the exercises, in reading order")
    s.add_argument("--json", action="store_true", help="as JSON: id, title, functions")
    s = sub.add_parser("show", help="an exercise's statement and hints")
    s.add_argument("ids", nargs="+", metavar="ID")
    s.add_argument("--solution", action="store_true", help="also the project's own bodies")
    s = sub.add_parser("make", help="a copy of the project with the exercises' bodies blanked")
    s.add_argument("ids", nargs="+", metavar="ID")
    s.add_argument("--out", required=True, help="the copy's folder (new, or empty)")
    s = sub.add_parser("check", help="grade a copy (exit status 0 only if every check passes)")
    s.add_argument("ids", nargs="+", metavar="ID")
    s.add_argument("--dir", required=True, help="the copy to grade (. for the project itself)")
    s.add_argument("--json", action="store_true", help="the results as JSON")
    s.add_argument("--timeout", type=float, default=600,
                   help="seconds before the graders are stopped")
    s = sub.add_parser("experiments", help="questions for the shapes world, with measured answers")
    s.add_argument("ids", nargs="*", metavar="ID")
    s.add_argument("--answers", action="store_true", help="show the answer keys")
    args = p.parse_args(argv)
    commands = dict(list=cmd_list, show=cmd_show, make=cmd_make, check=cmd_check,
                    experiments=cmd_experiments)
    try:
        return commands[args.command](args)
    except ExerciseError as e:  # status 2: a bad argument; 1: anything else that went wrong
        print(f"{p.prog}: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:  # the output piped into `head`: nothing more to say
        return 0
    except OSError as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
