"""Architecture rules that a machine can check (docs/architecture.md, "Rules of the house")."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "negspace"
#: the Lightning glue; everything else is the functional core
GLUE = ("callbacks", "modules", "data_modules", "demo", "cli.py", "sweep.py", "compare.py", "discover_cli.py", "lightning_cli.py")


def _is_glue(f: pathlib.Path) -> bool:
    return f.relative_to(SRC).parts[0] in GLUE


def _core_files() -> list[pathlib.Path]:
    return [f for f in sorted(SRC.rglob("*.py")) if not _is_glue(f)]


def _module_name(f: pathlib.Path) -> str:
    parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(f: pathlib.Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_the_core_is_every_module_outside_the_glue():
    core = {f.relative_to(SRC).parts[0] for f in _core_files()}
    for expected in ("hooks.py", "batch.py", "reduce.py", "stats.py", "distributed.py", "plots.py", "objectives.py",
                     "attribution", "priors", "explain", "editing", "metrics", "models"):  # fmt: skip
        assert expected in core, f"{expected} missing from the functional core"


def test_functional_core_never_imports_lightning():
    offenders = [
        f"{f.relative_to(SRC)}:{line} {name}"
        for f in _core_files()
        for line, name in _imports(f)
        if name.split(".")[0] in ("lightning", "pytorch_lightning")
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("chunk", range(2))
def test_importing_any_core_module_does_not_load_lightning(chunk):
    modules = [_module_name(f) for f in _core_files()][chunk::2]
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')])\n"
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout


def test_private_modules_are_not_imported_across_packages():
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        here = _module_name(f).rsplit(".", 1)[0] if f.name != "__init__.py" else _module_name(f)
        for line, name in _imports(f):
            parts = name.split(".")
            if parts[0] != "negspace":
                continue
            for i, p in enumerate(parts[1:], start=1):
                if p.startswith("_") and not p.startswith("__") and p not in ("_lazy", "_compat"):
                    # a private name may be used inside the package that owns it (siblings share helpers),
                    # never from another package; private names of top-level modules stay in that module
                    owner = ".".join(parts[:i])
                    owner_pkg = owner.rsplit(".", 1)[0]
                    if owner_pkg == "negspace" or not here.startswith(owner_pkg):
                        problems.append(f"{f.relative_to(SRC)}:{line} imports {name}")
                    break
    assert not problems, problems


def test_one_way_to_switch_to_eval_mode():
    """``was = m.training; m.eval(); ...; m.train(was)`` flips intentionally frozen submodules back to training."""
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "train" and node.args
                    and isinstance(node.args[0], ast.Name) and node.args[0].id.startswith("was")):  # fmt: skip
                problems.append(f"{f.relative_to(SRC)}:{node.lineno}")
    assert not problems, f"use negspace.hooks.eval_mode instead: {problems}"


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


def test_captum_is_only_a_test_oracle():
    users = [f"{f.relative_to(SRC)}" for f in sorted(SRC.rglob("*.py")) if any(n.split(".")[0] == "captum" for _, n in _imports(f))]
    assert not users, f"src must not import captum (it is a dev dependency): {users}"


def test_old_module_paths_still_import_with_a_warning():
    code = (
        "import warnings, importlib\n"
        "from negspace._compat import MOVED\n"
        "for old in MOVED:\n"
        "    with warnings.catch_warnings(record=True) as w:\n"
        "        warnings.simplefilter('always')\n"
        "        m = importlib.import_module(old)\n"
        "    assert any(issubclass(x.category, DeprecationWarning) for x in w), old\n"
        "    assert dir(m), old\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
