"""Feature-learning study (ldae_fast.featlearn): data, closed-form loss, gradients, claims, CLI."""

from __future__ import annotations

import gzip
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldae_fast.featlearn import cli, data, nets, report, train


@pytest.fixture
def one_thread():
    # The study's matrices are tiny; on a shared 2-core machine extra threads only add contention.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- data -----------------------------------------------------------------------------------------


def test_synthetic_shapes_labels_and_snr():
    g = torch.Generator().manual_seed(0)
    ds = data.synthetic(30, 1000, 5.0, sigma_xi=1.0, generator=g)
    assert ds.x.shape == (30, 2, 1000) and ds.y.shape == (30,)
    assert ds.x.dtype == torch.float64
    assert set(ds.y.tolist()) <= {-1.0, 1.0}
    mu = data.signal_vectors(1000, 5.0)
    assert torch.dot(mu[0], mu[1]) == 0 and torch.allclose(mu.norm(dim=1), torch.tensor(5.0, dtype=torch.float64))
    expected = torch.where(ds.y[:, None] > 0, mu[0], mu[1])
    assert torch.equal(ds.x[:, 0], expected)
    assert ds.snr == pytest.approx(5.0 / math.sqrt(1000))
    assert ds.n_snr2 == pytest.approx(0.75)
    assert data.synthetic(30, 1000, 15.0, generator=g).n_snr2 == pytest.approx(6.75)
    # The noise patch is N(0, sigma^2 I): check its variance on a large draw.
    big = data.synthetic(200, 1000, 1.0, sigma_xi=2.0, generator=g)
    assert big.x[:, 1].var().item() == pytest.approx(4.0, rel=0.02)
    with pytest.raises(ValueError):
        data.synthetic(10, 1, 1.0)


def _write_idx(path, arr: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1] * 6, dtype=np.uint8)
    _write_idx(tmp_path / data.MNIST_IMAGES, images, 0x803)
    _write_idx(tmp_path / data.MNIST_LABELS, labels, 0x801)
    im, lb = data.load_mnist(tmp_path)
    assert np.array_equal(im, images) and np.array_equal(lb, labels)
    _write_idx(tmp_path / data.MNIST_LABELS, labels, 0x803)  # wrong magic
    with pytest.raises(ValueError, match="magic"):
        data.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data"):
        data.load_mnist(tmp_path / "nowhere")


def test_noisy_mnist_split(mnist_dir):
    g = torch.Generator().manual_seed(0)
    split = data.noisy_mnist(6.75, 50, 200, (0, 1), data_dir=mnist_dir, generator=g)
    tr, te = split.train, split.test
    assert tr.x.shape == (100, 2, 784) and te.x.shape == (400, 2, 784)
    assert tr.y.sum().item() == 0 and te.y.sum().item() == 0  # balanced classes
    assert tr.n_snr2 == pytest.approx(6.75)
    assert te.snr > 0 and split.scale > 0
    # Signal patches are scaled pixels in [0, scale]; noise is standard Gaussian.
    assert tr.x[:, 0].min() >= 0 and tr.x[:, 0].max() <= split.scale + 1e-12
    assert tr.x[:, 1].std().item() == pytest.approx(1.0, rel=0.05)
    # Train and test images are disjoint (no training image appears in the test set).
    dists = torch.cdist(tr.x[:, 0], te.x[:, 0])
    assert dists.min().item() > 0


def test_noisy_mnist_default_location_error_names_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "default_mnist_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError) as e:
        data.find_mnist()
    assert str(tmp_path / "a") in str(e.value) and "--data" in str(e.value)


# --- losses and gradients -------------------------------------------------------------------------


def _tiny(device, n=4, d=7, mu=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.synthetic(n, d, mu, generator=g).to(device), g


def test_diffusion_closed_form_grad_matches_autograd(device):
    ds, g = _tiny(device)
    W = (torch.randn(3, 7, generator=g, dtype=torch.float64) * 0.6).to(device)
    a, b = nets.schedule(0.2)
    Wr = W.clone().requires_grad_(True)
    ref = nets.diffusion_loss_closed(Wr, ds.x, a, b)
    (ref_grad,) = torch.autograd.grad(ref, Wr)
    loss, grad = nets.diffusion_loss_and_grad(W, ds.x, a, b)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_classifier_grad_matches_autograd(device):
    ds, g = _tiny(device)
    W = torch.randn(2, 3, 7, generator=g, dtype=torch.float64).to(device) * 0.5
    Wr = W.clone().requires_grad_(True)
    ref = nets.classifier_loss(Wr, ds.x, ds.y)
    (ref_grad,) = torch.autograd.grad(ref, Wr)
    loss, grad = nets.classifier_loss_and_grad(W, ds.x, ds.y)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    # The 4-index reference for F_j, written independently of the matmul path.
    Fj = torch.einsum("npd,jmd->njpm", ds.x, W).pow(2).sum((2, 3)) / W.shape[1]
    torch.testing.assert_close(nets.class_scores(W, ds.x), Fj)


def test_closed_form_matches_sampled_expectation(device, one_thread):
    """The exact E_eps loss and gradient agree with the batched Monte-Carlo DDPM loss."""
    ds, g = _tiny(device, n=3, d=5, mu=1.5, seed=1)
    W = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5).to(device)
    a, b = nets.schedule(0.2)
    exact_loss, exact_grad = nets.diffusion_loss_and_grad(W, ds.x, a, b)
    # 40 independent batches of 5,000 draws: their spread gives the Monte-Carlo standard error.
    gen = torch.Generator(device=device).manual_seed(123)
    losses, grads = [], []
    for _ in range(40):
        lo, gr = nets.diffusion_loss_and_grad_mc(W, ds.x, a, b, 5000, gen)
        losses.append(lo)
        grads.append(gr)
    L, G = torch.stack(losses), torch.stack(grads)
    se_l = L.std() / math.sqrt(len(L))
    se_g = G.std(0) / math.sqrt(len(G))
    assert abs(L.mean() - exact_loss) < 5 * se_l + 1e-12
    z = (G.mean(0) - exact_grad).abs() / (se_g + 1e-12)
    assert z.max() < 5.5, f"max z-score {z.max():.2f}"
    # And the sampled loss is differentiable as a whole (the spec the closed form replaces).
    Wr = W.clone().requires_grad_(True)
    nets.diffusion_loss_mc(Wr, ds.x, a, b, 64, gen).backward()
    assert Wr.grad is not None and torch.isfinite(Wr.grad).all()


def test_growth_ratio_reads_the_phase_before_saturation():
    hist = [
        {"iter": 0, "signal": 1.0, "noise": 1.0},
        {"iter": 10, "signal": 2.0, "noise": 3.0},
        {"iter": 20, "signal": 4.0, "noise": 4.0},  # last record with both below 5x their start
        {"iter": 30, "signal": 9.0, "noise": 6.0},
    ]
    assert report.growth_ratio(hist) == pytest.approx(3.0 / 3.0)
    assert report.growth_ratio(hist, factor=3.5) == pytest.approx(1.0 / 2.0)
    assert math.isnan(report.growth_ratio(hist[:1]))


def test_metrics_definitions():
    x = torch.zeros(2, 2, 3, dtype=torch.float64)
    x[0, 0, 0], x[1, 0, 1] = 2.0, 2.0  # signals e1, e2 (|mu| = 2)
    x[0, 1, 2], x[1, 1, 2] = 1.0, -3.0  # noise patches along e3
    W = torch.tensor([[1.0, 0.0, 0.5], [0.0, -0.25, 0.0]], dtype=torch.float64)
    m = nets.feature_metrics(W, x)
    assert m["signal"] == pytest.approx((2.0 + 0.5) / 2)
    assert m["noise"] == pytest.approx((0.5 + 1.5) / 2)
    # Classifier: each sample is read through its own class's filters (y=+1 -> W[0], y=-1 -> W[1]).
    Wc = torch.stack([W, 2 * W])
    mc = nets.feature_metrics(Wc, x, torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert mc["signal"] == pytest.approx((2.0 + 1.0) / 2)
    assert mc["noise"] == pytest.approx((0.5 + 3.0) / 2)


# --- the paper's claims, on shortened runs ---------------------------------------------------------


def _paper_data(mu, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    tr = data.synthetic(30, 1000, mu, generator=g).to(device)
    te = data.synthetic(1000, 1000, mu, generator=g).to(device)
    return tr, te


@pytest.mark.slow
def test_classifier_is_lopsided_on_the_side_set_by_n_snr2(device, one_thread):
    """Full 500-iteration classifier runs at the paper's setting (d=1000, n=30, m=20)."""
    cfg = train.ClassifierConfig(iters=500, n_records=5)
    finals = {}
    for mu in (5.0, 15.0):
        tr, te = _paper_data(mu, device)
        finals[mu] = train.train_classifier(tr, te, cfg, torch.Generator().manual_seed(1))["final"]
    low, high = finals[5.0], finals[15.0]  # n SNR^2 = 0.75 and 6.75
    assert low["train_acc"] == 1.0 and high["train_acc"] == 1.0
    assert low["ratio"] < 0.2, low  # memorizes noise ...
    assert low["test_acc"] < 0.7, low  # ... and does not generalize
    assert high["ratio"] > 5.0, high  # learns the signal ...
    assert high["test_acc"] > 0.95, high  # ... and generalizes


@pytest.mark.slow
def test_diffusion_learns_signal_and_noise_in_balance(device, one_thread):
    """Shortened diffusion runs (same eta * iterations as 40,000 x 0.5): both features grow."""
    cfg = train.DiffusionConfig(iters=2000, lr=10.0, n_records=80)
    finals = {}
    for mu in (5.0, 15.0):
        tr, _ = _paper_data(mu, device)
        res = train.train_diffusion(tr, cfg, torch.Generator().manual_seed(1))
        assert res["loss_increases"] == 0  # GD stayed below the stability edge
        start, end = res["history"][0], res["final"]
        assert end["signal"] > 10 * start["signal"] and end["noise"] > 5 * start["noise"], (start, end)
        # While both still grow, their increments scale with n SNR^2 (the paper's Theta); the
        # constant, about 1/2 here, is our fit, not the paper's.
        growth = report.growth_ratio(res["history"])
        assert 0.6 < growth / (tr.n_snr2 / 2) < 1.6, (mu, growth)
        finals[mu] = end
    for f in finals.values():
        assert 0.4 < f["ratio"] < 2.5, finals  # balanced, unlike the classifier's 0.03 / 8
    assert finals[15.0]["ratio"] > finals[5.0]["ratio"]  # and ordered like n SNR^2


def test_too_large_diffusion_step_is_flagged(one_thread):
    """Past the stability edge GD oscillates instead of diverging; the run must say so."""
    g = torch.Generator().manual_seed(0)
    ds = data.synthetic(10, 100, 6.0, generator=g)
    flags = {}
    for lr in (5.0, 12.0):
        cfg = train.DiffusionConfig(iters=1500, lr=lr, n_records=100)
        flags[lr] = train.train_diffusion(ds, cfg, torch.Generator().manual_seed(1))["loss_increases"]
    assert flags[5.0] == 0 and flags[12.0] > 0, flags
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train.train_diffusion(ds, train.DiffusionConfig(iters=300, lr=200.0), torch.Generator().manual_seed(1))


# --- command line ---------------------------------------------------------------------------------


def test_cli_synthetic_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "synthetic", "--quick", "--d", "64", "--n", "8", "--mu-norms", "1", "3", "--n-test", "50",
        "--diff-iters", "30", "--clf-iters", "20", "--records", "5", "--seeds", "0", "1", "--out", str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| regime |" in printed and "classifier" in printed
    for name in ("metrics.json", "table.md", "ratio.png", "mu1_seed0.png", "mu3_seed1.png"):
        assert (out / name).is_file(), name
    from PIL import Image

    with Image.open(out / "ratio.png") as im:
        assert im.format == "PNG" and im.width > 100
    import json

    meta = json.loads((out / "metrics.json").read_text())
    assert len(meta["runs"]) == 4 and len(meta["summary"]) == 4  # 2 regimes x 2 models, seeds pooled
    assert meta["summary"][0]["seeds"] == [0, 1]
    assert meta["runs"][0]["diffusion"]["config"]["iters"] == 30
    # Every table row has the same number of cells as the header (no stray "|").
    rows = (out / "table.md").read_text().strip().splitlines()[2:]
    counts = {r.replace("\\|", "").count("|") for r in rows if r.startswith("|")}
    assert len(counts) == 1


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["noisy-mnist", "--quick", "--data", str(tmp_path / "missing")]) == 4  # file error
    err = capsys.readouterr().err
    assert "missing" in err and "--data" in err
    assert cli.main(["synthetic", "--m", "0", "--out", str(tmp_path / "x")]) == 2
    assert "width m" in capsys.readouterr().err
    assert cli.main(["no-such-experiment"]) == 2  # usage error, one line
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no-such-experiment" in err


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "ldae_fast.featlearn", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "noisy-mnist" in r.stdout


def test_table_shows_ratio_at_half_and_three_quarters():
    """The quarter marks are always recorded, and the table reads the ratio there and at the end."""
    assert {250, 500, 750, 1000} <= train.record_steps(1000, 7)
    hist = [{"iter": i, "signal": 1.0 + i, "noise": 1.0, "ratio": 1.0 + i} for i in (0, 250, 500, 750, 1000)]
    assert report.ratio_at(hist, 0.5) == 501.0 and report.ratio_at(hist, 0.75) == 751.0
    run = {"regime": "r", "seed": 0, "n_snr2": 2.0}
    for model in ("diffusion", "classifier"):
        run[model] = {"config": {"iters": 1000}, "history": hist, "final": hist[-1]}
    rows = report.summary_rows([run])
    assert rows[0]["ratio_half"] == [501.0] and rows[0]["ratio_3q"] == [751.0]
    line = report.markdown_table(rows).splitlines()[2]
    assert "| 501 · 751 | 1e+03 |" in line, line
