"""The README's commands: the two quick-start ones are what CI runs, word for word, and every other
command it shows starts a program that exists and answers -h."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def commands():  # the lines of the README's bash blocks, comments cut
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_the_quick_start_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    quick = [c for c in commands() if c.startswith("python3 -m venv")]
    assert len(quick) == 2 and all(c in ci.splitlines() for c in quick)
    assert README.index(quick[0]) < 2000  # the first command on the first screen


def programs():  # "python -m tools.sweep variants" -> ["-m", "tools.sweep"]; "python train.py" -> ["train.py"]
    found = []
    for c in commands():
        words = c.split()
        if words[0] != "python" or words[1:2] == ["-m"] and words[2] == "pytest":
            continue
        program = words[1:3] if words[1] == "-m" else words[1:2]
        if program not in found:
            found.append(program)
    return found


@pytest.mark.parametrize("program", programs(), ids=" ".join)
def test_every_command_the_readme_shows_answers_help(program):
    done = subprocess.run([sys.executable, *program, "-h"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-500:]
