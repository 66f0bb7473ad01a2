#!/usr/bin/env python
"""End-to-end training-step benchmark of a method (l-DAE by default): forward + backward + optimizer
step, data on device.

The batch is a fixed tensor already on the device, so the model and the step are measured, not
the data loader (bench/data.py measures that). Four variants at every (model size, micro-batch):

  (a) eager        eager PyTorch, reference objective (kernels='reference'), math attention (the
                   scores materialised; its matmuls follow autocast, bf16 on CUDA),
                   torch.optim.AdamW defaults: what a straightforward implementation does
  (b) compiled     (a) with the model and the loss under torch.compile
  (c) timm peer    encoder + decoder of timm VisionTransformer Blocks (fused SDPA attention) of the
                   same width/depth, eager reference loss: what one would assemble from timm
  (d) ldae-fast    Triton noise + loss kernels, attention 'auto', regional torch.compile of each
                   transformer block, fused AdamW

and, on request (`--variants ...,ablations`), (d) with one switch changed, reported against (d)
of the same run (`vs_d`), so each piece of speed work is kept only where it measurably helps:
  d-compile (no regional compile), d-triton (reference objective instead of the Triton kernels),
  d+adaln (fused adaLN modulate + LayerNorm kernel), d+graphs (blocks compiled with
  mode='reduce-overhead', i.e. CUDA graphs), d+ckpt (activation checkpointing: its FLOPs are
  counted without the recompute, so its MFU is model FLOPs utilisation, as for every row).

Every variant runs under the same precision (bf16 autocast on CUDA, TF32 allowed for the float32
leftovers) so the ratios measure the engineering, not the number format.

Reported per row: images/s; achieved TFLOP/s and MFU from an analytic count (the method's
MethodSpec.train_flops; for l-DAE 3 x the forward count of its network: backward costs two
forwards, no activation checkpointing here) against a bf16 dense peak looked up by GPU name (override with
--peak-tflops); peak memory; and each variant's throughput relative to (a), (b) and (c) of the
same size and batch. A variant that fails (OOM at a batch size, a compile error) is a row saying
so, not a crash.

`--method NAME` measures another registered method; what differs per method (its GPU defaults,
default variants, flags such as --mask-ratio, its timm peer, its rows' fields and FLOP count) is
its MethodSpec.step_bench (ldae_fast/methods/<name>/bench.py). DiffMAE (GPU default: ViT-B and
ViT-L, 224 px, patch 16, 75% masking, MAE's 8 x 512 decoder as the diffmae-vitb / -vitl presets,
variants a, c, d): (a) our network with the reference objective, math attention, no compile, torch
AdamW; (c) the same network assembled from timm Blocks (encoder on the visible tokens, a joint
decoder over encoder and noised tokens, t's embedding added to the noised tokens instead of
adaLN); (d) ours as the l-DAE rows run it. Its FLOPs count the encoder on the visible quarter of
the tokens, the decoder on what diffmae.decoder_kind attends over, and the backward without the
input gradients nobody needs (it equals torch's FLOP counter).

`--plan '128:a,c,d;256:d;128:b'` runs chosen variants at chosen micro-batches in the order written;
`--budget-s` starts no variant after that many seconds (bench/gpu_check.sh's one-command GPU run).

On a machine without CUDA (or with --cpu-smoke) it runs a toy configuration so CI can check the
script end to end; results are written with bench/results_io.py only for GPU runs.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Runnable as `python bench/train_step.py` from a checkout without installing the package.
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import results_io  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import ldae_fast.methods  # noqa: E402,F401 (registers the methods' config sections and presets)
from ldae_fast.config import CUDA_GRAPH_MODES, Config, ConfigError  # noqa: E402
from ldae_fast.engine.cuda_graph import GraphedStep, check_cuda_graphs  # noqa: E402
from ldae_fast.engine.mfu import peak_tflops_for  # noqa: E402
from ldae_fast.engine.optim import build_adamw  # noqa: E402
from ldae_fast.engine.profiling import nvtx_range, profile_calls  # noqa: E402
from ldae_fast.kernels.attention import resolve_backend  # noqa: E402
from ldae_fast.methods import METHODS as REGISTRY  # noqa: E402
from ldae_fast.methods import Batch, Method, build_method, build_model  # noqa: E402
from ldae_fast.methods.spec import PeerNotApplicable, StepBench  # noqa: E402
from ldae_fast.models.compile import compile_blocks, mark_step_begin  # noqa: E402
from ldae_fast.tokenizers import Tokenizer, tokenizer_from_state  # noqa: E402

SIZE_LABELS = {"tiny": "tiny", "S": "ViT-S", "B": "ViT-B", "halfL": "ViT-1/2L", "L": "ViT-L"}

_D = dict(kernels="triton", attn="auto", compile="blocks", peer=False, ours_optim=True)
VARIANTS = {
    "a": dict(name="eager", kernels="reference", attn="math", compile="none", peer=False, ours_optim=False),
    "b": dict(name="compiled", kernels="reference", attn="math", compile="full", peer=False, ours_optim=False),
    "c": dict(name="timm-peer", kernels="reference", attn="timm", compile="none", peer=True,
              ours_optim=False),
    "d": dict(name="ldae-fast", **_D),
    # Ablations of (d): one switch each, so one GPU run says which speed work earns its place
    # (vs_d < 1 for a '-' row means that piece helps; vs_d > 1 for a '+' row means turn it on).
    "d-compile": dict(_D, name="(d) no compile", compile="none"),
    "d-triton": dict(_D, name="(d) reference objective", kernels="reference"),
    "d+adaln": dict(_D, name="(d) + fused adaLN LN", fused_adaln=True),
    "d+graphs": dict(_D, name="(d) + CUDA graphs", compile_mode="reduce-overhead"),
    "d+ckpt": dict(_D, name="(d) + activation ckpt", ckpt=True),
    # The speed switches of issue 26, each (d) with one switch on (vs_d > 1: turn it on).
    "d+bf16res": dict(_D, name="(d) + bf16 residual", model=dict(bf16_residual=True)),
    "d+adaln-act": dict(_D, name="(d) + fused adaLN, bf16 out", fused_adaln=True,
                        model=dict(adaln_act_dtype=True)),
    "d+flash": dict(_D, name="(d) + SDPA flash", attn="flash"),
    "d+cudnn": dict(_D, name="(d) + SDPA cuDNN", attn="cudnn"),
    "d+fp8": dict(_D, name="(d) + FP8 linears", model=dict(fp8="rowwise")),
    "d+stepgraph": dict(_D, name="(d) whole step, CUDA graph", stepgraph=True),
}
ABLATIONS = ("d-compile", "d-triton", "d+adaln", "d+graphs", "d+ckpt")
SWITCHES = ("d+bf16res", "d+adaln-act", "d+cudnn", "d+flash", "d+stepgraph", "d+fp8")

# The paper's shapes: 256 px, patch 16 (256 tokens in the 'dit' layout), d = 32.
GPU_DEFAULTS = dict(sizes="B,halfL,L", batch_sizes="64,128,256", img_size=256, patch_size=16,
                    latent_dim=32, warmup=5, steps=20)
CPU_SMOKE = dict(sizes="tiny", batch_sizes="4", img_size=32, patch_size=4, latent_dim=16, warmup=1, steps=2)
METHODS = tuple(REGISTRY)
DEFAULT_METHOD = METHODS[0]


def bench_of(method: str) -> StepBench:
    """What this benchmark measures of `method` (MethodSpec.step_bench)."""
    return REGISTRY[method].step_bench()


def gpu_defaults(method: str) -> dict[str, Any]:
    """The GPU run's shapes for `method`: GPU_DEFAULTS with what its StepBench changes."""
    return {**GPU_DEFAULTS, **bench_of(method).gpu_defaults}


def model_label(size: str, method: str | None = None) -> str:
    """The row's model name; a method's rows carry its StepBench.label, so the README's tables and
    headlines (keyed on model) never mix two methods' rows of the same ViT."""
    return bench_of(method or DEFAULT_METHOD).label + SIZE_LABELS.get(size, size)


# Models ------------------------------------------------------------------------------------------


def setup_config(s: Setup, kernels: str = "reference", **model: Any) -> Config:
    """The config of setup `s`: its shapes, its method's presets at this size (StepBench.overrides)
    and its options (the method's flags), `model` fields on top."""
    tree: dict[str, dict[str, Any]] = {
        "model": {"size": s.size, "patch_size": s.patch_size}, "tokenizer": {"latent_dim": s.latent_dim},
        "objective": {"method": s.method}, "data": {"img_size": s.img_size, "batch_size": s.batch},
        "engine": {"kernels": kernels, "steps": 1}}
    for key, value in {**bench_of(s.method).overrides(s.size), **s.options}.items():
        sec, _, name = key.partition(".")
        tree.setdefault(sec, {})[name] = value
    tree["model"].update(model)
    return Config.from_dict(tree)


def random_tokenizer(patch_size: int, latent_dim: int, seed: int = 0) -> Tokenizer:
    """An orthonormal basis with the PCA tokenizer's shapes: the step's cost does not depend on
    which basis it is, and fitting a real one would measure the fit, not the step."""
    D = 3 * patch_size**2
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    evals = torch.linspace(1.0, 1e-3, D, dtype=torch.float64)
    return tokenizer_from_state({"basis": q.t().contiguous().float(), "mean": torch.zeros(D),
                                 "eigenvalues": evals.float()},
                                {"kind": "pca", "patch_size": patch_size, "latent_dim": latent_dim})


# The micro-batch from the card's memory -----------------------------------------------------------

# 'auto': the comparison batch, the largest every variant of the four fits (eager math attention
# is the hungriest), so (a)-(d) share one batch and their ratios exist; 'max': the largest (d) fits.
MEMORY_BATCHES = ("auto", "max")
MAX_BATCH = 256
MEMORY_FRACTION = 0.85  # of total_memory: the caching allocator's slack and the CUDA context
# Saved activations per token per block, in units of the width, under bf16 autocast with a float32
# residual stream: ~40 w bytes (the paper analysis of issue 26: ~65 GB at ViT-1/2L, micro-batch
# 256). Math attention (variants a, b) adds the scores, float32, saved with their softmax and
# its bf16 copy: ~12 bytes per score per head. Estimates, to be replaced by a GPU's peak memory.
ACT_BYTES_PER_TOKEN_WIDTH = 40
MATH_ATTN_BYTES_PER_SCORE = 12
_MATH_ATTN = ("a", "b")


def _param_count(s: Setup) -> int:
    """Our network's parameters at these shapes, built on the meta device (no memory, no init)."""
    cfg = setup_config(s)
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


def estimated_memory_bytes(s: Setup, variant: str, params: int | None = None) -> float:
    """Peak memory of one training step of `variant` at s.batch: float32 weights, gradients and two
    AdamW moments (16 bytes a parameter) plus the saved activations (see the constants above)."""
    cfg = setup_config(s)
    m, n = cfg.model, bench_of(s.method).tokens(cfg)
    blocks = m.encoder_depth + m.decoder_depth
    per_image = blocks * n * m.width * ACT_BYTES_PER_TOKEN_WIDTH
    if variant in _MATH_ATTN:
        per_image += blocks * m.num_heads * n * n * MATH_ATTN_BYTES_PER_SCORE
    return 16.0 * (params if params is not None else _param_count(s)) + s.batch * per_image


def memory_batch(rule: str, s: Setup, total_bytes: float) -> int:
    """The largest power of two <= MAX_BATCH whose estimate fits MEMORY_FRACTION of total_bytes
    (at least 1): for every one of (a)-(d) with 'auto', for (d) with 'max'."""
    variants = ("a", "b", "c", "d") if rule == "auto" else ("d",)
    params = _param_count(s)
    b = MAX_BATCH
    while b > 1:
        t = Setup(**{**s.__dict__, "batch": b})
        if all(estimated_memory_bytes(t, v, params) <= MEMORY_FRACTION * total_bytes for v in variants):
            break
        b //= 2
    return b


def resolve_batch(batch: int | str, s: Setup, smoke: bool) -> tuple[int, str]:
    """A plan's batch (a number, 'auto' or 'max') -> (micro-batch, how it was chosen)."""
    if isinstance(batch, int):
        return batch, ""
    if smoke or s.device.type != "cuda":
        b = int(CPU_SMOKE["batch_sizes"]) * (2 if batch == "max" else 1)
        return b, f"{batch}: toy batch on CPU"
    total = torch.cuda.get_device_properties(s.device).total_memory
    b = memory_batch(batch, Setup(**{**s.__dict__, "batch": 1}), total)
    return b, (f"{batch}: {b} from {total / 2**30:.1f} GiB total memory (estimate, "
               f"{MEMORY_FRACTION:g} of it; bench/train_step.py memory_batch)")


# One measured configuration ----------------------------------------------------------------------


@dataclass
class Setup:
    size: str
    batch: int
    img_size: int
    patch_size: int
    latent_dim: int
    device: torch.device
    amp: torch.dtype | None
    warmup: int
    steps: int
    method: str = ""
    """'' : the first registered method (l-DAE)."""
    options: dict[str, Any] | None = None
    """'section.field' -> value, set by the method's flags (None: their defaults)."""

    def __post_init__(self) -> None:
        self.method = self.method or DEFAULT_METHOD
        if self.options is None:
            self.options = {f.key: f.default for f in bench_of(self.method).flags.values()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_kernels_choice() -> tuple[str, str]:
    """Variant (d) on CPU: the Triton kernels only where the interpreter can run them."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from ldae_fast.kernels import triton_available
            if triton_available():
                return "triton", "CPU: Triton kernels in the interpreter (TRITON_INTERPRET=1)"
        except ImportError:
            pass
        return "reference", "CPU: triton not importable, reference objective"
    return "reference", "CPU without TRITON_INTERPRET=1: reference objective instead of Triton"


def build_variant(key: str, s: Setup, compile_backend: str = "inductor"
                  ) -> tuple[nn.Module, Method, torch.optim.Optimizer, Callable, dict]:
    """Model, objective, optimizer and the step function of one variant, plus row facts."""
    v = VARIANTS[key]
    info: dict[str, Any] = {"kernels": v["kernels"], "attn": v["attn"], "compile": v["compile"], "note": ""}
    kernels = v["kernels"]
    if kernels == "triton" and s.device.type != "cuda":
        kernels, info["note"] = _cpu_kernels_choice()
    attn = v["attn"] if v["attn"] not in ("timm",) else "auto"
    if attn == "auto" and not v["peer"]:
        info["attn"] = f"auto ({resolve_backend('auto')})"
    bench = bench_of(s.method)
    cfg = setup_config(s, kernels, attn_backend=attn, fused_adaln=v.get("fused_adaln", False),
                       grad_checkpointing=v.get("ckpt", False),
                       **v.get("model", {}))  # the variant's speed switches (plain model.* fields)
    if v["peer"]:
        if bench.peer is None:
            raise PeerNotApplicable(f"n/a: no timm peer of {REGISTRY[s.method].title} here")
        model, flops = bench.peer(cfg)
        fused = all(getattr(b.attn, "fused_attn", False) for b in model.blocks)
        info["attn"] = "timm fused SDPA" if fused else "timm math (fused_attn off)"
    else:
        model, flops = build_model(cfg, kernels=kernels), REGISTRY[s.method].train_flops(cfg)
    model = model.to(s.device).train()
    info["fwd_flops_per_image"], info["train_flops_per_image"] = flops
    info["train_gflop"] = _sig(info["train_flops_per_image"] / 1e9, 4)
    info["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    objective = build_method(cfg, s.device,
                             tokenizer=random_tokenizer(s.patch_size, s.latent_dim) if bench.tokenizer else None)
    info["kernels"] = objective.kernels

    if v.get("stepgraph"):
        check_cuda_graphs([next(model.parameters())])
        # Captured optimizer steps read lr and the step count on the device.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True, capturable=True)
    elif v["ours_optim"]:
        opt = build_adamw(model, cfg, lr=1e-4)
    else:
        # What a user writes first: defaults (foreach on CUDA), no parameter groups.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    info["optimizer"] = "AdamW " + ("fused" if opt.defaults.get("fused") else
                                    "foreach" if s.device.type == "cuda" else "default")

    forward: Callable = model
    if v["compile"] == "full":
        forward = torch.compile(model, backend=compile_backend)
        # The objective calls self.loss: an instance attribute puts the compiled loss in its path.
        if hasattr(objective, "loss"):
            objective.loss = torch.compile(objective.loss, backend=compile_backend)
    elif v["compile"] == "blocks":
        mode = v.get("compile_mode", "default")
        info["compiled_blocks"] = compile_blocks(model, backend=compile_backend, mode=mode)
        if mode != "default":
            info["compile"] = f"blocks ({mode})"
    graphs = v.get("compile_mode") in CUDA_GRAPH_MODES
    if v.get("ckpt"):
        info["compile"] = info["compile"] + ", activation ckpt"
    if v.get("fused_adaln"):
        info["kernels"] += " + fused adaLN LN"

    def step(x: torch.Tensor, i: int) -> torch.Tensor:
        # The trainer's own objective call (noise, autocast forward, loss, with their NVTX
        # ranges; the model marks encoder and decoder), then what the engine does after it.
        if graphs:
            mark_step_begin()
        loss = objective(forward, Batch(x), i, autocast_dtype=s.amp)
        with nvtx_range("backward"):
            loss.backward()
        with nvtx_range("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    if v.get("stepgraph"):
        # Timing only: the step's host-side draws (the noise seed of step 0) are frozen into the
        # graph, so every replay draws the same noise; the kernels and bytes are a real step's.
        info["note"] = "timing only: the noise draws repeat at every replay (seeds frozen at capture)"
        eager_step = step
        graphed: dict[str, GraphedStep] = {}

        def step(x: torch.Tensor, i: int) -> torch.Tensor:  # noqa: F811
            if "g" not in graphed:
                graphed["g"] = GraphedStep(lambda xs: eager_step(xs, 0), (x,), warmup=3)
            return graphed["g"](x)

    return model, objective, opt, step, info


def time_steps(step: Callable, x: torch.Tensor, warmup: int, steps: int,
               device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for `steps` steps after `warmup` untimed ones (compilation happens there)."""
    loss = None
    for i in range(warmup):
        loss = step(x, i)
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            loss = step(x, warmup + i)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(x, warmup + i)
        seconds = time.perf_counter() - t0
    return seconds, loss


def _free(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()  # each variant compiles afresh: no cache limits, no dynamic shapes
    except Exception:
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits: smoke runs give tiny TFLOP/s that fixed decimals zero out."""
    return float(f"{x:.{digits}g}")


def _cudagraph_skips() -> int:
    """Inductor's running count of graphs it declined to record as CUDA graphs."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def _measure(key: str, s: Setup, row: dict[str, Any], peak: float | None, profile_dir: Path | None,
             profile_steps: int, compile_backend: str) -> None:
    # A frame of its own: when it raises, its tensors die with the traceback, so an OOM at one
    # batch size does not keep the model alive into the next measurement.
    model, objective, opt, step, info = build_variant(key, s, compile_backend)
    row.update(info)
    g = torch.Generator(device=s.device).manual_seed(1234)
    x = torch.randn(s.batch, 3, s.img_size, s.img_size, device=s.device, generator=g)
    skips = _cudagraph_skips()
    seconds, loss = time_steps(step, x, s.warmup, s.steps, s.device)
    if VARIANTS[key].get("compile_mode") in CUDA_GRAPH_MODES:
        # Inductor falls back to plain launches without a word (a CPU tensor, a mutated input):
        # a vs_d near 1 then says nothing about CUDA graphs.
        row["cudagraph_skips"] = _cudagraph_skips() - skips
    if not math.isfinite(float(loss)):
        row["status"] = "non-finite loss"
    ips = s.batch * s.steps / seconds
    achieved = ips * row["train_flops_per_image"] / 1e12
    row["images_per_s"] = _sig(ips)
    row["step_ms"] = _sig(1e3 * seconds / s.steps)
    row["tflops"] = _sig(achieved)
    row["mfu"] = _sig(achieved / peak, 3) if peak else None
    if s.device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 2)
        # What the caching allocator held: the number to hold against the card's memory.
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(s.device) / 2**30, 2)
    if profile_dir is not None:
        out = profile_dir / f"{s.size}_b{s.batch}_{key}"
        calls = iter(range(10_000, 20_000))
        prof = profile_calls(lambda: step(x, next(calls)), out, profile_steps, wait=1, warmup=1)
        row["profile"] = str(prof.trace_path or out)


def _skipped_row(key: str, s: Setup, status: str) -> dict[str, Any]:
    """The row of a variant that was not measured (time budget, or still running)."""
    return {**_row_ids(key, s), "status": status, "images_per_s": None}


def _row_ids(key: str, s: Setup) -> dict[str, Any]:
    """What a row measured (make_perf_section keys rows on these)."""
    row = {"model": model_label(s.size, s.method), "method": s.method, "size": s.size, "img": s.img_size,
           "patch": s.patch_size, "batch": s.batch}
    try:
        row.update(bench_of(s.method).row(setup_config(s)))
    except ConfigError as e:  # the row of a setup the config refuses still says what it was
        row["note"] = str(e)
    row.update(variant=key, variant_name=VARIANTS[key]["name"],
               precision="bf16" if s.amp == torch.bfloat16 else "fp32")
    return row


_clock = time.monotonic


def run_variant(key: str, s: Setup, peak: float | None, profile_dir: Path | None = None,
                profile_steps: int = 3, compile_backend: str = "inductor") -> dict[str, Any]:
    """One row: measure variant `key` at setup `s`; failures become the row's status."""
    row: dict[str, Any] = {
        **_row_ids(key, s), "status": "ok",
        "images_per_s": None, "step_ms": None, "tflops": None, "mfu": None, "peak_mem_gib": None,
        "peak_reserved_gib": None,
    }
    _free(s.device)
    error: str | None = None
    try:
        _measure(key, s, row, peak, profile_dir, profile_steps, compile_backend)
    except PeerNotApplicable as e:
        error = str(e)
    except Exception as e:  # a failing variant is a result, not the end of the benchmark
        error = results_io.failure_status(e)
    if error is not None:
        row["status"] = error
        for k in ("images_per_s", "step_ms", "tflops", "mfu", "peak_mem_gib", "peak_reserved_gib"):
            row[k] = None
    _free(s.device)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's throughput relative to variants a/b/c/d of the same method, model and batch (same run)."""
    def ident(r: dict[str, Any]) -> tuple:
        return (r.get("method"), r["size"], r.get("img"), r.get("mask_ratio"), r["batch"])

    by_key = {(*ident(r), r["variant"]): r for r in rows}
    for r in rows:
        for other in ("a", "b", "c", "d"):
            o = by_key.get((*ident(r), other))
            ok = (o is not None and o.get("images_per_s") and r.get("images_per_s"))
            r[f"vs_{other}"] = _sig(r["images_per_s"] / o["images_per_s"], 4) if ok else None


# Targets (issue 26): judged here, on the rows of this run, never in a test ---------------------------

TARGETS = (
    # (what, variant, row key, at least)
    ("(d) MFU >= 0.55 (1,100 img/s on an H200 at ViT-1/2L)", "d", "mfu", 0.55),
    ("(d) >= 2x eager (a)", "d", "vs_a", 2.0),
    ("(d) >= 1.25x torch.compile (b)", "d", "vs_b", 1.25),
    ("(d) >= 1.25x timm blocks (c)", "d", "vs_c", 1.25),
    ("FP8 linears >= 1.3x the bf16 step (d)", "d+fp8", "vs_d", 1.3),
)


def _judged(row: dict[str, Any]) -> bool:
    """A row of a method whose StepBench is judged against TARGETS (a row without a method is one
    of the first method's, as rows were written before they named it)."""
    method = row.get("method") or DEFAULT_METHOD
    return method in REGISTRY and bench_of(method).targets


def judge_targets(rows: list[dict[str, Any]], smoke: bool = False) -> list[dict[str, Any]]:
    """Each target against the best measured row of its variant (ratios come from the same run):
    'met', 'not met', 'not measured' (no such row ran, or it failed), or on a CPU smoke run
    'not judged' (toy sizes say nothing about a GPU)."""
    out = []
    for what, variant, key, least in TARGETS:
        vals = [r[key] for r in rows if r.get("variant") == variant and _judged(r)
                and r.get("status") == "ok" and r.get(key) is not None]
        best = max(vals) if vals else None
        status = ("not judged: a CPU smoke run" if smoke else "not measured" if best is None
                  else "met" if best >= least else "not met")
        out.append({"target": what, "variant": variant, "value": best, "at_least": least, "status": status})
    return out


# Command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    others = [m for m in METHODS if m != DEFAULT_METHOD]

    def per_method(key: str) -> str:
        return "; ".join(f"{m} {gpu_defaults(m)[key]}" for m in others)

    ap.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                    help="the method whose training step is measured (default %(default)s; see above)")
    # Each method's own flags (StepBench.flags), each setting one of its config fields.
    flags: dict[str, list[tuple[str, Any]]] = {}
    for m in METHODS:
        for dest, flag in bench_of(m).flags.items():
            flags.setdefault(dest, []).append((m, flag))
    for dest, owners in flags.items():
        first = owners[0][1]
        said = "; ".join(f"{m}: {f.key}, default {f.default}" for m, f in owners)
        ap.add_argument(f"--{dest.replace('_', '-')}", dest=dest, default=None, choices=first.choices or None,
                        type=type(first.default), help=f"{first.help} ({said})")
    ap.add_argument("--sizes", help=f"model sizes, comma-separated (GPU default {GPU_DEFAULTS['sizes']}; "
                                    f"{per_method('sizes')})")
    ap.add_argument("--batch-sizes", help=f"micro-batch sizes (GPU default {GPU_DEFAULTS['batch_sizes']}; "
                                          f"{per_method('batch_sizes')})")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, from {', '.join(VARIANTS)}; 'ablations' = {','.join(ABLATIONS)}; "
                         f"'switches' = {','.join(SWITCHES)} (default "
                         + "; ".join(f"{m} {bench_of(m).variants}" for m in METHODS) + ")")
    ap.add_argument("--plan", default=None, metavar="B:V,V;B:V",
                    help="micro-batches and the variants at each, run in the order written, e.g. "
                         "'128:a,c,d;256:d;128:b' (instead of --batch-sizes x --variants)")
    ap.add_argument("--append", action="store_true",
                    help="with --json: keep the rows FILE already holds and add this run's (one process "
                         "per variant, each under its own time limit, into one file)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no variant once this many seconds have passed: the rest become rows "
                         "with status 'skipped: time budget'")
    ap.add_argument("--img-size", type=int, help=f"image side (GPU default {GPU_DEFAULTS['img_size']}; "
                                                 f"{per_method('img_size')})")
    ap.add_argument("--patch-size", type=int, help="patch size (GPU default 16)")
    ap.add_argument("--latent-dim", type=int, help="PCA latent dim d (GPU default 128)")
    ap.add_argument("--warmup", type=int, help="untimed steps first, compilation included (GPU default 5)")
    ap.add_argument("--steps", type=int, help="timed steps (GPU default 20)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="autocast for every variant: auto = bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--peak-tflops", type=float,
                    help="peak TFLOP/s for MFU (default: bf16 dense peak of the GPU from the table)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="toy run on CPU (tiny model, img 32, patch 4, batch 4, 2 timed steps, unless "
                         "flags say otherwise); automatic without CUDA")
    ap.add_argument("--profile", nargs="?", const="runs/profile/train_step", default=None, metavar="DIR",
                    help="after timing, write a torch.profiler trace of variant (d) under DIR")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps recorded by --profile")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of variants (b) and (d); 'aot_eager' or 'eager' make a CPU "
                         "smoke run skip code generation")
    results_io.add_output_flags(ap, "write results for a CPU smoke run too")
    ap.add_argument("--name", default="train_step", help="results name passed to results_io")
    args = ap.parse_args(argv)
    # The chosen method's flags take its defaults; another method's flag given is a usage error.
    mine = bench_of(args.method).flags
    for dest in flags:
        if dest in mine and getattr(args, dest) is None:
            setattr(args, dest, mine[dest].default)
        elif dest not in mine and getattr(args, dest) is not None:
            ap.error(f"--{dest.replace('_', '-')} is not a flag of --method {args.method}")
    return args


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """'section.field' -> value of the chosen method's flags."""
    return {f.key: getattr(args, dest) for dest, f in bench_of(args.method).flags.items()}


def command_line(argv: list[str] | None) -> str:
    """The reproducing command; TRITON_INTERPRET is part of it because it picks (d)'s kernels."""
    args = sys.argv[1:] if argv is None else list(argv)
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return env + results_io.command_line([str(Path(__file__).resolve()), *args])


def resolve(args: argparse.Namespace) -> tuple[dict[str, Any], torch.device, bool]:
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    base = CPU_SMOKE if smoke else gpu_defaults(args.method)
    # Flags given override the defaults on CPU too (a bigger toy), so nothing asked is ignored.
    vals = {k: (getattr(args, k) if getattr(args, k) is not None else d) for k, d in base.items()}
    for k in ("img_size", "patch_size", "latent_dim", "steps"):
        if int(vals[k]) < 1:
            raise SystemExit(f"--{k.replace('_', '-')}={vals[k]} must be >= 1")
    if int(vals["warmup"]) < 0:
        raise SystemExit(f"--warmup={vals['warmup']} must be >= 0")
    try:
        bad = [b for b in str(vals["batch_sizes"]).split(",") if b.strip() and int(b) < 1]
    except ValueError:
        raise SystemExit(f"--batch-sizes={vals['batch_sizes']!r}: comma-separated integers") from None
    if bad:
        raise SystemExit(f"--batch-sizes: {', '.join(bad)} must be >= 1")
    # The method's flags are config fields: the config says what is wrong with them, named by flag.
    try:
        setup_config(Setup(size="tiny", batch=1, img_size=int(vals["img_size"]), patch_size=int(vals["patch_size"]),
                           latent_dim=int(vals["latent_dim"]), device=torch.device("cpu"), amp=None, warmup=0,
                           steps=1, method=args.method, options=method_options(args)))
    except ConfigError as e:
        named = [f"--{d.replace('_', '-')}={getattr(args, d)}" for d, f in bench_of(args.method).flags.items()
                 if f.key in str(e)] or [f"--method {args.method}"]
        raise SystemExit(f"{' '.join(named)}: {e}") from None
    return vals, torch.device("cpu" if smoke else "cuda"), smoke


def _variant_list(text: str) -> list[str]:
    keys: list[str] = []
    for v in (v.strip() for v in text.split(",")):
        for key in (ABLATIONS if v == "ablations" else SWITCHES if v == "switches" else (v,) if v else ()):
            if key not in keys:
                keys.append(key)
    bad = [v for v in keys if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return keys


def resolve_plan(args: argparse.Namespace, vals: dict[str, Any]) -> list[tuple[int | str, list[str]]]:
    """[(micro-batch, variants)] in the order they run: --plan as written, else every batch of
    --batch-sizes with every variant of --variants."""
    if args.plan is None:
        keys = _variant_list(args.variants or bench_of(args.method).variants)
        return [(int(b), keys) for b in str(vals["batch_sizes"]).split(",") if b.strip()]
    if args.variants is not None or args.batch_sizes is not None:
        raise SystemExit("--plan names the batches and variants: drop --batch-sizes / --variants")
    plan = []
    for group in (g.strip() for g in args.plan.replace(" ", ";").split(";")):
        if not group:
            continue
        batch, sep, keys = group.partition(":")
        b: int | str
        try:
            b = int(batch)
        except ValueError:
            b = batch.strip() if batch.strip() in MEMORY_BATCHES else 0
        if not sep or b in (0,) or (isinstance(b, int) and b < 1) or not keys.strip():
            raise SystemExit(f"--plan group {group!r}: write BATCH:VARIANT,VARIANT with BATCH >= 1, "
                             f"or {' / '.join(MEMORY_BATCHES)} (from the card's memory)")
        plan.append((b, _variant_list(keys)))
    if not plan:
        raise SystemExit("--plan is empty")
    return plan


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


TABLE_COLUMNS = ("model", "batch", "mask_ratio", "decoder_kind", "decoder", "variant", "variant_name", "status",
                 "train_gflop", "images_per_s", "tflops", "mfu", "peak_mem_gib", "peak_reserved_gib", "vs_a", "vs_b", "vs_c", "vs_d",
                 "kernels", "attn", "compile", "cudagraph_skips", "optimizer", "note")


def table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in TABLE_COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def run(argv: list[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Parse, measure every (size, batch, variant), print; returns (rows, meta)."""
    args = parse_args(argv)
    vals, device, smoke = resolve(args)
    cmd = command_line(argv)
    plan = resolve_plan(args, vals)
    variants: list[str] = []
    for _, keys in plan:
        variants += [k for k in keys if k not in variants]
    sizes = [s.strip() for s in str(vals["sizes"]).split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZE_LABELS]
    if bad:
        raise SystemExit(f"unknown size(s) {bad}; choose from {', '.join(SIZE_LABELS)}")
    if args.precision == "auto":
        amp = torch.bfloat16 if device.type == "cuda" else None
    else:
        amp = torch.bfloat16 if args.precision == "bf16" else None

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        peak, peak_src = peak_tflops_for(gpu)
    else:
        peak, peak_src = None, "none on CPU (pass --peak-tflops for an MFU)"
    if device.type == "cuda":
        # TF32 for the float32 leftovers of every variant alike (timm's train script does the same).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    print(f"reproduce: {cmd}")
    print(f"device: {gpu}; precision: {'bf16 autocast' if amp else 'fp32'}; "
          f"peak: {f'{peak:g} TFLOP/s bf16 dense' if peak else 'n/a'} ({peak_src})")
    bench, options = bench_of(args.method), method_options(args)
    print(f"method: {args.method}" + "".join(f", {k}={v}" for k, v in options.items()))
    print(f"FLOPs: {bench.flop_count}")
    if smoke:
        print(f"CPU smoke run ({'--cpu-smoke' if args.cpu_smoke else 'no CUDA device'}): toy sizes, "
              "timings are not performance numbers")

    setup_kw = dict(img_size=vals["img_size"], patch_size=vals["patch_size"], latent_dim=vals["latent_dim"],
                    device=device, amp=amp, warmup=vals["warmup"], steps=vals["steps"], method=args.method,
                    options=options)
    profile_dir = Path(args.profile) if args.profile else None
    meta = {
        "benchmark": "train_step", "method": args.method, "device": gpu, "smoke": smoke,
        "precision": "bf16 autocast" if amp else "fp32", "tf32": device.type == "cuda",
        "peak_tflops": peak, "peak_source": peak_src,
        "flop_count": bench.flop_count,
        # the method's flags, by the name its rows use ({'mask_ratio': 0.75}, {'layout': 'dit'})
        **{key.partition(".")[2]: value for key, value in options.items()},
        "img_size": vals["img_size"], "patch_size": vals["patch_size"], "latent_dim": vals["latent_dim"],
        "warmup_steps": vals["warmup"], "timed_steps": vals["steps"],
        "timing": "CUDA events around the timed steps" if device.type == "cuda" else "time.perf_counter",
        "compile_backend": args.compile_backend,
        "variants": {k: VARIANTS[k]["name"] for k in variants}, "command": cmd,
        "plan": ";".join(f"{b}:{','.join(keys)}" for b, keys in plan), "budget_s": args.budget_s,
    }
    # Rewritten after every row: a run stopped by a lent GPU's time limit keeps what it measured.
    prior: dict[str, Any] = {}
    if args.append and args.json and Path(args.json).exists():
        # One process per variant (gpu_check.sh gives each its own time limit) into one file:
        # the earlier variants' rows stay, and the ratios span them all.
        prior = results_io.load_results(args.json)
    results = None
    if not args.no_write and (not smoke or args.write or args.json):
        results = results_io.ResultsFile(args.name, meta, out_dir=args.out_dir, json_path=args.json)
    rows: list[dict[str, Any]] = list(prior.get("rows", []))
    if results is not None and rows:
        results.meta["commands"] = prior["meta"].get("commands", [prior["meta"].get("command")]) + [cmd]
        results.set_rows(rows)
    t0 = _clock()
    for size in sizes:
        for plan_batch, keys in plan:
            batch, rule = resolve_batch(plan_batch, Setup(size=size, batch=1, **setup_kw), smoke)
            s = Setup(size=size, batch=batch, **setup_kw)
            for key in keys:
                if any(r["size"] == size and r["batch"] == batch and r["variant"] == key
                       and r.get("status") == "ok" for r in rows):
                    print(f"  {size} b{batch} ({key}): measured above ('{plan_batch}' gives the same batch)")
                    continue
                if args.budget_s is not None and _clock() - t0 > args.budget_s:
                    rows.append(_skipped_row(key, s, f"skipped: time budget (--budget-s {args.budget_s:g})"))
                    print(f"  {rows[-1]['model']:>8} b{batch:<4} ({key}) {rows[-1]['status']}", flush=True)
                    if results is not None:
                        results.set_rows(rows)
                    continue
                if results is not None:
                    # On disk while it runs: a run killed at a lent GPU's limit says where it stopped.
                    results.set_rows(rows + [_skipped_row(key, s, "unfinished: the run stopped in this variant")])
                row = run_variant(key, s, peak, profile_dir if key == "d" else None, args.profile_steps,
                                  args.compile_backend)
                if row["status"] == "OOM" and rule and batch > 1:
                    # The memory rule is an estimate: one more try at half the batch, both rows kept.
                    rows.append(dict(row, batch_rule=rule))
                    s = Setup(size=size, batch=batch // 2, **setup_kw)
                    rule = f"{plan_batch}: halved after an OOM at {batch}"
                    row = run_variant(key, s, peak, profile_dir if key == "d" else None, args.profile_steps,
                                      args.compile_backend)
                if rule:
                    row["batch_rule"] = rule
                rows.append(row)
                print(f"  {row['model']:>8} b{batch:<4} ({key}) {row['variant_name']:<10} {row['status']:<8} "
                      f"{_fmt(row['images_per_s'])} img/s  {_fmt(row['tflops'])} TFLOP/s  "
                      f"MFU {_fmt(row['mfu'])}  mem {_fmt(row['peak_mem_gib'])} GiB", flush=True)
                if results is not None:
                    add_ratios(rows)
                    results.set_rows(rows)
    add_ratios(rows)
    print()
    print(table(rows))
    if bench.targets:
        meta["targets"] = judge_targets(rows, smoke)
        print("\ntargets (issue 26; smoke runs on CPU are not performance numbers):")
        for t in meta["targets"]:
            print(f"  {t['status']:<12} {t['target']}: {_fmt(t['value'])}")
    if results is not None:
        results.meta["targets"] = meta.get("targets")
        results.set_rows(rows)
        meta["results"] = [str(p) for p in results.close() if p is not None]
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    rows, meta = run(argv)
    if meta.get("results"):
        print(f"results: {' and '.join(meta['results'])}")
    elif meta["smoke"]:
        print("\n(CPU smoke run: nothing written; --write to write it anyway)")
    print(f"reproduce: {meta['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
