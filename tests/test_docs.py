"""Every ```python block of README.md and docs/*.md runs as written.

All blocks of one file run in order in ONE fresh subprocess namespace (later blocks may use names of earlier
ones). The files run concurrently (two at a time, one torch thread each), started once per session; each file is
one parametrised test that waits for its own result.

Markers (a comment line inside a block):

- ``# negspace-docs: needs-weights`` — the block loads published weights. From that block on, the file runs with
  random weights: ``timm.create_model(pretrained=True)`` and torchvision ``weights=...`` are replaced by random
  initialisation (no download); the reason is printed.
- ``# negspace-docs: skip <reason>`` — the block is not run; the reason is printed. Use it only for blocks that
  cannot run offline even with random weights (later blocks must not need its names).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
MARKER = re.compile(r"#\s*negspace-docs:\s*(needs-weights|skip)\b\s*(.*)")
TIMEOUT = 170  # seconds per file

def python_blocks(path: Path) -> list[dict]:
    """``[{"line": first code line (1-based), "code": str, "marker": str | None, "reason": str}]`` of a file."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            code = textwrap.dedent("\n".join(body))
            m = MARKER.search(code)
            blocks.append({"line": start, "code": code, "marker": m.group(1) if m else None,
                           "reason": (m.group(2).strip() if m else "")})
        i += 1
    return blocks


RUNNER = r'''
import json, os, sys, time, traceback
blocks, name = json.loads(sys.stdin.read()), sys.argv[1]
import torch
torch.set_num_threads(1)

def random_weights():
    """Published weights → random initialisation (no network)."""
    try:
        import timm
        orig_timm = timm.create_model
        def create_model(*a, **k):
            k["pretrained"] = False
            return orig_timm(*a, **k)
        timm.create_model = create_model
    except ImportError:
        pass
    try:
        import torchvision
        orig_tv = torchvision.models.get_model
        def get_model(n, **k):
            if k.get("weights") is not None:
                k["weights"] = None
            return orig_tv(n, **k)
        torchvision.models.get_model = get_model
    except ImportError:
        pass

ns = {"__name__": "__main__"}
patched = False
for i, b in enumerate(blocks):
    where = f"{name}:{b['line']} (block {i + 1}/{len(blocks)})"
    if b["marker"] == "skip":
        print(f"SKIPPED {where}: {b['reason'] or 'no reason given'}", flush=True)
        continue
    if b["marker"] == "needs-weights" and not patched:
        random_weights()
        patched = True
        print(f"RANDOM-WEIGHTS from {where}: {b['reason'] or 'needs downloaded weights'}", flush=True)
    t = time.time()
    try:
        exec(compile(b["code"], where, "exec"), ns)
    except BaseException:
        print(f"FAILED {where}", flush=True)
        traceback.print_exc()
        sys.exit(1)
    print(f"OK {where} {time.time() - t:.1f}s", flush=True)
'''


def _run(path: Path) -> tuple[int, str]:
    blocks = python_blocks(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONWARNINGS": "ignore"}
    with _tmpdir() as cwd:
        try:
            p = subprocess.run([sys.executable, "-c", RUNNER, path.name], input=json.dumps(blocks), text=True,
                               capture_output=True, timeout=TIMEOUT, cwd=cwd, env=env)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return 124, f"timed out after {TIMEOUT}s\n{out}"
    return p.returncode, p.stdout + p.stderr[-6000:]


def _tmpdir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="negspace_docs_")


_FILES_WITH_CODE = [p for p in DOC_FILES if python_blocks(p)]
_POOL: ThreadPoolExecutor | None = None
_FUTURES: dict[str, Future] = {}


def _future(path: Path) -> Future:
    """Start every file's subprocess on first use (two at a time) and return this file's future."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2)
        # longest files first
        for p in sorted(_FILES_WITH_CODE, key=lambda p: -len(p.read_text())):
            _FUTURES[p.name] = _POOL.submit(_run, p)
    return _FUTURES[path.name]


def test_blocks_are_extracted():
    assert sum(len(python_blocks(p)) for p in DOC_FILES) >= 15
    marked = python_blocks(ROOT / "README.md")
    assert all(b["code"].strip() for b in marked)


def test_marker_parsing(tmp_path):
    f = tmp_path / "x.md"
    f.write_text("text\n```python\n# negspace-docs: needs-weights timm resnet18\nx = 1\n```\n```bash\nls\n```\n")
    (b,) = python_blocks(f)
    assert (b["marker"], b["reason"], b["line"]) == ("needs-weights", "timm resnet18", 3)


def test_needs_weights_marker_runs_with_random_weights(tmp_path):
    f = tmp_path / "w.md"
    f.write_text("```python\n# negspace-docs: needs-weights timm resnet10t\nimport timm\n"
                 "m = timm.create_model('resnet10t', pretrained=True, num_classes=3)\n"
                 "assert m.get_classifier().out_features == 3\n```\n"
                 "```python\n# negspace-docs: skip needs a GPU\nraise SystemExit(1)\n```\n")
    rc, out = _run(f)
    assert rc == 0, out
    assert "RANDOM-WEIGHTS from w.md:2 (block 1/2): timm resnet10t" in out
    assert "SKIPPED w.md:8 (block 2/2): needs a GPU" in out


@pytest.mark.parametrize("path", _FILES_WITH_CODE, ids=[p.name for p in _FILES_WITH_CODE])
def test_doc_blocks_run(path: Path):
    rc, out = _future(path).result()
    for line in out.splitlines():
        if line.startswith(("SKIPPED", "RANDOM-WEIGHTS")):
            print(line)
    if rc != 0:
        pytest.fail(f"{path.name}: a python block does not run as written\n{out}", pytrace=False)
