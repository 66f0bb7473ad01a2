import os
import sys
from pathlib import Path

# Kernels run in the Triton interpreter on CPU-only machines. This must be set before triton is
# imported anywhere; `LDAE_GPU_TESTS=1` (make test-gpu) runs them compiled on a GPU instead.
if os.environ.get("LDAE_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DeepSpeed's CPU ranks compile a C++ all-reduce extension on first use (minutes on a loaded
# 2-core machine). torch keeps one build directory per user, and two checkouts of this project
# (their venv paths are in the build flags) rebuild it for each other in turn, each waiting on the
# other's lock: one directory per checkout and interpreter, inherited by every launched rank.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    import hashlib

    _key = hashlib.sha256(f"{Path(__file__).resolve().parent.parent}|{sys.executable}".encode()).hexdigest()[:12]
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "ldae-fast" / "torch_extensions" / _key)

import pytest  # noqa: E402
import torch  # noqa: E402

# Test tensors are tiny: a second intra-op thread only adds OpenMP hand-offs (seen 5-20x slower
# on a loaded 2-core machine), and one thread keeps reductions bit-reproducible across runs.
torch.set_num_threads(int(os.environ.get("LDAE_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Tests build configs from ldae_fast.config directly: the methods register their sections, names
# and presets with the config mechanism on import, as every command line's import does.
import ldae_fast.methods  # noqa: E402,F401

SHARED_DATA = ROOT.parent / "shared" / "data"


def devices() -> list[str]:
    import torch

    devs = ["cpu"]
    if os.environ.get("LDAE_GPU_TESTS") == "1" and torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.fixture(params=devices())
def device(request):
    return request.param


@pytest.fixture(params=devices())
def kernel_device(request):
    """Like `device`, skipped where this process cannot run the Triton kernels: under
    LDAE_GPU_TESTS=1 they are compiled for the GPU, so the CPU leg has nothing to run."""
    from ldae_fast.kernels import triton_available

    device = request.param
    if not triton_available(device):
        pytest.skip(f"the Triton kernels cannot run on {device} in this process "
                    f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})")
    return device


def shared_data(rel: str, probe: str) -> Path:
    """``../shared/data/<rel>``, or skip when it is absent: a fresh clone has no shared data and
    the rest of the suite needs none. Under CI=true a missing directory fails instead, so a CI
    machine that lost its data cannot pass by skipping the tests that read real files."""
    d = SHARED_DATA / rel
    if not (d / probe).exists():
        msg = f"real test data missing: {d / probe} (see ../shared/data/README.md)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return d


@pytest.fixture
def tinyimagenet_dir() -> Path:
    return shared_data("tinyimagenet-wds", "train-000000.tar.gz")


@pytest.fixture
def mnist_dir() -> Path:
    return shared_data("mnist", "t10k-images-idx3-ubyte.gz")


# The l-DAE demo at its smallest: a one-block encoder and decoder of width 32 on 16 px synthetic
# images, the reference kernels, no probe or figure. Test files that train it import these
# (`from conftest import TINY_DEMO, demo_cfg`).
TINY_DEMO = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "data.batch_size": "8", "data.synthetic_images": "64", "tokenizer.fit_images": "32",
    "engine.kernels": "reference", "engine.log_every": "2", "engine.progress": "false", "optim.blr": "1e-3",
    "optim.warmup_epochs": "0.5", "eval.probe": "false", "eval.figure": "false",
}


def demo_cfg(out_dir, **over):
    """The `demo` preset at TINY_DEMO's size writing to `out_dir`, with `over` (field -> value)."""
    from ldae_fast.config import build_config

    return build_config("demo", {**TINY_DEMO, "engine.out_dir": str(out_dir),
                                 **{k: str(v) for k, v in over.items()}})


# Data for tests -------------------------------------------------------------------------------
def write_tar(path, samples, gz: bool = False) -> str:
    """A WebDataset-style tar (gzipped with `gz`) of (key, {ext: bytes}) samples; -> its path."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def smooth_images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """(n, 3, size, size) smooth images plus a little pixel noise: a spectrum far from flat, as for
    natural images, so a tokenizer fit has structure to find."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return x + 0.05 * torch.randn(n, 3, size, size, generator=g)


def in_batches(x: torch.Tensor, bs: int = 16):
    """x in consecutive batches of `bs` (the last may be smaller)."""
    for i in range(0, len(x), bs):
        yield x[i:i + bs]


# bench/ scripts, each test module its own copy ---------------------------------------------------
@pytest.fixture(scope="module")
def ts():
    """bench/train_step.py as a module."""
    from bench_import import load_bench

    return load_bench("train_step")


@pytest.fixture(scope="module")
def perf():
    """bench/make_perf_section.py as a module."""
    from bench_import import load_bench

    return load_bench("make_perf_section")


def free_port() -> int:
    """A TCP port nothing listens on now: a rendezvous for ranks this test launches."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The demo at its smallest with 4 px patches, trained one step: a real checkpoint for the eval tests.
ONE_STEP_DEMO = {
    "model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
    "data.img_size": "16", "model.patch_size": "4", "data.batch_size": "8", "data.synthetic_images": "32",
    "tokenizer.fit_images": "16", "engine.kernels": "reference", "engine.steps": "1", "engine.progress": "false",
    "eval.probe": "false", "eval.figure": "false",
}


def one_step_checkpoint(run_dir) -> Path:
    """Train ONE_STEP_DEMO into `run_dir`; its checkpoint."""
    from ldae_fast.config import build_config
    from ldae_fast.engine import loop

    return loop.train(build_config("demo", {**ONE_STEP_DEMO, "engine.out_dir": str(run_dir)})).checkpoint


@pytest.fixture(scope="module")
def stream_shards(tmp_path_factory):
    """4 train shards of 12 and 1 val shard of 20 labelled 24 px images (4 classes), once per test
    module: the streaming probe's and fine-tune's harnesses read them (tests/stream_harness.py)."""
    from eval_shards import write_split

    root = tmp_path_factory.mktemp("stream-shards")
    write_split(root, "train", 4, 12, size=24, seed=0)
    write_split(root, "val", 1, 20, size=24, seed=1)
    return root
