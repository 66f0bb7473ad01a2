"""kernels/attention.py: every backend that runs here against reference.attention."""

import re

import pytest
import torch

from ldae_fast import reference
from ldae_fast.kernels import attention as attn_mod
from ldae_fast.kernels.attention import (
    AttentionBackendError,
    attention,
    available_backends,
    resolve_backend,
)

# (B, heads, N, head_dim): N = 17 is a 4x4 grid plus a class token, not a power of two.
SHAPES = [(2, 3, 17, 32), (1, 2, 65, 64)]


def _qkv(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _bf16_torch_error(q, k, v, ref):
    """Error of the same math done naively by PyTorch in bf16: the yardstick for bf16 kernels."""
    a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    naive = torch.softmax(a, dim=-1) @ v
    return (naive.float() - ref).abs().max().item()


def test_available_backends_lists_runnable_ones():
    backs = available_backends()
    assert "sdpa" in backs and "math" in backs
    assert "auto" not in backs
    assert resolve_backend("auto") in backs


CUDA_ONLY = ("xformers", "cudnn", "efficient")
# SDPA's flash and cuDNN kernels on CUDA take fp16 / bf16 only: pinned to them, fp32 is refused.
FP32_REFUSED_ON_CUDA = ("flash", "cudnn")


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_fp32_matches_reference(backend, shape, device):
    if backend in CUDA_ONLY and device != "cuda":
        pytest.skip(f"{backend} runs on CUDA only")
    q, k, v = _qkv(shape, torch.float32, device)
    if device == "cuda" and backend in FP32_REFUSED_ON_CUDA:
        with pytest.raises(AttentionBackendError, match=f"attn_backend='{backend}'.*cannot run on cuda"):
            attention(q, k, v, backend=backend)
        return
    out = attention(q, k, v, backend=backend)
    ref = reference.attention(q, k, v)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", available_backends())
def test_forward_bf16_within_2x_torch_bf16_error(backend, device):
    if backend in CUDA_ONLY and device != "cuda":
        pytest.skip(f"{backend} runs on CUDA only")
    q, k, v = _qkv((2, 4, 33, 64), torch.bfloat16, device)
    out = attention(q, k, v, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = reference.attention(q.float(), k.float(), v.float())
    err = (out.float() - ref).abs().max().item()
    assert err <= 2 * _bf16_torch_error(q, k, v, ref) + 1e-3, err


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(backend, dtype, device):
    if backend in CUDA_ONLY and device != "cuda":
        pytest.skip(f"{backend} runs on CUDA only")
    q, k, v = _qkv((2, 2, 17, 32), dtype, device, seed=1)
    dout = _qkv((2, 2, 17, 32), dtype, device, seed=2)[0]
    if device == "cuda" and backend in FP32_REFUSED_ON_CUDA and dtype == torch.float32:
        with pytest.raises(AttentionBackendError, match=f"attn_backend='{backend}'.*cannot run on cuda"):
            attention(q, k, v, backend=backend)
        return

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        fn(*leaves).backward(dout)
        return [t.grad.float() for t in leaves]

    got = grads(lambda a, b, c: attention(a, b, c, backend=backend), q, k, v)
    # The reference computed in fp32 from the same (rounded) inputs is the target in both dtypes.
    want = grads(reference.attention, q.float(), k.float(), v.float())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_auto_is_sdpa():
    q, k, v = _qkv((1, 2, 9, 16), torch.float32, "cpu")
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="sdpa"), atol=0, rtol=0)


def test_unknown_backend_is_a_clear_error():
    q, k, v = _qkv((1, 1, 4, 8), torch.float32, "cpu")
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'flash3'.*sdpa"):
        attention(q, k, v, backend="flash3")


def test_missing_xformers_names_the_extra(monkeypatch):
    monkeypatch.setattr(attn_mod, "_xformers_ops", lambda: None)
    assert "xformers" not in available_backends()
    with pytest.raises(AttentionBackendError, match=r"pip install ldae-fast\[gpu\]"):
        resolve_backend("xformers")
    q, k, v = _qkv((1, 1, 4, 8), torch.float32, "cpu")
    with pytest.raises(AttentionBackendError, match=r"pip install ldae-fast\[gpu\]"):
        attention(q, k, v, backend="xformers")


def test_bad_shapes_are_rejected():
    q = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="heads"):
        attention(q, q, q)


def test_pinned_sdpa_kernels_are_backends_and_clear_where_they_cannot_run(monkeypatch):
    """'flash' / 'cudnn' / 'efficient' are config values (one list in config and kernels); on CPU
    flash runs (SDPA has it there) and the CUDA-only two are refused in one line naming the
    field; a torch without sdpa_kernel is refused naming its version, not with a traceback."""
    from ldae_fast.config import ATTN_BACKENDS, ModelConfig

    assert ATTN_BACKENDS == attn_mod.BACKENDS
    assert ModelConfig(attn_backend="cudnn").attn_backend == "cudnn"
    q, k, v = _qkv((2, 3, 17, 32), torch.float32, "cpu")
    torch.testing.assert_close(attention(q, k, v, backend="flash"), reference.attention(q, k, v),
                               atol=2e-5, rtol=1e-4)
    for name in ("cudnn", "efficient"):
        with pytest.raises(AttentionBackendError, match=f"attn_backend='{name}'.*cannot run on cpu"):
            attention(q, k, v, backend=name)
        if not torch.cuda.is_available():
            with pytest.raises(AttentionBackendError, match="no CUDA device"):
                resolve_backend(name)
            assert name not in available_backends()
    assert issubclass(AttentionBackendError, attn_mod.UsageError) and AttentionBackendError.exit_code == 2
    import builtins

    real_import = builtins.__import__

    def no_sdpa_kernel(name, *a, **kw):
        if name == "torch.nn.attention":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_sdpa_kernel)
    with pytest.raises(AttentionBackendError, match=re.escape(f"torch {torch.__version__}")):
        resolve_backend("flash")
