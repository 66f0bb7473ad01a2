"""The `main` of an eval command (`ldae-fast eval`, `ldae-fast ablate`): parse, run, and end a user
error as one line with its exit code (errors.run_cli)."""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from ldae_fast.errors import run_cli


def command_main(argv: Optional[list[str]], name: str, build_parser: Callable[[], argparse.ArgumentParser],
                 run: Callable[[argparse.Namespace], object]) -> int:
    """Run `ldae-fast NAME` on `argv` (sys.argv when None; a leading NAME is dropped, so
    `python -m` the module with or without it works); `run` gets the parsed arguments with
    `args.argv`, the words it was given (the outputs record the command)."""

    def body(words: list[str]) -> int:
        if words[:1] == [name]:
            words = words[1:]
        args = build_parser().parse_args(words)
        args.argv = words
        run(args)
        return 0

    return run_cli(body, argv, f"ldae-fast {name}")


__all__ = ["command_main"]
