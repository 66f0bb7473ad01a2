"""bench/gpu_check.sh, the one command a lent GPU runs: its kernel checks at the training shapes,
its stage commands, its --prepare step, and its --rehearsal on CPU end to end (every stage through
the same code at toy size), so the script is known to work before a GPU ever runs it."""

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bench_import import load_bench

from ldae_fast import kernels, reference

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPT = BENCH / "gpu_check.sh"
LEARN_CHECK = BENCH / "learn_check.py"


# The kernels against float64 at the shapes training runs ----------------------------------------

# ViT-1/2L's step at the paper's shapes: 256 px, patch 16, d = 32, micro-batch 64; a DiT block's
# 256 tokens ('dit' layout, no class token) at width 1024; d = 128 through the general-tokenizer
# noise (more tiles of G). In the interpreter the same code at a toy size.
REAL = {"noise": (64, 256, 16, 32), "noise-G": (64, 256, 16, 128), "loss": (64, 256, 16, 32), "adaln": (64, 256, 1024)}
TOY = {"noise": (2, 32, 16, 128), "noise-G": (2, 32, 16, 32), "loss": (2, 32, 16, 128), "adaln": (2, 9, 64)}
# Below this share of the largest magnitude an error is rounding of the output dtype, not a bug.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2.0**-9 / 10}


def _basis(D: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q.t()[:d].float().contiguous()


def _within(name, got, truth, yard, floor_dtype):
    """The kernel's error against float64 at most twice the yardstick's from the same inputs, or
    under the rounding floor of the output dtype."""
    err = (got.detach().double() - truth).abs().max().item()
    err_ref = (yard.detach().double() - truth).abs().max().item()
    floor = FLOOR[floor_dtype] * truth.abs().max().item() + 1e-12
    assert err <= 2 * err_ref + floor, (name, err, err_ref, floor)


def _noise_math(dt, x, basis, mean, gamma, sigma, eps, p, decoder=None):
    B, _, H, W = x.shape
    V = basis.to(dt)
    G = V.t() if decoder is None else decoder.to(dt)
    z0 = (reference.patchify(x.to(dt), p) - mean.to(dt)) @ V.t()
    zt = gamma.to(dt).view(B, 1, 1) * z0 + sigma.to(dt).view(B, 1, 1) * eps.to(dt)
    return reference.unpatchify(zt @ G.t() + mean.to(dt), p, H, W, 3), z0


def _loss_math(dt, pred, target, basis, lam, p):
    """The loss and its gradient for pred, computed in dt (the kernel's defaults low 1, high 0.1)."""
    pd = pred.detach().to(dt).requires_grad_(True)
    e = reference.patchify(target.to(dt), p) - reference.patchify(pd, p)
    per_token = 0.1 * e.square().sum(-1) + 0.9 * (e @ basis.to(dt).t()).square().sum(-1)
    loss = (lam.to(dt).view(-1, 1) * per_token).mean()
    return loss, torch.autograd.grad(loss, pd)[0]


def _adaln_math(dt, x, mod, dy):
    xd, md = x.detach().to(dt).requires_grad_(True), mod.detach().to(dt).requires_grad_(True)
    shift, scale = md.chunk(6, dim=-1)[:2]
    y = F.layer_norm(xd, x.shape[-1:], eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return (y, *torch.autograd.grad(y, (xd, md), dy.to(dt)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["noise", "noise-G", "loss", "adaln"])
def test_kernel_matches_reference_at_real_shape(kernel_device, op, dtype):
    """Compiled on a GPU (LDAE_GPU_TESTS=1: gpu_check's first stage) at the training shapes, where
    tiles, masks and reductions differ from the tiny shapes of the kernel test files. Against
    float64 from the same inputs the kernel errs at most twice as much as the yardstick: in fp32
    the plain-PyTorch reference (ldae_fast.reference), in bf16 the same math done by PyTorch in
    bf16 (the kernel test files' rule). 'noise-G' is the noise with a separate decoder G (a patch
    AE / VAE tokenizer), whose second pass reads G across several tiles only at real shapes."""
    device = kernel_device
    g = torch.Generator().manual_seed(0)
    if op in ("noise", "noise-G", "loss"):
        B, S, p, d = (REAL if device == "cuda" else TOY)[op]
        D = 3 * p * p
        basis = _basis(D, d).to(device)
    if op in ("noise", "noise-G"):
        x = torch.randn(B, 3, S, S, generator=g).to(dtype).to(device)
        mean = (0.1 * torch.randn(D, generator=g)).to(device)
        gamma = (0.5 + torch.rand(B, generator=g)).to(device)
        sigma = (1.5 * torch.rand(B, generator=g)).to(device)
        dec = None
        if op == "noise-G":  # a fitted AE's maps: neither orthonormal nor each other's transpose
            basis = (torch.randn(d, D, generator=g) / D**0.5).to(device)
            dec = (torch.randn(D, d, generator=g) / d**0.5).to(device)
        out, z0, eps = kernels.latent_noise(x, basis, mean, gamma, sigma, p, seed=1234, offset=99,
                                            return_z0=True, return_eps=True, decoder=dec)
        assert out.shape == x.shape and out.dtype == dtype and eps.shape == (B, (S // p) ** 2, d)
        inputs = (x, basis, mean, gamma, sigma, eps, p)
        truth = _noise_math(torch.float64, *inputs, decoder=dec)
        yard = (reference.latent_noise(*inputs, decoder=dec) if dtype == torch.float32
                else _noise_math(dtype, *inputs, decoder=dec))
        _within("x_noisy", out, truth[0], yard[0], dtype)
        _within("z0", z0, truth[1], yard[1], torch.float32)
        e = eps.double()
        n = e.numel()
        assert abs(e.mean().item()) < 5 / n**0.5 and abs(e.var().item() - 1) < 5 * (2 / n) ** 0.5
    elif op == "loss":
        target = torch.randn(B, 3, S, S, generator=g)
        pred = (target + 0.5 * torch.randn(B, 3, S, S, generator=g)).to(dtype).to(device)
        target = target.to(dtype).to(device)
        lam = (0.2 + torch.rand(B, generator=g)).to(device)
        pk = pred.clone().requires_grad_(True)
        loss = kernels.pca_loss(pk, target, basis, lam, p)
        (grad,) = torch.autograd.grad(loss, pk)
        assert grad.dtype == dtype and grad.shape == pred.shape and loss.dtype == torch.float32
        truth = _loss_math(torch.float64, pred, target, basis, lam, p)
        if dtype == torch.float32:
            pr = pred.clone().requires_grad_(True)
            ref = reference.pca_loss_fast(pr, target, basis, lam, p)
            yard = (ref, torch.autograd.grad(ref, pr)[0])
        else:
            yard = _loss_math(dtype, pred, target, basis, lam, p)
        _within("loss", loss, truth[0], yard[0], torch.float32)
        _within("grad", grad, truth[1], yard[1], dtype)
    else:
        B, T, C = (REAL if device == "cuda" else TOY)[op]
        x = torch.randn(B, T, C, generator=g) * (0.5 + torch.rand(B, T, 1, generator=g)) + torch.randn(B, T, 1, generator=g)
        x = x.to(dtype).to(device)
        mod = (0.5 * torch.randn(B, 6 * C, generator=g)).to(dtype).to(device)
        dy = torch.randn(B, T, C, generator=g).to(dtype).to(device)
        xi, mi = x.clone().requires_grad_(True), mod.clone().requires_grad_(True)
        y = kernels.adaln_layernorm(xi, *mi.chunk(6, dim=-1)[:2])
        got = (y, *torch.autograd.grad(y, (xi, mi), dy))
        assert y.dtype == dtype and y.shape == (B, T, C)
        truth = _adaln_math(torch.float64, x, mod, dy)
        if dtype == torch.float32:
            xr, mr = x.clone().requires_grad_(True), mod.clone().requires_grad_(True)
            yr = reference.adaln_layernorm(xr, *mr.chunk(6, dim=-1)[:2])
            yard = (yr, *torch.autograd.grad(yr, (xr, mr), dy))
        else:
            yard = _adaln_math(dtype, x, mod, dy)
        for name, k, r, t in zip(("y", "dx", "dmod"), got, yard, truth):
            _within(name, k, t, r, dtype)


# The stage commands -----------------------------------------------------------------------------


def _dry_run(*flags: str) -> dict[str, tuple[int, list[str]]]:
    """{stage: (limit in s, argv)} as `gpu_check.sh --dry-run` prints them (nothing runs)."""
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", *flags], capture_output=True, text=True, cwd=ROOT,
                       timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stderr
    stages = {}
    for line in r.stdout.splitlines():
        m = re.match(r"=== \[\d+ s\] stage (\w+) \(limit (\d+) s\): (.*)$", line)
        if m:
            stages[m[1]] = (int(m[2]), shlex.split(m[3]))
        elif re.match(r"=== \[\d+ s\] stage (\w+): ", line):
            stages[line.split()[4].rstrip(":")] = (0, [])
    return stages


STAGES = ["env", "train_d", "train_a", "train_c", "train_b", "kernels", "tests", "learn", "diffmae", "profile",
          "switches"]
FIRST = ("env", "train_d", "train_a", "train_c", "train_b", "kernels", "tests")


@pytest.mark.parametrize("mode", ["gpu", "rehearse"])
def test_stage_commands_parse_with_todays_flags(mode):
    """Every command the script would run parses with today's options, names tests that exist,
    runs the step first at the paper's shapes with each of the four variants in its own process
    and slot, and on the GPU the stages before the learning run leave it at least 75 s of
    pretraining, so a lent GPU's minutes are not lost to a renamed flag or a plan that cannot fit."""
    stages = _dry_run(*([] if mode == "gpu" else ["--rehearse"]))
    assert list(stages) == STAGES
    ts, kb = load_bench("train_step"), load_bench("kernels")
    for name, (limit, argv) in stages.items():
        scripts = [w for w in argv if w.startswith("bench/") or w == "pytest"]
        if name == "learn" and not LEARN_CHECK.exists():
            assert argv == []  # recorded as a failed stage; the rest go on
            continue
        if "bench/kernels.py" in scripts:
            args = kb.parse_args(argv[argv.index("bench/kernels.py") + 1:])
            assert args.quick and args.json.endswith("kernels.json")
        elif "bench/train_step.py" in scripts:
            args = ts.parse_args(argv[argv.index("bench/train_step.py") + 1:])
            vals, _, _ = ts.resolve(args)
            plan = ts.resolve_plan(args, vals)
            if name.startswith("train_"):
                key = name.split("_")[1]
                assert [k for _, keys in plan for k in keys][0] == key and limit >= 40
                assert plan[0][0] == "auto" and args.append and args.json.endswith("train_step.json")
                assert args.layout == "dit" and args.method == "ldae"
                if mode == "gpu":
                    # The paper's shapes: the GPU defaults, no flag overriding them.
                    assert args.sizes == "halfL" and args.latent_dim is args.img_size is args.patch_size is None
                    assert {k: ts.GPU_DEFAULTS[k] for k in ("latent_dim", "img_size", "patch_size")} == \
                        {"latent_dim": 32, "img_size": 256, "patch_size": 16}
            elif name == "diffmae":
                assert args.method == "diffmae" and args.json.endswith("diffmae_step.json")
                assert args.decoder_kind == "cross_self" and args.decoder_topdown == "deepest_first"
                assert args.budget_s is not None
                assert [k for _, keys in plan for k in keys] == ["d", "a"]
                if mode == "gpu":
                    assert args.sizes == "L" and args.img_size is None and ts.gpu_defaults("diffmae")["img_size"] == 224
            elif name == "switches":
                keys = plan[0][1]
                assert plan[0][0] == "auto" and args.append and args.json.endswith("train_step.json")
                assert keys and all(k in ts.SWITCHES for k in keys) and args.budget_s is not None
            else:
                assert plan[0][1] == ["d"] and args.profile and args.no_write
        elif "bench/learn_check.py" in scripts:
            i = argv.index("bench/learn_check.py")
            flags = argv[i + 1:]
            for f in ("--data-dir", "--train-shards", "--val-shards", "--budget-s", "--out", "--device"):
                assert f in flags, f
            assert flags[flags.index("--out") + 1].endswith("learn.json")
            assert ("--toy" in flags) == (mode == "rehearse")
        elif "bench/results_io.py" in scripts:
            assert argv[argv.index("bench/results_io.py") + 1] == "gpu-env"
        else:
            assert "pytest" in argv and name == "tests"
            assert ("LDAE_GPU_TESTS=1" in argv) == (mode == "gpu")
            for t in (w for w in argv if w.startswith("tests/")):
                path, _, test = t.partition("::")
                assert (ROOT / path).exists(), t
                assert not test or f"def {test}(" in (ROOT / path).read_text(), t
    if mode == "gpu":
        # (b)'s slot is its own limit or what the train slots left; the dry run shows its own.
        text = SCRIPT.read_text()
        first = sum(stages[s][0] for s in FIRST if not s.startswith("train_")) + int(
            re.search(r"TRAIN_TOTAL=(\d+)", text)[1])
        assert sum(stages[s][0] for s in FIRST if s.startswith("train_")) == int(
            re.search(r"TRAIN_TOTAL=(\d+)", text)[1])
        total = int(re.search(r"GPU_CHECK_TOTAL_S:-(\d+)", text)[1])
        extra = int(re.search(r"LEARN_EXTRA=(\d+)", text)[1])
        assert total <= 540 and total - first - extra - 10 >= 75, (total, first)
        # The diffmae stage's reserve gives way before those 75 s do.
        assert int(re.search(r"LEARN_KEEP=(\d+)", text)[1]) >= 75
        assert f"add up to {first} s" in text


def test_device_call_is_the_same_in_the_header_and_the_readme():
    """The run call a session copies: one text in the script's header and in bench/README.md, and
    the files it keeps are the 8 that results_io imports."""
    def call(text):
        m = re.search(r"run\(command=\"LDAE_GIT_COMMIT=<commit> bash bench/gpu_check.sh\",\s*#?\s*"
                      r"carry=\[\"gpu-data\"\], timeout_s=(\d+)\)", text)
        assert m, "no device call"
        return int(m[1])

    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    assert call(header) == call((BENCH / "README.md").read_text()) <= 600
    keep = re.search(r'^KEEP=" (.*) "$', SCRIPT.read_text(), re.M)[1].split()
    rio = load_bench("results_io")
    assert sorted(keep) == sorted(rio.GPU_CHECK_FILES) and len(keep) <= 8
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown argument '--nope'" in r.stderr


# --prepare -------------------------------------------------------------------------------------


def _fake_shards(src: Path) -> None:
    src.mkdir()
    sums = []
    for name in [f"train-{i:06d}.tar.gz" for i in range(10)] + ["val-000000.tar.gz", "val-000001.tar.gz"]:
        data = hashlib.sha256(name.encode()).digest() * 64
        (src / name).write_bytes(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    (src / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    (src / "classes.tsv").write_text("0\tn01\tthing\n")


def test_prepare_takes_five_train_shards_and_one_val_and_refuses_what_does_not_travel(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "gpu-data"
    _fake_shards(src)
    kinds = tmp_path / "KINDS.md"
    kinds.write_text("Packages: numpy, pillow, pytest, safetensors, timm, torch, triton, zipp.\n")
    env = dict(os.environ, LDAE_SHARDS_SRC=str(src), LDAE_GPU_DATA=str(dest), LDAE_DEVICE_KINDS=str(kinds),
               PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SCRIPT), "--prepare"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    taken = [f"train-{i:06d}.tar.gz" for i in range(5)] + ["val-000000.tar.gz"]
    assert sorted(p.name for p in dest.glob("*.tar.gz")) == taken
    assert f"took from {src}: {' '.join(taken)}" in r.stdout
    source = (dest / "SOURCE.txt").read_text()
    for name in taken:
        digest = hashlib.sha256((src / name).read_bytes()).hexdigest()
        assert f"{name} {(src / name).stat().st_size} {digest}" in source
    commit = (dest / "COMMIT").read_text().strip()
    assert commit and f'run(command="LDAE_GIT_COMMIT={commit} bash bench/gpu_check.sh", carry=["gpu-data"]' in r.stdout
    assert "nothing missing" in r.stdout and re.search(r"travels: tree .* = [\d.]+ MiB of 64.0 MiB", r.stdout)

    # A shard that does not match its checksum, and a copy over the carry limit: refused.
    (src / "train-000002.tar.gz").write_bytes(b"changed")
    r = subprocess.run(["bash", str(SCRIPT), "--prepare"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 1 and "checksums" in r.stderr
    _fake_shards(tmp_path / "src2")
    r = subprocess.run(["bash", str(SCRIPT), "--prepare"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(env, LDAE_SHARDS_SRC=str(tmp_path / "src2"), LDAE_CARRY_LIMIT_BYTES="4096"))
    assert r.returncode == 1 and "is over the" in r.stderr
    assert not dest.exists()


# --rehearse ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rehearsal_returns_what_a_gpu_run_would(tmp_path):
    """Every stage at toy size on CPU, through the same scripts: the files a GPU run returns exist,
    parse, carry the environment, and `results_io.py import` and make_perf_section take them."""
    out, home = tmp_path / "out", tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "LDAE_GPU_TESTS"}
    env.update(OUT=str(out), PYTHON=sys.executable, LDAE_TEST_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(SCRIPT), "--rehearse"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=540)
    log = r.stdout + r.stderr
    learn = LEARN_CHECK.exists()
    assert r.returncode == (0 if learn else 1), log[-4000:]

    names = sorted(p.name for p in out.iterdir())
    want = {"env.json", "tests.log", "kernels.json", "train_step.json", "diffmae_step.json", "profile.md",
            "gpu_check.log"}
    assert want | ({"learn.json"} if learn else set()) == set(names) and len(names) <= 8, names

    envj = json.loads((out / "env.json").read_text())
    meta = envj["meta"]
    assert envj["name"] == "gpu_check" and meta["complete"] is True and meta["mode"] == "rehearse"
    assert meta["torch"] == torch.__version__ and meta["triton"] and meta["python"] and meta["date"]
    assert "bash bench/gpu_check.sh --rehearse" in meta["command"] and meta["git_commit"]
    assert meta["data"]["dir"] and meta["files"]["learn.json"] == "learn_check"
    stages = {row["stage"]: row for row in envj["rows"]}
    assert list(stages) == STAGES
    for name, row in stages.items():
        if name == "learn" and not learn:
            assert row["status"].startswith("failed: bench/learn_check.py is not in this tree")
        else:
            assert row["status"] == "ok", row
    assert stages["tests"]["passed"] >= 6 and "failed" not in stages["tests"]
    # Each variant's process appended to the one file: (d) at 'auto' and 'max', then a, c, b,
    # then (d) with a speed switch each (the CUDA graph refused on CPU in its row, in one line).
    assert [stages[f"train_{k}"]["rows"] for k in "dacb"] == [2, 3, 4, 5] and stages["switches"]["rows"] == 7
    steps = json.loads((out / "train_step.json").read_text())["rows"]
    assert [r["variant"] for r in steps] == ["d", "d", "a", "c", "b", "d+bf16res", "d+stepgraph"]
    assert all(r["status"] == "ok" and r["layout"] == "dit" and r["tokens"] == 64 for r in steps[:6])
    assert all(r["vs_a"] and r["vs_b"] and r["vs_c"] for r in steps[:5] if r["batch"] == steps[0]["batch"])
    assert steps[5]["vs_d"] and "CUDA graphs need a CUDA device" in steps[6]["status"]
    assert stages["kernels"]["rows_ok"] == stages["kernels"]["rows"] > 0

    kern = json.loads((out / "kernels.json").read_text())
    assert kern["meta"]["copy_GBps"] > 0 and kern["meta"]["complete"] is True
    got = {(row["op"], row["variant"]) for row in kern["rows"] if row["status"] == "ok"}
    ops = {row["op"] for row in kern["rows"]}
    assert len(ops) == 5 and {(o, v) for o in ops for v in ("eager", "triton")} <= got
    assert all(row["GBps"] > 0 and row["frac_copy"] > 0 for row in kern["rows"])

    ts = json.loads((out / "train_step.json").read_text())
    got = [(row["batch"], row["variant"], row["status"]) for row in ts["rows"]]
    assert got[:5] == [(4, "d", "ok"), (8, "d", "ok"), (4, "a", "ok"), (4, "c", "ok"), (4, "b", "ok")], got
    assert [r.get("batch_rule", "").split(":")[0] for r in ts["rows"][:5]] == ["auto", "max", "auto", "auto", "auto"]
    # One file, every process's command; the targets judged on all the rows (not met on a CPU).
    assert len(ts["meta"]["commands"]) == 5 and ts["meta"]["git_commit"]
    assert {t["status"] for t in ts["meta"]["targets"]} == {"not judged: a CPU smoke run"}
    assert "|" in (out / "profile.md").read_text()
    dm = json.loads((out / "diffmae_step.json").read_text())
    assert [(r["model"], r["variant"], r["decoder_kind"], r["decoder_topdown"], r["status"]) for r in dm["rows"]] == [
        ("DiffMAE tiny", v, "cross_self", "deepest_first", "ok") for v in ("d", "a")]
    assert all(r["train_flops_per_image"] > 0 for r in dm["rows"])
    assert stages["diffmae"]["rows_ok"] == 2 and dm["meta"]["method"] == "diffmae"
    log_text = (out / "gpu_check.log").read_text()
    assert "stage train_b: exit 0" in log_text and "stage diffmae: exit 0" in log_text
    # The summary is printed at the end rather than returned as a file of its own.
    assert "### train_step" in log_text.split("done; files in")[-1]

    rio, perf = load_bench("results_io"), load_bench("make_perf_section")
    added = rio.import_results(out, home)
    stored = sorted(p.name for p in home.glob("*.json"))
    assert [n.split("-")[0] for n in stored] == (["gpu_check", "kernels"] + (["learn_check"] if learn else [])
                                                 + ["train_step", "train_step"])
    raw = [p for p in added if p.parent != home]
    assert sorted(p.name for p in raw) == ["gpu_check.log", "profile.md", "tests.log"]
    assert rio.import_results(out, home) == []
    text = perf.render(home, include_cpu=True)
    for section in ("### gpu_check", "### kernels", "### train_step") + (("### learn_check",) if learn else ()):
        assert section in text, section
    assert "| DiffMAE tiny |" in text
