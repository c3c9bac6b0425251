"""``negspace sweep``: λ set in the recipe, selection on the validation split, table and selected config."""

from __future__ import annotations

import json

import pytest
import yaml

from negspace.cli import run_cli
from negspace.sweep import format_sweep, parse_list, score_of, select_lam, with_lam

RECIPE = {
    "seed_everything": 0,
    "model": {"model": {"class_path": "negspace.models.xmodels.XSmallCNN",
                        "init_args": {"num_classes": 2, "in_channels": 3, "width": 4}},
              "num_classes": 2, "lr": 0.01},
    "data": {"class_path": "negspace.data_modules.SyntheticLesionDataModule",
             "init_args": {"n_train": 32, "n_val": 16, "n_test": 16, "image_size": 16, "batch_size": 16, "seed": 0}},
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False,
                "callbacks": [{"class_path": "negspace.callbacks.AttributionPrior",
                               "init_args": {"lam": 10.0, "mode": "presence_absence"}}]},
}


def test_parse_list_and_with_lam():
    assert parse_list("1, 3,10", "lam") == [1.0, 3.0, 10.0]
    assert parse_list("auto,3", "lam") == ["auto", 3.0]
    assert parse_list("0,1", "seeds", int) == [0, 1]
    with pytest.raises(ValueError, match="--lam"):
        parse_list("1,x", "lam")
    with pytest.raises(ValueError, match="--lam"):
        parse_list("-1", "lam")
    tree = with_lam(RECIPE, 30.0)
    assert tree["trainer"]["callbacks"][0]["init_args"]["lam"] == 30.0
    assert RECIPE["trainer"]["callbacks"][0]["init_args"]["lam"] == 10.0  # the recipe itself is not changed
    with pytest.raises(ValueError, match="exactly one AttributionPrior"):
        with_lam({"trainer": {"callbacks": []}}, 1.0)


def test_score_and_selection_rules():
    assert score_of({"report/val/no_bias/avg": 0.7, "val/no_bias/acc": 0.6}, "no_bias") == 0.7
    assert score_of({"val/no_bias/acc": 0.6}, "no_bias") == 0.6
    with pytest.raises(ValueError, match="inverse_bias"):
        score_of({"val/no_bias/acc": 0.6}, "inverse_bias")
    rows = [
        {"lam": 1.0, "seed": 0, "score": 0.6, "collapsed": False, "no_effect": True},
        {"lam": 10.0, "seed": 0, "score": 0.8, "collapsed": False, "no_effect": False},
        {"lam": 10.0, "seed": 1, "score": 0.7, "collapsed": False, "no_effect": False},
        {"lam": 3.0, "seed": 0, "score": 0.75, "collapsed": False, "no_effect": False},
        {"lam": 100.0, "seed": 0, "score": 0.9, "collapsed": True, "no_effect": False},  # collapsed: never picked
    ]
    assert select_lam(rows) == 3.0  # 0.75 mean of 10 over seeds ties 3: the smaller λ wins
    rows[3]["score"] = 0.74
    assert select_lam(rows) == 10.0
    table = format_sweep(rows, "no_bias", 10.0)
    assert "| 10.0 | 0.750 | 2 | 0 | 0 | selected |" in table and "| 100.0 | 0.900 | 1 | 1 | 0 |  |" in table


def test_sweep_command_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "sweep"
    summary = run_cli(["sweep", "--config", str(cfg), "--lam", "0.1,auto", "--out", str(out),
                       "--", "--trainer.limit_train_batches=2"])
    assert [r["lam"] for r in summary["rows"]] == [0.1, "auto"]
    assert all(0.0 <= r["score"] <= 1.0 for r in summary["rows"])
    assert summary["selected"] in (0.1, "auto")
    assert summary["rows"][1]["lam_used"] > 0  # the calibrated λ
    printed = capsys.readouterr().out
    assert "| λ | val no_bias" in printed and "selected" in printed
    selected = yaml.safe_load((out / "selected.yaml").read_text())
    assert selected["trainer"]["callbacks"][0]["init_args"]["lam"] == summary["selected"]
    assert json.loads((out / "sweep.json").read_text())["selected"] == summary["selected"]
    assert (out / "runs" / "lam0.1_seed0" / "config.yaml").is_file()
