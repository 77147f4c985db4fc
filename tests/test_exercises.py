# The exercises (python -m tools.exercises): the list is well formed and names functions that
# exist; the graders pass on the project itself; on a copy with every exercise blanked, every check of every
# grader fails, and for its own exercise (a check that passes on a blank checks nothing); and a
# grader passes while the exercises around it are blanked (it depends on no other solution).
import ast
import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.exercises.blank import body_span, find_function

ROOT = Path(__file__).resolve().parent.parent


def exercises_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "tools.exercises", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def listed():
    done = exercises_cli("list", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def graded(folder, ids=("all",)):
    # -> (exit status, {id: [check, ...]}) of `check IDS --dir folder --json`
    done = exercises_cli("check", *ids, "--dir", str(folder), "--json")
    assert done.stdout, done.stderr
    return done.returncode, {e["id"]: e for e in json.loads(done.stdout)["exercises"]}


def test_the_list_names_functions_that_exist(listed):
    assert len(listed) >= 12
    assert len({e["id"] for e in listed}) == len(listed)
    for e in listed:
        assert set(e) == {"id", "title", "functions"} and e["title"] and e["functions"]
        grader = f"test_{e['id'].replace('-', '_')}.py"
        assert (ROOT / "tools" / "exercises" / "graders" / grader).is_file()
        for f in e["functions"]:
            path, qualname = f.split(":")
            assert find_function(ast.parse((ROOT / path).read_text()), qualname), f


def test_the_project_passes_every_grader(listed):
    status, results = graded(ROOT)
    failed = {i: [c["name"] for c in e["checks"] if c["outcome"] != "passed"]
              for i, e in results.items() if not e["passed"]}
    assert status == 0 and not failed, failed
    assert set(results) == {e["id"] for e in listed}
    assert all(len(e["checks"]) >= 3 for e in results.values())


def test_a_blanked_copy_fails_every_check_and_keeps_the_rest_of_each_file(listed, tmp_path):
    copy = tmp_path / "student"
    done = exercises_cli("make", "all", "--out", str(copy))
    assert done.returncode == 0, done.stderr
    status, results = graded(copy)
    assert status == 1
    for n, e in enumerate(listed, 1):
        checks = results[e["id"]]["checks"]
        assert checks, e["id"]
        for c in checks:  # each fails on its own exercise's missing body, not on another's
            assert c["outcome"] != "passed", (e["id"], c["name"])
            assert f"NotImplementedError: exercise {n}:" in c["message"], (e["id"], c["message"])
    # outside the bodies, every line of every file is the project's, byte for byte
    spans = {}
    for e in listed:
        for f in e["functions"]:
            path, qualname = f.split(":")
            first, last, _ = body_span((ROOT / path).read_text(), qualname)
            spans.setdefault(path, []).append(range(first - 1, last))
    for path, bodies in spans.items():
        old = (ROOT / path).read_bytes().decode().splitlines(keepends=True)
        new = (copy / path).read_bytes().decode().splitlines(keepends=True)
        changes = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
        for op, i1, i2, j1, j2 in changes:
            if op == "equal":
                continue
            assert all(any(i in body for body in bodies) for i in range(i1, i2)), (path, old[i1:i2])
            assert all('raise NotImplementedError("exercise ' in line for line in new[j1:j2])
    assert (copy / "weights" / "toy" / "llm" / "config.json").is_file()  # the whole project


def test_each_grader_passes_with_its_neighbours_blanked(listed, tmp_path):
    # two copies: the odd-numbered exercises blanked, then the even ones; in each, the others pass
    ids = [e["id"] for e in listed]
    for parity in (0, 1):
        blanked = ids[parity::2]
        copy = tmp_path / f"blanked-{parity}"
        assert exercises_cli("make", *blanked, "--out", str(copy)).returncode == 0
        _, results = graded(copy)
        for i in ids:
            assert results[i]["passed"] == (i not in blanked), (i, results[i]["checks"])


def test_bad_input_is_one_line(tmp_path):
    cases = [(("show", "no-such-exercise"), 2),
             (("check", "rope", "--dir", str(tmp_path / "none")), 2),  # no such folder
             (("check", "rope", "--dir", str(tmp_path)), 2),           # not a copy of the project
             (("make", "99", "--out", str(tmp_path / "x")), 2),        # no exercise 99
             (("make", "rope", "--out", str(ROOT / "tests")), 1)]      # inside the project
    for args, status in cases:
        done = exercises_cli(*args)
        assert done.returncode == status, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout, (args, done.stderr)
