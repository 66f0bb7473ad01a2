"""`ldae-fast write-video-shards SRC OUT_PATTERN [--maxcount N] [--gzip] [--seed S]`: the command
line of data/video.py's clip shard writer, kept apart so that `--help` and usage errors answer
before torch is imported."""

from __future__ import annotations

import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """`ldae-fast write-video-shards SRC OUT_PATTERN [--maxcount N] [--gzip] [--seed S]`."""
    from ..errors import run_cli

    return run_cli(_main, argv, "ldae-fast write-video-shards")


def _main(argv: list[str]) -> int:
    from ..errors import ArgParser, UsageError

    ap = ArgParser(prog="ldae-fast write-video-shards",
                   description="Write WebDataset clip shards (KEY.frames.npy uint8 (T, H, W, 3) [+ KEY.cls]) "
                               "from SRC/<clip>/<frames> or SRC/<class>/<clip>/<frames>.")
    ap.add_argument("src", help="root folder of frame folders")
    ap.add_argument("out_pattern", help="shard names with a %%d field, e.g. shards/clips-%%06d.tar")
    ap.add_argument("--maxcount", type=int, default=200, help="clips per shard")
    ap.add_argument("--gzip", action="store_true", help="gzip the shards (.tar.gz)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (-1: keep sorted order)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    from .video import write_video_shards  # imports torch: after the arguments are parsed

    try:
        paths = write_video_shards(args.src, args.out_pattern, max_count=args.maxcount,
                                   seed=None if args.seed < 0 else args.seed, gzip=args.gzip)
    except ValueError as e:  # a bad flag value; a missing source stays a file error (exit 4)
        raise UsageError(str(e)) from e
    print(f"write-video-shards: wrote {len(paths)} shard(s) in {time.time() - t0:.1f}s: "
          f"{paths[0] if paths else ''} ...", file=sys.stderr)
    return 0
