"""Loss baselines: the first 50 per-step losses of two small runs, checked in, matched to the bit.

A refactor of the method, the tokenizer, the data hand-off or the engine that changes nothing must
reproduce these curves exactly (torchtitan's loss-baseline check). The runs are rebuilt with
`Config.from_dict` from the stored, fully resolved config, not from a preset name, so a preset that
changes later does not move the baseline; fields added to the config later take their defaults,
which keep today's behaviour.

Bit equality holds because both runs are on CPU with one intra-op thread (conftest.py sets it;
the writer below does too): every reduction then runs in a fixed order. A change that is meant to
alter the draws (a new seed derivation, another noise stream) rewrites the assets in the same
commit and says why:

    .venv/bin/python tests/test_loss_baseline.py --write
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"
SHARED_DATA = ROOT.parent / "shared" / "data"
STEPS = 50
# Data paths are stored as the presets write them (relative to the project root) and resolved
# against this checkout when the run is rebuilt.
REL_DATA = "../shared/data"

# Small enough for well under 30 s each on one CPU thread; everything else is the preset's.
_COMMON = {"engine.steps": str(STEPS), "engine.log_every": "1", "engine.progress": "false",
           "engine.kernels": "reference", "engine.device": "cpu", "engine.ckpt_every": "0",
           "eval.probe": "false", "eval.figure": "false"}
RUNS = {
    "demo": ("demo", {**_COMMON, "data.batch_size": "16", "tokenizer.fit_images": "256"}),
    "tiny-imagenet": ("tiny-imagenet", {
        **_COMMON, "model.size": "tiny", "data.img_size": "32", "model.patch_size": "4",
        "tokenizer.latent_dim": "16", "data.batch_size": "8", "tokenizer.fit_images": "64",
        "data.num_workers": "0", "data.shuffle_buffer": "64", "data.epoch_size": "2000",
        "optim.warmup_epochs": "0.1"}),
}


def _asset(name: str) -> Path:
    return ASSETS / f"loss_baseline_{name}.json"


def _localize(d: dict, out_dir: Path) -> dict:
    d = json.loads(json.dumps(d))
    d["engine"]["out_dir"] = str(out_dir)
    for k in ("train_shards", "val_shards"):
        if d["data"].get(k, "").startswith(REL_DATA):
            d["data"][k] = str(SHARED_DATA) + d["data"][k][len(REL_DATA):]
    return d


def _first_batch_digest(cfg) -> str:
    """sha256 of the first training batch (images and labels): tells a data change from a method
    change when a curve moves."""
    from ldae_fast.data import build_train_stream

    images, labels = next(iter(build_train_stream(cfg, rank=0, world_size=1)))
    h = hashlib.sha256(images.float().contiguous().numpy().tobytes())
    h.update(torch.as_tensor(labels).long().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(cfg_dict: dict, out_dir: Path) -> tuple[list[float], str]:
    from ldae_fast.config import Config
    from ldae_fast.engine.loop import train

    cfg = Config.from_dict(_localize(cfg_dict, out_dir))
    digest = _first_batch_digest(cfg)
    res = train(cfg, log_enabled=False)
    assert [s for s, _ in res.losses] == list(range(1, STEPS + 1))
    return [v for _, v in res.losses], digest


def _needs_data(name: str) -> None:
    if name == "tiny-imagenet" and not (SHARED_DATA / "tinyimagenet-wds" / "train-000000.tar.gz").exists():
        msg = f"real data missing: {SHARED_DATA / 'tinyimagenet-wds'} (see ../shared/data/README.md)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.parametrize("name", list(RUNS))
def test_loss_baseline(name, tmp_path):
    _needs_data(name)
    stored = json.loads(_asset(name).read_text())
    assert torch.get_num_threads() == 1, "the baseline is bit-exact only with one intra-op thread"
    losses, digest = run(stored["config"], tmp_path / "run")
    assert digest == stored["first_batch_sha256"], "the first training batch changed (data, not the method)"
    want = stored["losses"]
    diff = [(i + 1, a, b) for i, (a, b) in enumerate(zip(losses, want)) if a != b]
    assert not diff, f"{len(diff)} of {STEPS} losses differ; first (step, now, baseline): {diff[:3]}"


def write_assets() -> None:
    import tempfile

    from ldae_fast.config import build_config

    torch.set_num_threads(1)
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, (preset, over) in RUNS.items():
        cfg = build_config(preset, {**over, "engine.out_dir": "runs/loss-baseline"})
        with tempfile.TemporaryDirectory() as tmp:
            losses, digest = run(cfg.to_dict(), Path(tmp) / "run")
        rec = {"what": f"first {STEPS} per-step losses of the {preset!r} preset, shrunk (tests/test_loss_baseline.py)",
               "torch": torch.__version__, "config": cfg.to_dict(), "first_batch_sha256": digest,
               "losses": losses}
        _asset(name).write_text(json.dumps(rec, indent=1) + "\n")
        print(f"wrote {_asset(name)}: loss {losses[0]:.6f} -> {losses[-1]:.6f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as conftest.py, so the kernels' module state matches
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    write_assets()
