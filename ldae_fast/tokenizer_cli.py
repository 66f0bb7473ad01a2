"""`ldae-fast fit-pca [--preset NAME] [--section.field=value ...] --out FILE.safetensors`."""

from __future__ import annotations

import sys
import time

from .config import parse_cli
from .errors import UsageError, run_cli
from .tokenizer import fit_pca


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, "ldae-fast fit-pca")


def _main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().split("\n")[0].strip("`") + "\n\nFits on `tokenizer.fit_images` images of the "
              "training stream of the config (preset + overrides); writes the basis and a .json summary.")
        return 0
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        if i + 1 >= len(argv):
            raise UsageError("--out needs a path")
        out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg, rest = parse_cli(argv)
    if rest:
        raise UsageError(f"unknown arguments: {' '.join(rest)} (see ldae-fast fit-pca --help)")
    out = out or f"{cfg.engine.out_dir}/tokenizer.safetensors"
    from .data import build_train_stream

    n = cfg.tokenizer.fit_images
    t0 = time.time()

    def progress(seen: int, total: int) -> None:
        print(f"\rfit-pca: {seen}/{total} images", end="", file=sys.stderr, flush=True)

    stream = build_train_stream(cfg)
    tok = fit_pca((x for x, _ in stream), cfg.model.patch_size, cfg.tokenizer.latent_dim, n, progress)
    print(file=sys.stderr)
    path = tok.save(out)
    ev = tok.explained_variance()
    print(f"saved {path} (patch {tok.patch_size}, D={tok.D}, d={tok.d}, {tok.num_patches_fitted} patches, "
          f"{time.time() - t0:.1f}s); variance explained by the first d components: {100 * float(ev[tok.d - 1]):.1f}%")
    return 0
