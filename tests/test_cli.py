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
    from negspace.demo.table2 import _config

    with pytest.raises(ValueError, match="seeds"):
        _config(False, 0, None, None, None, None)
    with pytest.raises(ValueError, match="lambdas"):
        _config(False, None, None, [-1.0], None, None)
    cfg = _config(True, None, None, None, None, None)
    assert cfg.seeds == 1 and cfg.quick
    args = demo_parser().parse_args(["--finetune", "--quick", "--model", "xsmallcnn", "--freeze-epochs", "0",
                                     "--backbone-lr-mult", "0.5"])
    assert args.finetune and args.model == "xsmallcnn" and args.freeze_epochs == 0 and args.backbone_lr_mult == 0.5
    from negspace.demo import run_finetune_demo

    with pytest.raises(ValueError, match="unknown fine-tuning demo option"):
        run_finetune_demo(quick=True, out="/nonexistent", nope=1)


@pytest.mark.slow
def test_console_script_help_subprocess():
    exe = shutil.which("negspace") or str(__import__("pathlib").Path(sys.executable).parent / "negspace")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "negspace demo" in res.stdout


def _res(no_bias: float, inverse: float) -> dict:
    row = {"class_0": no_bias, "class_1": no_bias, "avg": no_bias, "attr": 0.1, "attr_nontarget": 0.1}
    inv = dict(row, avg=inverse)
    return {"train_bias": dict(row), "inverse_bias": inv, "no_bias": dict(row)}


def test_demo_summary_picks_lambda_on_validation_and_reports_test():
    from negspace.demo import check_pattern, summarise

    runs = {
        ("unbiased", 0.0): [{"val": _res(0.8, 0.8), "test": _res(0.79, 0.8)}],
        ("none", 0.0): [{"val": _res(0.5, 0.1), "test": _res(0.5, 0.1)}],
        # λ=10 wins on validation no_bias even though λ=100 would be better on test: selection is on val
        ("presence", 10.0): [{"val": _res(0.75, 0.4), "test": _res(0.7, 0.4)}],
        ("presence", 100.0): [{"val": _res(0.7, 0.6), "test": _res(0.9, 0.6)}],
        ("presence_absence", 10.0): [{"val": _res(0.78, 0.6), "test": _res(0.77, 0.6)},
                                     {"val": _res(0.80, 0.6), "test": _res(0.79, 0.6)}],
    }
    s = summarise(runs)
    assert s["lambda"] == {"unbiased": 0.0, "none": 0.0, "presence": 10.0, "presence_absence": 10.0}
    assert s["by_setting"]["presence"]["no_bias"]["avg"] == pytest.approx(0.7)
    assert s["by_setting"]["presence_absence"]["no_bias"]["avg"] == pytest.approx(0.78)
    row = next(k for k in s["stds"] if k.startswith("Benign*: presence+absence"))
    assert s["stds"][row]["no_bias"]["avg"] == pytest.approx(0.0141421, abs=1e-5)
    assert all(ok for _, ok in check_pattern(s["by_setting"]))
    # a failing pattern is reported as failing
    runs[("presence_absence", 10.0)] = [{"val": _res(0.78, 0.2), "test": _res(0.6, 0.2)}]
    checks = dict(check_pattern(summarise(runs)["by_setting"]))
    assert not all(checks.values())


def test_demo_masks_option_selects_rows_and_checks_discovered_against_true():
    from negspace.demo import check_pattern, summarise
    from negspace.demo.table2 import settings_for

    assert demo_parser().parse_args([]).masks == "both"
    assert demo_parser().parse_args(["--masks", "discovered"]).masks == "discovered"
    with pytest.raises(SystemExit):
        demo_parser().parse_args(["--masks", "drawn"])
    names = {m: [s[0] for s in settings_for(m)] for m in ("true", "discovered", "both")}
    assert "presence_absence_discovered" not in names["true"] and "presence_absence" in names["true"]
    assert "presence_absence" not in names["discovered"] and "presence" in names["discovered"]
    assert {"presence_absence", "presence_absence_discovered"} <= set(names["both"])
    with pytest.raises(ValueError, match="masks must be one of"):
        settings_for("drawn")
    runs = {
        ("unbiased", 0.0): [{"val": _res(0.8, 0.8), "test": _res(0.79, 0.8)}],
        ("none", 0.0): [{"val": _res(0.5, 0.1), "test": _res(0.5, 0.1)}],
        ("presence", 10.0): [{"val": _res(0.7, 0.4), "test": _res(0.7, 0.4)}],
        ("presence_absence", 10.0): [{"val": _res(0.78, 0.6), "test": _res(0.77, 0.6)}],
        ("presence_absence_discovered", 10.0): [{"val": _res(0.76, 0.6), "test": _res(0.75, 0.57)}],
    }
    checks = dict(check_pattern(summarise(runs)["by_setting"]))
    key = next(k for k in checks if "discovered masks" in k)
    assert checks[key]  # 0.75 / 0.57 vs 0.77 / 0.6: within 0.05
    runs[("presence_absence_discovered", 10.0)] = [{"val": _res(0.76, 0.6), "test": _res(0.75, 0.5)}]
    assert not dict(check_pattern(summarise(runs)["by_setting"]))[key]  # inverse_bias 0.1 worse
    del runs[("presence_absence", 10.0)]  # discovered only: its row stands in for the true-mask one
    assert len(check_pattern(summarise(runs)["by_setting"])) == 4
