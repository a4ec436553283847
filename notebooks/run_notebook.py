#!/usr/bin/python3
"""Executes moelab's lab notebooks end to end, as the test suite does.

    /usr/bin/python3 notebooks/run_notebook.py notebooks/01_routing.ipynb --solutions
    /usr/bin/python3 notebooks/run_notebook.py notebooks/0*.ipynb --solutions --timing
    /usr/bin/python3 notebooks/run_notebook.py notebooks/0*.ipynb --check-clean

An exercise cell is a code cell with a line `# EXERCISE ...`; it defines one or more functions that
`raise NotImplementedError` until the student writes them. With `--solutions` each such cell is
replaced by the same functions taken from notebooks/solutions/<notebook stem>.py (or from
`--solutions DIR`, falling back to notebooks/solutions/ for functions DIR does not define), and the
notebook runs in memory on Debian's python3 kernel (nbclient). Any error fails the run, with the
cell and the message (a check cell's LabCheckError says what is wrong).

`--expect-error REGEX`: the run must FAIL, with an error whose message matches REGEX (the test that
the check cells can fail). `--check-clean`: no execution; the committed notebooks must have no
outputs, every exercise must raise NotImplementedError and have a solution. `--executed DIR` writes
the executed notebooks there. Exit status 0 = as expected, 1 = not, 2 = bad usage.

The kernel is started as `sys.executable -m ipykernel_launcher` (this interpreter: run me with
/usr/bin/python3), with MOELAB_ROOT = the repository root and notebooks/ on PYTHONPATH; the
compiled module comes from the PYTHONPATH the caller gives (<build>/python).
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXERCISE = re.compile(r"^\s*# EXERCISE\b", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ThisInterpreter(KernelSpecManager):
    """The python3 kernel, always run by this interpreter (never a python3 found on PATH)."""

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(argv=[sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="Python 3 (moelab labs)", language="python",
                          resource_dir=str(HERE))


class ThisKernelManager(AsyncKernelManager):
    def __init__(self, **kwargs):
        super().__init__(kernel_spec_manager=ThisInterpreter(), **kwargs)


def exercise_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and EXERCISE.search(c.source)]


def defined_functions(source: str, where: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise SystemExit(f"{where}: not valid Python: {e}")
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]


def solution_sources(path: Path) -> tuple[str, dict]:
    """(the imports of a solution file, {function name: its source})."""
    text = path.read_text()
    tree = ast.parse(text)
    imports = [ast.get_source_segment(text, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    functions = {n.name: ast.get_source_segment(text, n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    return "\n".join(imports), functions


def substitute(nb, stem: str, solutions_dir: Path | None) -> int:
    """Replaces every exercise cell by the solutions; returns how many cells were replaced."""
    files = [p for p in (solutions_dir and solutions_dir / f"{stem}.py", HERE / "solutions" / f"{stem}.py")
             if p and p.exists()]
    if not files:
        raise SystemExit(f"{stem}: no solution file {HERE / 'solutions' / (stem + '.py')}")
    loaded = [(p, *solution_sources(p)) for p in files]
    cells = exercise_cells(nb)
    for cell in cells:
        parts = []
        for name in defined_functions(cell.source, f"{stem}: exercise cell"):
            found = next(((p, imports, fns[name]) for p, imports, fns in loaded if name in fns), None)
            if found is None:
                raise SystemExit(f"{stem}: no solution for {name}() in {', '.join(map(str, files))}")
            p, imports, source = found
            parts.append(f"# SOLUTION from {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}\n"
                         f"{imports}\n\n{source}")
        cell.source = "\n\n\n".join(parts)
    return len(cells)


def check_clean(path: Path, nb) -> list[str]:
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            problems.append(f"{path.name}: cell {i} has outputs or an execution count: clear them "
                            f"before committing (Kernel > Restart & Clear Output)")
    cells = exercise_cells(nb)
    if not cells:
        problems.append(f"{path.name}: no exercise cell (a line '# EXERCISE ...')")
    solution = HERE / "solutions" / f"{path.stem}.py"
    names = solution_sources(solution)[1] if solution.exists() else {}
    if not solution.exists():
        problems.append(f"{path.name}: no solution file {solution}")
    for cell in cells:
        functions = defined_functions(cell.source, path.name)
        if not functions:
            problems.append(f"{path.name}: an exercise cell defines no function")
        if "raise NotImplementedError" not in cell.source:
            problems.append(f"{path.name}: exercise {functions} must `raise NotImplementedError` "
                            f"(the committed notebook is the student's version)")
        problems += [f"{path.name}: no solution for {f}() in {solution.name}" for f in functions
                     if f not in names]
    return problems


def run(path: Path, args) -> tuple[bool, float, str]:
    """(as expected?, seconds, message)."""
    nb = nbformat.read(path, as_version=4)
    if args.solutions is not None:
        substitute(nb, path.stem, Path(args.solutions) if args.solutions else None)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            kernel_manager_class=ThisKernelManager,
                            resources={"metadata": {"path": str(HERE)}})
    started = time.monotonic()
    error = None
    try:
        client.execute()
    except CellExecutionError as e:
        error = ANSI.sub("", str(e))
    except (CellTimeoutError, DeadKernelError) as e:
        error = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - started
    if args.executed:
        out = Path(args.executed)
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / path.name)
    if args.timing and error is None:
        slow = sorted(((c.get("metadata", {}).get("execution", {}), i) for i, c in enumerate(nb.cells)
                       if c.cell_type == "code"), key=lambda x: -_cell_seconds(x[0]))[:3]
        detail = ", ".join(f"cell {i} {_cell_seconds(m):.1f} s" for m, i in slow)
        print(f"  slowest: {detail}")
    if args.expect_error:
        if error is None:
            return False, seconds, "ran without error, but an error matching " \
                                   f"{args.expect_error!r} was expected"
        if not re.search(args.expect_error, error):
            return False, seconds, f"failed, but not with {args.expect_error!r}:\n{_tail(error)}"
        return True, seconds, f"failed as expected:\n{_tail(error)}"
    if error is not None:
        return False, seconds, f"failed:\n{_tail(error)}"
    return True, seconds, "ok"


def _cell_seconds(meta) -> float:
    from datetime import datetime
    try:
        a = datetime.fromisoformat(meta["iopub.execute_input"].replace("Z", "+00:00"))
        b = datetime.fromisoformat(meta["shell.execute_reply"].replace("Z", "+00:00"))
        return (b - a).total_seconds()
    except (KeyError, ValueError):
        return 0.0


def _tail(error: str, lines: int = 30) -> str:
    # nbclient's message: the cell's source, then the traceback; the last lines say what failed.
    text = ANSI.sub("", error).rstrip().splitlines()
    return "\n".join("    " + line for line in text[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--solutions", nargs="?", const="", default=None, metavar="DIR",
                        help="substitute the solutions (from DIR, else notebooks/solutions/)")
    parser.add_argument("--expect-error", metavar="REGEX", help="the run must fail with this message")
    parser.add_argument("--check-clean", action="store_true", help="check the committed notebooks, run nothing")
    parser.add_argument("--executed", metavar="DIR", help="write the executed notebooks here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell (default 300)")
    parser.add_argument("--timing", action="store_true", help="print the slowest cells")
    args = parser.parse_args(argv)
    os.environ.setdefault("MOELAB_ROOT", str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    ok = True
    total = 0.0
    for path in args.notebooks:
        if not path.exists():
            print(f"{path}: no such notebook", file=sys.stderr)
            return 2
        if args.check_clean:
            problems = check_clean(path, nbformat.read(path, as_version=4))
            print(f"{path.name}: " + ("clean" if not problems else "\n  ".join(["NOT clean"] + problems)))
            ok &= not problems
            continue
        good, seconds, message = run(path, args)
        total += seconds
        print(f"{path.name}: {seconds:.1f} s: {message}", flush=True)
        ok &= good
    if len(args.notebooks) > 1 and not args.check_clean:
        print(f"total {total:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
