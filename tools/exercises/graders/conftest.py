# What every grader shares: one thread (small ops; a shared laptop), a guard that the modules
# graded are the copy's, and a report of each check for `python -m tools.exercises check`.
import json
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
GRADED = ("llama", "clip", "unet", "diffusion", "dreamllm")
_checks = {}  # nodeid -> the check's record


@pytest.fixture(autouse=True)
def graded_modules_come_from_the_copy():
    yield
    folder = os.environ.get("EXERCISES_DIR")
    for name in GRADED if folder else ():
        module = sys.modules.get(name)
        if module is not None and Path(module.__file__).resolve().parent != Path(folder).resolve():
            raise RuntimeError(f"graded {module.__file__}, not the copy in {folder}")


def _name(nodeid):  # "test_rope.py::test_keeps_norms[2]" -> "keeps norms [2]"
    test = nodeid.split("::")[-1].removeprefix("test_")
    base, _, param = test.partition("[")
    return base.replace("_", " ") + (f" [{param}" if param else "")


def pytest_runtest_logreport(report):
    check = _checks.setdefault(report.nodeid, dict(
        file=Path(report.nodeid.split("::")[0]).name, name=_name(report.nodeid), outcome="passed",
        message="", seconds=0.0))
    check["seconds"] += report.duration
    if report.failed:
        check["outcome"] = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        check["message"] = crash.message if crash is not None else str(report.longrepr)[-2000:]


def pytest_collectreport(report):
    if report.failed:  # a grader that cannot even be imported (a copy missing a module)
        _checks[report.nodeid] = dict(file=Path(report.nodeid).name, name="import the grader",
                                      outcome="error", message=str(report.longrepr)[-2000:],
                                      seconds=0.0)


def pytest_sessionfinish(session):
    path = os.environ.get("EXERCISES_REPORT")
    if path:
        with open(path, "w") as f:
            for check in _checks.values():
                f.write(json.dumps(check) + "\n")
