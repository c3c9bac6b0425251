"""``negspace sweep``: the λ sweep of an attribution-prior recipe as Lightning runs, selected on a validation split.

``negspace sweep --config recipes/lesions_presence_absence.yaml --lam 1,3,10,30,100 [--seeds 0,1] [--select no_bias]``

For every λ and seed, the recipe's ``AttributionPrior`` gets ``lam=λ`` (and ``seed_everything`` the seed), the
run is an ordinary ``negspace fit`` (LightningCLI, the recipe's own trainer settings) followed by one validation
pass. The score of a run is its validation accuracy on the selected split: ``report/val/<split>/avg`` (class-mean
accuracy, logged by ``BiasedSplitReport``) when present, else ``val/<split>/acc`` (``ClassifierModule``). The λ
with the best mean score over seeds wins (ties: the smaller λ); a run whose prior flagged a collapse
(``<name>/collapsed``) is marked and never selected while another run is not collapsed. The table is printed and
written to ``<out>/sweep.md`` / ``sweep.json``, and the recipe with the selected λ to ``<out>/selected.yaml``.

Several devices: the sweep points run **sequentially**, each as one DDP job under the recipe's trainer settings
(``--trainer.devices 4`` applies to every run); every rank runs the same loop, rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["format_sweep", "parse_list", "run_sweep", "score_of", "select_lam", "sweep_parser", "with_lam"]


def sweep_parser() -> argparse.ArgumentParser:
    """Arguments of ``negspace sweep``; anything after ``--`` goes to every ``negspace fit`` run."""
    p = argparse.ArgumentParser(prog="negspace sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a recipe with one AttributionPrior callback")
    p.add_argument("--lam", required=True, help="comma-separated prior strengths, e.g. 1,3,10,30,100 (or auto)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0); scores are averaged over seeds")
    p.add_argument("--select", default="no_bias", help="validation split to select on (default no_bias)")
    p.add_argument("--out", default="negspace_sweep", help="output directory (runs, sweep.md/json, selected.yaml)")
    p.add_argument("--prior", default=None, help="name= of the AttributionPrior to sweep when there are several")
    return p


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``negspace sweep ...``: parse, run, return the summary (``--`` separates extra ``fit`` arguments)."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = sweep_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    return run_sweep(args.config, parse_list(args.lam, "lam"), seeds=parse_list(args.seeds, "seeds", int),
                     select=args.select, out=args.out, prior=args.prior, cli_args=extra)


def parse_list(text: str, what: str, cast: type = float) -> list[Any]:
    """``"1,3,10"`` → ``[1.0, 3.0, 10.0]`` (``"auto"`` kept as a string for ``lam``)."""
    out: list[Any] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part == "auto" and what == "lam":
            out.append("auto")
            continue
        try:
            v = cast(part)
        except ValueError:
            raise ValueError(f"--{what} must be a comma-separated list of numbers, got {text!r}") from None
        if cast is float and (not math.isfinite(v) or v < 0):
            raise ValueError(f"--{what} values must be finite and >= 0, got {part!r}")
        out.append(v)
    if not out:
        raise ValueError(f"--{what} must name at least one value, got {text!r}")
    return out


def with_lam(tree: dict[str, Any], lam: float | str, prior: str | None = None) -> dict[str, Any]:
    """A copy of the recipe ``tree`` whose ``AttributionPrior`` (or the one with ``name=prior``) has ``lam``."""
    tree = copy.deepcopy(tree)
    cbs = ((tree.get("trainer") or {}).get("callbacks")) or []
    hits = [c for c in cbs if isinstance(c, dict) and str(c.get("class_path", "")).endswith("AttributionPrior")
            and (prior is None or (c.get("init_args") or {}).get("name", "attribution_prior") == prior)]
    if len(hits) != 1:
        raise ValueError(f"the recipe must have exactly one AttributionPrior callback{f' named {prior!r}' if prior else ''} "
                         f"under trainer.callbacks to sweep lam, found {len(hits)}; pass --prior NAME to pick one")
    hits[0].setdefault("init_args", {})["lam"] = lam
    return tree


def score_of(metrics: dict[str, float], select: str) -> float:
    """The selection score of one run: ``report/val/<select>/avg`` or ``val/<select>/acc``."""
    for key in (f"report/val/{select}/avg", f"val/{select}/acc"):
        if key in metrics:
            return float(metrics[key])
    splits = sorted({k.split("/")[-2] for k in metrics if k.startswith(("val/", "report/val/")) and k.count("/") >= 2})
    raise ValueError(f"select={select!r}: no validation metric report/val/{select}/avg or val/{select}/acc; "
                     f"validation splits logged: {splits}")


def select_lam(rows: list[dict[str, Any]]) -> Any:
    """The λ with the best mean score over seeds, preferring runs without a collapse; ties → smaller λ."""
    by: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["lam"], []).append(r)

    def key(lam: Any) -> tuple[int, float, float]:
        rs = by[lam]
        ok = int(not any(r["collapsed"] for r in rs))
        return ok, sum(r["score"] for r in rs) / len(rs), -(0.0 if lam == "auto" else float(lam))

    return max(by, key=key)


def _fit_one(tree: dict[str, Any], run_dir: Path, cli_args: Sequence[str]) -> dict[str, float]:
    from negspace.lightning_cli import run_recipe

    run_dir.mkdir(parents=True, exist_ok=True)
    tree.setdefault("trainer", {}).setdefault("default_root_dir", str(run_dir))
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    cli = run_recipe(["fit", "--config", str(path), *cli_args])
    trained = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if getattr(v, 'numel', lambda: 1)() == 1}
    return {**trained, **val}


def run_sweep(
    config: str | os.PathLike[str],
    lams: Sequence[float | str],
    *,
    seeds: Sequence[int] = (0,),
    select: str = "no_bias",
    out: str | os.PathLike[str] = "negspace_sweep",
    prior: str | None = None,
    cli_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the sweep (see the module docstring); returns ``{"rows", "selected", "config"}``."""
    tree = yaml.safe_load(Path(config).read_text())
    if not isinstance(tree, dict):
        raise ValueError(f"config must be a LightningCLI YAML mapping, got {type(tree).__name__} from {config}")
    with_lam(tree, lams[0], prior)  # fail before the first run
    out_dir = Path(out)
    rows: list[dict[str, Any]] = []
    for lam in lams:
        for seed in seeds:
            run = with_lam(tree, lam, prior)
            run["seed_everything"] = int(seed)
            metrics = _fit_one(run, out_dir / "runs" / f"lam{lam}_seed{seed}", cli_args)
            collapsed = any(k.endswith("/collapsed") and v >= 0.5 for k, v in metrics.items())
            no_effect = any(k.endswith("/no_effect") and v >= 0.5 for k, v in metrics.items())
            rows.append({"lam": lam, "seed": int(seed), "score": score_of(metrics, select),
                         "collapsed": collapsed, "no_effect": no_effect,
                         "lam_used": next((v for k, v in metrics.items() if k.endswith("/lam")), None)})
    best = select_lam(rows)
    selected = with_lam(tree, best, prior)
    table = format_sweep(rows, select, best)
    print(table)
    from negspace.distributed import rank_world

    if rank_world()[0] == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "selected.yaml").write_text(yaml.safe_dump(selected, sort_keys=False))
        (out_dir / "sweep.md").write_text(table + "\n")
        (out_dir / "sweep.json").write_text(json.dumps({"select": select, "selected": best, "rows": rows}, indent=1))
    return {"rows": rows, "selected": best, "config": selected}


def format_sweep(rows: list[dict[str, Any]], select: str, best: Any) -> str:
    """Markdown table: one line per λ (mean score over seeds, flags), the selected λ marked."""
    lines = [f"| λ | val {select} (mean over seeds) | seeds | collapsed | no effect | |", "|---|---|---|---|---|---|"]
    for lam in dict.fromkeys(r["lam"] for r in rows):
        rs = [r for r in rows if r["lam"] == lam]
        mean = sum(r["score"] for r in rs) / len(rs)
        lines.append(f"| {lam} | {mean:.3f} | {len(rs)} | {sum(r['collapsed'] for r in rs)} | "
                     f"{sum(r['no_effect'] for r in rs)} | {'selected' if lam == best else ''} |")
    return "\n".join(lines)
