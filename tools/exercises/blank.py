"""A student's copy of the project: every file copied, then the bodies of some functions replaced by
`raise NotImplementedError("exercise N: title")`. The functions are found with `ast`, and only
their body's lines change: the `def` line, the comment lines and docstring that open the body
stay, and every other line of the file stays byte-identical (so the product carries no markers).
"""
import ast
import json
import shutil
import subprocess
from pathlib import Path

# never copied when the project is not a git checkout (in one, `git ls-files` decides)
SKIP = {".git", ".venv", "venv", "out", "__pycache__", ".pytest_cache"}


class ExerciseError(Exception):  # a one-line error for the user; code: the exit status
    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def project_files(root):
    # The project's files, relative to root: tracked and untracked-but-not-ignored ones in a git
    # checkout (so a new, uncommitted file travels too), else a walk that skips SKIP.
    root = Path(root)
    try:
        listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        out = subprocess.run(listing, cwd=root, capture_output=True, check=True).stdout
        inside = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        if Path(inside).resolve() == root.resolve():
            names = sorted({n for n in out.decode().split("\0") if n})
            return [Path(n) for n in names if (root / n).is_file()]  # not a deleted tracked one
    except (OSError, subprocess.CalledProcessError):
        pass
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and not SKIP & set(p.relative_to(root).parts[:-1]))


def copy_project(root, out):
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents and not _ignored(root, out):
        raise ExerciseError(f"--out {out}: inside the project, where it would copy itself; "
                            "pick a folder elsewhere (or under out/)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExerciseError(f"--out {out}: exists and is not an empty folder")
    files = project_files(root)
    for rel in files:
        if out in (root / rel).resolve().parents:  # an older copy under the project
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)
    return len(files)


def _ignored(root, path):  # out/ and the like: a copy there is not a project file
    rel = path.relative_to(root)
    return bool(SKIP & set(rel.parts)) or subprocess.run(
        ["git", "check-ignore", "-q", str(rel)], cwd=root, capture_output=True).returncode == 0


def find_function(tree, qualname):
    # "Class.method" or "function" -> its FunctionDef node, or None
    nodes, parts = tree.body, qualname.split(".")
    for i, name in enumerate(parts):
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if i == len(parts) - 1 else (ast.ClassDef,)
        match = [n for n in nodes if isinstance(n, kinds) and n.name == name]
        if not match:
            return None
        nodes = match[-1].body  # a later definition wins, as at run time
    return match[-1]


def body_span(source, qualname):
    # -> (first line, last line, indentation) of the statements to replace, lines counted from 1.
    # A leading docstring stays; comments and blank lines before the first statement stay too.
    node = find_function(ast.parse(source), qualname)
    if node is None:
        return None
    body = node.body
    if (len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]  # the docstring
    first, last = body[0], body[-1]
    if first.lineno == node.lineno:
        raise ExerciseError(f"{qualname}: its body shares the line of its `def`; cannot blank it")
    return first.lineno, last.end_lineno, first.col_offset


def blank(source, qualname, message):
    # source with the body of `qualname` replaced by one raise, at the body's indentation
    span = body_span(source, qualname)
    if span is None:
        raise ExerciseError(f"no function {qualname}")
    first, last, indent = span
    lines = source.splitlines(keepends=True)
    newline = "\r\n" if lines[first - 1].endswith("\r\n") else "\n"
    quoted = json.dumps(message, ensure_ascii=False)  # "...", as the house quotes strings
    raise_line = " " * indent + f"raise NotImplementedError({quoted})" + newline
    out = "".join(lines[:first - 1] + [raise_line] + lines[last:])
    ast.parse(out)  # still Python
    return out


def body_source(source, qualname):  # the lines blank() would replace: the solution, as written
    span = body_span(source, qualname)
    if span is None:
        raise ExerciseError(f"no function {qualname}")
    return "".join(source.splitlines(keepends=True)[span[0] - 1:span[1]])


def blank_exercises(folder, exercises, number):
    # In `folder` (a copy), blank every function of the given exercises. number: id -> its N.
    folder = Path(folder)
    by_file = {}
    for e in exercises:
        for f in e.functions:
            path, qualname = f.split(":")
            by_file.setdefault(path, []).append((qualname, f"exercise {number[e.id]}: {e.title}"))
    for path, todo in by_file.items():
        file = folder / path
        if not file.is_file():
            raise ExerciseError(f"{path}: no such file in {folder}")
        source = file.read_bytes().decode("utf-8")  # newlines as they are, \r\n included
        for qualname, message in todo:
            try:
                source = blank(source, qualname, message)
            except ExerciseError as e:
                raise ExerciseError(f"{path}: {e} (the exercise list is out of date)") from None
        file.write_bytes(source.encode("utf-8"))
