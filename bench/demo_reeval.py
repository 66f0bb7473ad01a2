#!/usr/bin/env python
"""Recompute a finished demo run's `results.json` without pretraining again: the demo epilogue's
evaluation (ldae_fast.train.finish_demo, without the figure) of the run's last checkpoint, the
EMA weights when the run kept them, as the run itself evaluated them.

    python bench/demo_reeval.py runs/demo-s0 --out docs/data/demo/demo-s0.json

The run's own results.json supplies the seed, command line and pretraining numbers, copied
unchanged; `evaluation` is measured anew (a number the epilogue gained since, such as the whitened
kNN, is then filled in), `reevaluated` says when and how. RUN_DIR is only read.
bench/seed_table.py assembles the output files as it does results.json files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def reevaluate(run_dir: Path, log=print) -> dict:
    """The run's results.json with `evaluation` recomputed from its last checkpoint."""
    from ldae_fast.engine.checkpoint import load_state, resolve_resume
    from ldae_fast.errors import CheckpointError, FileProblem
    from ldae_fast.eval.reader import load_for_eval
    from ldae_fast.train import RESULTS_FILE, finish_demo

    try:
        rec = json.loads((run_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise FileProblem(f"{run_dir}: no readable {RESULTS_FILE} ({e})") from None
    ckpt = resolve_resume(str(run_dir), run_dir, flag="RUN_DIR")
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
    cfg, model, method = load_for_eval(ckpt, flag="RUN_DIR")
    if method is None:
        raise CheckpointError(f"{ckpt}: no method state (an exported encoder is not a demo run)")
    # The figure would be written into the run's folder: this leaves it untouched.
    cfg = cfg.replace(eval=dataclasses.replace(cfg.eval, figure=False, probe=True))
    had_ema = bool(load_state(ckpt).get("ema"))
    # finish_demo copies the EMA weights when there are any, else the trained ones: `model` holds
    # whichever the run's own epilogue used.
    result = SimpleNamespace(model=model, ema=model if had_ema else None, method=method)
    ev = finish_demo(cfg, result, log=log)
    if not ev:
        raise FileProblem(f"{run_dir}: the evaluation found no labelled images")
    from datetime import datetime, timezone

    import torch

    rec["reevaluated"] = {"checkpoint": str(ckpt), "by": "bench/demo_reeval.py", "torch": torch.__version__,
                          "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "original_evaluation": rec.get("evaluation")}
    rec["evaluation"] = ev
    return rec


def main(argv: list[str] | None = None) -> int:
    """User errors end as one stderr line and their exit code (README "Exit codes")."""
    from ldae_fast.errors import run_cli

    return run_cli(_main, argv, "demo_reeval.py")


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a demo run's engine.out_dir (holds results.json, checkpoints/)")
    ap.add_argument("--out", type=Path, required=True, help="where the new results file goes")
    args = ap.parse_args(argv)
    rec = reevaluate(args.run_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1, sort_keys=True, default=str))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
