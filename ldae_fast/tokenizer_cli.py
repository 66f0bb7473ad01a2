"""`ldae-fast fit-pca [--preset NAME] [--section.field=value ...] [--out FILE.safetensors]`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import parse_cli
from .errors import UsageError, run_cli
from .tokenizers import fit_config, fit_pca


def default_out(cfg) -> str:
    """Where a fit goes without --out: beside, not over, the tokenizer a training run saves in
    its run directory, and named by what it depends on so two fits do not overwrite each other."""
    return (f"runs/fit-pca/{cfg.preset}-p{cfg.model.patch_size}-d{cfg.tokenizer.latent_dim}"
            f"-n{cfg.tokenizer.fit_images}.safetensors")


def _take_out(argv: list[str]) -> tuple[str | None, list[str]]:
    """Remove `--out FILE` / `--out=FILE` (this command's own flag: a file, not a run directory)."""
    out, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--out":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError("--out needs a file path")
            out, i = argv[i + 1], i + 2
            continue
        if a.startswith("--out="):
            out = a.partition("=")[2]
            if not out:
                raise UsageError("--out needs a file path")
        else:
            rest.append(a)
        i += 1
    return out, rest


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, "ldae-fast fit-pca")


def _main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print("usage: ldae-fast fit-pca [--preset NAME] [--section.field=value ...] [--out FILE.safetensors]\n\n"
              "Fits the patch-wise PCA on tokenizer.fit_images images of the config's training stream\n"
              "(preset + overrides) and writes the basis to FILE and a summary to FILE's name with .json.\n"
              "--out FILE and --out=FILE are the same; without --out the file is\n"
              "runs/fit-pca/PRESET-pP-dD-nN.safetensors. Train with it: --tokenizer.path=FILE.\n"
              "Config fields: `python train.py --help`.")
        return 0
    out, argv = _take_out(argv)
    cfg, rest = parse_cli(argv)
    if rest:
        raise UsageError(f"unknown arguments: {' '.join(rest)} (see ldae-fast fit-pca --help)")
    out = out or default_out(cfg)
    if Path(out).is_dir():
        raise UsageError(f"--out {out} is a directory; give the .safetensors file to write")
    from .data import build_train_stream

    n = cfg.tokenizer.fit_images
    t0 = time.time()
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(seen: int, total: int) -> None:
        now = time.time()
        if seen < total and now - last[0] < (0.5 if tty else 10.0):
            return
        last[0] = now
        msg = f"fit-pca: {seen}/{total} images, {now - t0:.0f}s"
        print(("\r" + msg) if tty else msg, end="" if tty else "\n", file=sys.stderr, flush=True)

    stream = build_train_stream(fit_config(cfg))
    tok = fit_pca((x for x, _ in stream), cfg.model.patch_size, cfg.tokenizer.latent_dim, n, progress)
    if tty:
        print(file=sys.stderr)
    path = tok.save(out)
    ev = tok.explained_variance()
    print(f"saved {path} and {path.with_suffix('.json')} (patch {tok.patch_size}, D={tok.D}, d={tok.d}, "
          f"{tok.num_patches_fitted} patches, {time.time() - t0:.1f}s); variance explained by the first d "
          f"components: {100 * float(ev[tok.d - 1]):.1f}%")
    return 0
