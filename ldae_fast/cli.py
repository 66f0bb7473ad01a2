"""`ldae-fast COMMAND ...` (or `python -m ldae_fast COMMAND ...`): one entry point for every tool of
the project. `--help`, `--version`, a command's `--help` and usage errors answer before torch is
imported (each command imports its heavy modules after parsing its arguments)."""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help). Imported lazily: `ldae-fast featlearn` must not
# pay for DeepSpeed, and a missing optional dependency only breaks the command that needs it.
COMMANDS = {
    "train": ("ldae_fast.train", "main", "pretrain (same as python train.py)"),
    "fit-pca": ("ldae_fast.tokenizer_cli", "main", "fit the patch-wise PCA tokenizer and save it"),
    "fit-tokenizer": ("ldae_fast.tokenizer_cli", "main_tokenizer", "fit a tokenizer (pca, patch-ae, patch-vae, conv-vae)"),
    "make-shards": ("ldae_fast.data.shards", "main", "turn an ImageFolder tree into WebDataset shards"),
    "write-video-shards": ("ldae_fast.data.video_cli", "main", "turn folders of frame folders into clip shards"),
    "eval": ("ldae_fast.eval.driver", "main", "linear probe / kNN / fine-tune / figure of a checkpoint"),
    "export": ("ldae_fast.eval.export", "main", "write the encoder as timm-named safetensors"),
    "featlearn": ("ldae_fast.featlearn.cli", "main", "the two-layer feature-learning study"),
    "ablate": ("ldae_fast.eval.ablate", "main", "the l-DAE trajectory rows: pretrain, probe, kNN, one table"),
}


def usage() -> str:
    lines = ["usage: ldae-fast [--version] [--debug] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines.append("\n`ldae-fast COMMAND --help` for a command's options.")
    return "\n".join(lines)


def version_line() -> str:
    from . import __version__

    return f"ldae-fast {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--debug"]:  # `ldae-fast --debug CMD ...`: the command's wrapper reads it
        argv = [*argv[1:], "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"ldae-fast: usage error: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)} "
              "(see ldae-fast --help)", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    rc = getattr(importlib.import_module(module), func)(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
