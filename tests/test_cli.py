"""The `negspace` console script: help texts and the demo argument parser."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from negspace.cli import demo_parser, main


def test_help_mentions_demo_and_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "fit" in out and "validate" in out and "test" in out


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--seeds" in out and "--out" in out


def test_demo_parser_defaults_and_errors(capsys):
    args = demo_parser().parse_args(["--quick", "--seeds", "2", "--lambdas", "1", "10"])
    assert args.quick and args.seeds == 2 and args.lambdas == [1.0, 10.0] and args.out == "negspace_demo"
    with pytest.raises(SystemExit):
        demo_parser().parse_args(["--seeds", "x"])
    from negspace.demo import _config

    with pytest.raises(ValueError, match="seeds"):
        _config(False, 0, None, None, None, None)
    with pytest.raises(ValueError, match="lambdas"):
        _config(False, None, None, [-1.0], None, None)
    cfg = _config(True, None, None, None, None, None)
    assert cfg.seeds == 1 and cfg.quick


@pytest.mark.slow
def test_console_script_help_subprocess():
    exe = shutil.which("negspace") or str(__import__("pathlib").Path(sys.executable).parent / "negspace")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "negspace demo" in res.stdout
