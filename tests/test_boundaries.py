"""Architecture rules that a machine can check (DESIGN.md, "Rules of the house")."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "negspace"
CORE = ["hooks.py", "objectives.py", "priors.py", "attribution", "editing", "explain"]


def _core_files() -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for entry in CORE:
        p = SRC / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
    return files


def test_functional_core_never_imports_lightning():
    offenders = []
    for f in _core_files():
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{f.name}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not offenders, offenders


def test_importing_the_core_does_not_load_lightning():
    modules = ["negspace.hooks", "negspace.objectives", "negspace.attribution", "negspace.editing.channels"]
    modules += [f"negspace.{p.stem}" for p in (SRC / "priors.py",) if p.exists()]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]\nprint(bad)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_no_assert_pickle_or_unsafe_load_in_src():
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assert):
                problems.append(f"{f.relative_to(SRC)}:{node.lineno} assert")
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{f.relative_to(SRC)}:{node.lineno} pickle" for m in mods if m in ("pickle", "dill")]
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                base = getattr(node.func, "value", None)
                if getattr(base, "id", None) == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True
                    if not ok:
                        problems.append(f"{f.relative_to(SRC)}:{node.lineno} torch.load without weights_only=True")
    assert not problems, problems
