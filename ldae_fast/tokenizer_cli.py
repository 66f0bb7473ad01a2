"""`ldae-fast fit-tokenizer --kind pca|patch-ae|patch-vae|conv-vae [--preset NAME]
[--section.field=value ...] [--out FILE.safetensors]`; `ldae-fast fit-pca` is `--kind pca`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import methods  # noqa: F401 (registers the methods' config sections, names and presets)
from .config import parse_cli
from .errors import UsageError, run_cli
from .tokenizer_kinds import FIT_KINDS  # noqa: E402 - torch-free, so --help answers at once


def default_out(cfg) -> str:
    """Where a fit goes without --out: beside, not over, the tokenizer a training run saves in
    its run directory, and named by what it depends on so two fits do not overwrite each other."""
    return (f"runs/fit-{cfg.tokenizer.kind}/{cfg.preset}-p{cfg.model.patch_size}-d{cfg.tokenizer.latent_dim}"
            f"-n{cfg.tokenizer.fit_images}.safetensors")


def _take(argv: list[str], flag: str, what: str) -> tuple[str | None, list[str]]:
    """Remove `FLAG VALUE` / `FLAG=VALUE` (this command's own flags, not config fields)."""
    val, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError(f"{flag} needs {what}")
            val, i = argv[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            val = a.partition("=")[2]
            if not val:
                raise UsageError(f"{flag} needs {what}")
        else:
            rest.append(a)
        i += 1
    return val, rest


def _take_out(argv: list[str]) -> tuple[str | None, list[str]]:
    return _take(argv, "--out", "a file path")


def main(argv: list[str] | None = None) -> int:
    """`ldae-fast fit-pca`: fit-tokenizer whose --kind defaults to pca."""
    return run_cli(lambda a: _main(a, "fit-pca"), argv, "ldae-fast fit-pca")


def main_tokenizer(argv: list[str] | None = None) -> int:
    """`ldae-fast fit-tokenizer` (without --kind: the config's tokenizer.kind)."""
    return run_cli(lambda a: _main(a, "fit-tokenizer"), argv, "ldae-fast fit-tokenizer")


def _usage(cmd: str) -> str:
    kind = "[--kind pca]" if cmd == "fit-pca" else f"--kind {'|'.join(FIT_KINDS)}"
    return (f"usage: ldae-fast {cmd} {kind} [--preset NAME] [--section.field=value ...] [--out FILE.safetensors]\n\n"
            "Fits a tokenizer (l-DAE Table 2) on tokenizer.fit_images images of the config's training\n"
            "stream (preset + overrides) and writes it to FILE and a summary to FILE's name with .json.\n"
            "pca: patch-wise PCA; patch-ae / patch-vae: linear d x D encoder and decoder fitted by Adam\n"
            "(tokenizer.fit_steps, fit_lr, fit_batch, fit_patches; the VAE's KL weight tokenizer.beta);\n"
            "conv-vae: a stride-8 convolutional KL-VAE (tokenizer.conv_steps, conv_lr, conv_batch,\n"
            "conv_width, beta, adversarial, adv_weight; model.patch_size a multiple of 8). --kind X is\n"
            "--tokenizer.kind=X. --out FILE and --out=FILE are the same; without --out the file is\n"
            "runs/fit-KIND/PRESET-pP-dD-nN.safetensors. Train with it: --tokenizer.path=FILE (any kind).\n"
            "Config fields: `python train.py --help`.")


def _main(argv: list[str], cmd: str) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(_usage(cmd))
        return 0
    out, argv = _take_out(argv)
    kind, argv = _take(argv, "--kind", "a tokenizer kind")
    if kind is None and cmd == "fit-pca":
        kind = "pca"
    if kind is not None:
        if kind not in FIT_KINDS:
            raise UsageError(f"--kind {kind!r} is not a tokenizer that is fitted; choose one of {', '.join(FIT_KINDS)}")
        argv = [*argv, f"--tokenizer.kind={kind}"]
    cfg, rest = parse_cli(argv)
    if rest:
        raise UsageError(f"unknown arguments: {' '.join(rest)} (see ldae-fast {cmd} --help)")
    if cfg.tokenizer.kind not in FIT_KINDS:
        raise UsageError(f"tokenizer.kind={cfg.tokenizer.kind!r} has nothing to fit; pass --kind "
                         f"{'|'.join(FIT_KINDS)}")
    if cfg.tokenizer.path:
        raise UsageError(f"tokenizer.path={cfg.tokenizer.path} names a tokenizer to load; {cmd} fits one "
                         "(drop --tokenizer.path, give the file to write as --out)")
    out = out or default_out(cfg)
    if Path(out).is_dir():
        raise UsageError(f"--out {out} is a directory; give the .safetensors file to write")
    from .data import build_train_stream
    from .tokenizers import fit_config, fit_pca

    if cfg.tokenizer.kind != "pca":
        return _fit_learned(cfg, out, build_train_stream)

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


def _fit_learned(cfg, out: str, build_train_stream) -> int:
    from .tokenizers import TOKENIZERS, fit_config

    t0 = time.time()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tok = TOKENIZERS[cfg.tokenizer.kind].prepare(cfg, lambda: (x for x, _ in build_train_stream(fit_config(cfg))), log)
    path = tok.save(out)
    fit = tok.metadata().get("fit", {})
    kl = f", KL {fit['kl']:.4g}" if "kl" in fit else ""
    print(f"saved {path} and {path.with_suffix('.json')} ({tok.kind}, patch {tok.patch_size}, d={tok.d}, "
          f"{time.time() - t0:.1f}s); reconstruction MSE {fit.get('recon_mse', float('nan')):.4g} per pixel{kl}")
    return 0
