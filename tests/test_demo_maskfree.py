"""``negspace demo --masks discovered`` end to end on a tiny budget: discovery on the biased model, the concept
mask in the prior, IoU and insertion test in the table (the numbers of the real run are in docs/maskfree.md)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_tiny_discovered_demo_writes_masks_and_insertion(tmp_path):
    from negspace.demo import run_demo

    s = run_demo(quick=True, epochs=2, n_train=96, lambdas=[10.0], masks="discovered", progress=False,
                 out=str(tmp_path), n_val=32, n_test=32)
    assert "presence_absence_discovered" in s["by_setting"] and "presence_absence" not in s["by_setting"]
    quality = s["discovered"][0]
    assert 0.0 <= quality["iou"] <= 1.0 and quality["n_patched"] > 0
    assert "Discovered masks" in s["table"] and "Insertion test" in s["table"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["discovered"]["0"]) >= {"candidate", "iou", "false_positive_area"}
    assert all("insertion" in r for r in saved["runs"] if r["setting"] != "unbiased")
