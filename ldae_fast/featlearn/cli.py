"""`ldae-fast featlearn synthetic|noisy-mnist`: run the study, write metrics JSON, PNGs, table.md."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import time
from pathlib import Path

from ..errors import finite_float

# torch and the study's modules are imported inside the functions that run it: `--help` and
# usage errors answer before torch is imported.

# --quick keeps the diffusion "time" eta * iterations of the full run (8,000 x 2.5 = 40,000 x 0.5):
# the closed-form GD is a discretised gradient flow, and at this step size it stays stable and
# ends where the full run ends (checked; see docs/featlearn.md), in a fifth of the steps. A step
# of 5.0 also matches on the synthetic data but diverged on Noisy-MNIST at n SNR^2 = 27.
QUICK = {"diff_iters": 8000, "diff_lr": 2.5, "n_test": 1000, "n_test_per_class": 300, "records": 60}
FULL = {"diff_iters": 40_000, "diff_lr": 0.5, "n_test": 3000, "n_test_per_class": 500, "records": 200}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--diff-iters", type=int, default=None, help="diffusion GD iterations (40000; --quick: 8000)")
    g.add_argument("--diff-lr", type=finite_float, default=None, help="diffusion step size (0.5; --quick: 2.5)")
    g.add_argument("--t", type=finite_float, default=0.2, help="diffusion time: alpha=exp(-t), beta=sqrt(1-exp(-2t))")
    g.add_argument(
        "--n-eps", type=int, default=0,
        help="0 (default): exact expectation over the DDPM noise; N > 0: N sampled draws per step (slow)",
    )
    g.add_argument("--clf-iters", type=int, default=500, help="classifier GD iterations")
    g.add_argument("--clf-lr", type=finite_float, default=0.1, help="classifier step size")
    g.add_argument("--m", type=int, default=20, help="network width")
    g.add_argument("--sigma0", type=finite_float, default=1e-3, help="init std of the weights")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table averages them")
    g.add_argument("--records", type=int, default=None, help="metric records per run (200; --quick: 60)")
    g.add_argument("--quick", action="store_true", help="shortened run (see QUICK in cli.py)")
    g.add_argument("--out", type=Path, default=None, help="output dir (default runs/featlearn/<experiment>)")
    g.add_argument("--progress", type=int, default=10, help="progress lines per training run (0: none)")
    g.add_argument("--device", default="cpu", help="torch device (float64 throughout)")
    g.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (1 default: the matrices are tiny and extra threads only add contention)",
    )


def build_parser() -> argparse.ArgumentParser:
    from ..errors import ArgParser

    p = ArgParser(
        prog="ldae-fast featlearn",
        description='Feature learning in diffusion models vs classification (Han et al., ICLR 2025): '
        "two-layer networks on two-patch data; signal learning vs noise memorization.",
    )
    sub = p.add_subparsers(dest="experiment", required=True, metavar="{synthetic,noisy-mnist}")

    s = sub.add_parser("synthetic", help="x1 = mu_y, x2 ~ N(0, sigma_xi^2 I_d)")
    s.add_argument("--d", type=int, default=1000, help="patch dimension")
    s.add_argument("--n", type=int, default=30, help="training samples")
    s.add_argument("--sigma-xi", type=finite_float, default=1.0, help="noise-patch std")
    s.add_argument(
        "--mu-norms", type=finite_float, nargs="+", default=[5.0, 15.0],
        help="|mu| per regime (5 -> n SNR^2 = 0.75, 15 -> 6.75 at the defaults)",
    )
    s.add_argument("--n-test", type=int, default=None, help="fresh test samples (3000; --quick: 1000)")
    _common(s)

    m = sub.add_parser("noisy-mnist", help="x1 = scaled MNIST image, x2 ~ N(0, I_784)")
    m.add_argument("--data", type=Path, default=None, help="folder with t10k-images/labels-idx*-ubyte.gz")
    m.add_argument("--n-per-class", type=int, default=50, help="training images per digit")
    m.add_argument("--n-test-per-class", type=int, default=None, help="test images per digit (500; --quick: 300)")
    m.add_argument("--digits", type=int, nargs=2, default=[0, 1], help="digit for y=+1, digit for y=-1")
    m.add_argument("--n-snr2", type=finite_float, nargs="+", default=[0.75, 6.75], help="n SNR^2 per regime (sets the pixel scale)")
    m.add_argument("--sigma-xi", type=finite_float, default=1.0, help="noise-patch std")
    _common(m)
    return p


def _resolve(args: argparse.Namespace) -> None:
    import torch

    preset = QUICK if args.quick else FULL
    if args.diff_iters is None:
        args.diff_iters = preset["diff_iters"]
    if args.diff_lr is None:
        args.diff_lr = preset["diff_lr"]
    if args.records is None:
        args.records = preset["records"]
    if getattr(args, "n_test", "absent") is None:
        args.n_test = preset["n_test"]
    if getattr(args, "n_test_per_class", "absent") is None:
        args.n_test_per_class = preset["n_test_per_class"]
    if args.out is None:
        args.out = Path("runs") / "featlearn" / args.experiment
    if args.device != "cpu" and not torch.device(args.device).type == "cuda":
        raise ValueError(f"--device {args.device!r}: use cpu or cuda[:k]")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")


def _datasets(args: argparse.Namespace):
    """Yield (regime name, file tag, train, test, seed, extra info) for every regime and seed."""
    import torch

    from . import data as fdata

    if args.experiment == "synthetic":
        for mu in args.mu_norms:
            for seed in args.seeds:
                g = torch.Generator().manual_seed(seed)
                train = fdata.synthetic(args.n, args.d, mu, args.sigma_xi, generator=g)
                test = fdata.synthetic(args.n_test, args.d, mu, args.sigma_xi, generator=g)
                yield f"|mu|={mu:g}", f"mu{mu:g}", train, test, seed, {"mu_norm": mu}
    else:
        mnist = fdata.load_mnist(args.data)
        for target in args.n_snr2:
            for seed in args.seeds:
                g = torch.Generator().manual_seed(seed)
                split = fdata.noisy_mnist(
                    target, args.n_per_class, args.n_test_per_class, tuple(args.digits),
                    sigma_xi=args.sigma_xi, generator=g, mnist=mnist,
                )
                # The pixel scale differs a little per seed (other images); it is kept per run, and the
                # regime is named by the target alone so the table averages seeds together.
                extra = {"pixel_scale": split.scale, "digits": list(args.digits)}
                yield f"n SNR^2={target:g}", f"nsnr2_{target:g}", split.train, split.test, seed, extra


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "W"}


def run(args: argparse.Namespace, log=print) -> dict:
    import torch

    _resolve(args)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, log)
    finally:
        torch.set_num_threads(old_threads)


def _run(args: argparse.Namespace, log) -> dict:
    import torch

    from . import report
    from .train import ClassifierConfig, DiffusionConfig, train_classifier, train_diffusion

    dcfg = DiffusionConfig(
        iters=args.diff_iters, lr=args.diff_lr, t=args.t, m=args.m, sigma0=args.sigma0,
        n_eps=args.n_eps, n_records=args.records,
    )
    ccfg = ClassifierConfig(iters=args.clf_iters, lr=args.clf_lr, m=args.m, sigma0=args.sigma0, n_records=args.records)
    dcfg.check()
    ccfg.check()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    t_start = time.perf_counter()
    for regime, tag, train, test, seed, extra in _datasets(args):
        train, test = train.to(args.device), test.to(args.device)
        log(f"[{args.experiment}] {regime}  n={train.n} d={train.d}  n SNR^2={train.n_snr2:.4g}  seed={seed}")
        every_d = max(1, dcfg.iters // args.progress) if args.progress else 0
        every_c = max(1, ccfg.iters // args.progress) if args.progress else 0
        # Separate init streams, so changing one model's settings leaves the other's init alone.
        diff = train_diffusion(train, dcfg, torch.Generator().manual_seed(10_000 + seed), log, every_d)
        clf = train_classifier(train, test, ccfg, torch.Generator().manual_seed(20_000 + seed), log, every_c)
        log(
            f"  done: diffusion ratio {diff['final']['ratio']:.4g} ({diff['seconds']:.1f}s), "
            f"classifier ratio {clf['final']['ratio']:.4g}, test acc {clf['final']['test_acc']:.4f} "
            f"({clf['seconds']:.1f}s)"
        )
        if diff.get("loss_increases"):
            log(
                f"  WARNING: the diffusion loss rose between records {diff['loss_increases']} times: "
                f"--diff-lr {dcfg.lr} is past the stability edge here; lower it (and raise --diff-iters)"
            )
        entry = {
            "regime": regime, "seed": seed, "n": train.n, "d": train.d, "snr": train.snr,
            "n_snr2": train.n_snr2, **extra, "diffusion": _strip(diff), "classifier": _strip(clf),
        }
        runs.append(entry)
        report.regime_figure(out / f"{tag}_seed{seed}.png", entry)
        # Rewritten after every run, so a long sweep that stops early keeps what it finished.
        table = _write_outputs(args, out, runs, time.perf_counter() - t_start)
    log("")
    log(table)
    log(f"\nwrote {out}/metrics.json, table.md and PNGs ({time.perf_counter() - t_start:.0f}s)")
    return {"runs": runs, "table": table}


def _write_outputs(args: argparse.Namespace, out: Path, runs: list[dict], seconds: float) -> str:
    import torch

    from . import report

    rows = report.summary_rows(runs)
    table = report.markdown_table(rows)
    unstable = [f"{r['regime']} seed {r['seed']}" for r in runs if r["diffusion"].get("loss_increases")]
    if unstable:
        table += (
            "\n\nWARNING: diffusion GD was not monotone (step too large) in: " + "; ".join(unstable)
        )
    report.ratio_figure(out / "ratio.png", runs)
    meta = {
        "experiment": args.experiment,
        "command": "ldae-fast featlearn " + " ".join(shlex.quote(a) for a in args.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "seconds": seconds,
    }
    (out / "metrics.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    (out / "table.md").write_text(f"Command: `{meta['command']}`\n\n{table}\n")
    return table


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_cli

    return run_cli(_main, argv, "ldae-fast featlearn")


def _main(argv: list[str]) -> int:
    from ..errors import UsageError

    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        run(args, log=lambda s: print(s, flush=True))
    except (ValueError, FloatingPointError) as e:
        raise UsageError(str(e)) from e
    return 0
