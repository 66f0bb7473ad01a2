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
