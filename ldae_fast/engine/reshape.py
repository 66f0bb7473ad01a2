"""Resume on another run shape: rank count R, micro-batch b, accumulation a.

A step is one global batch G = b x a x R, and every random draw of the objective is keyed on
(seed, step, row of the global batch), rows numbered (micro x R + rank) x b + i. The indexed data
sources place sample p of an epoch's permutation on row p mod G of step p div G, whatever the split
(data/placement.py). So a checkpoint written with (R, b, a) continues with (R', b', a') of the same
G on the same samples, rows and noise: only the order of the gradient sums changes. The model and
optimizer state is whole in every checkpoint (the single-device format; DeepSpeed gathers its ZeRO
partitions into it, engine/zero_state.py), so it loads into any backend on any rank count:
single device <-> ddp <-> ZeRO 1-3. DeepSpeed on the rank count and stage that wrote a checkpoint
reads its own sharded files instead.

With another global batch the step numbers and the learning-rate schedule mean something else;
`engine.resume_rebatch=true` then continues from the images seen: step = images // G', the
schedule of the new global batch, the data where the old ranks stopped. The log says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import ResumeMismatch
from . import guard


@dataclass
class ResumePlan:
    old: tuple[int, int, int]  # (micro-batch, accumulation, ranks) of the run that wrote it
    new: tuple[int, int, int]
    step: int  # the step this run continues from
    note: str = ""  # what the log says about a changed shape ('' when unchanged)

    @property
    def moved(self) -> bool:
        return self.old != self.new

    def data_state(self, state: dict, rank: int) -> dict:
        """The data position this rank loads: its own when the rank count is unchanged (the shard
        readers keep per-rank positions), else rank 0's, which with the old shape says how much
        of the epoch every rank consumed (the indexed sources re-split the rest). Shard readers
        also get every old reader's position, in reader order (`slot_positions`): with another
        rank or worker count they re-split what the old readers left (data/shard_layout.py)."""
        b0, _, r0 = self.old
        per_rank = state.get("data_ranks")
        if per_rank and len(per_rank) == self.new[2] and r0 == self.new[2]:
            sd = dict(per_rank[rank])
        else:
            sd = dict(per_rank[0] if per_rank else state["data"])
        sd.setdefault("world_size", r0)
        sd.setdefault("batch_size", b0)
        if per_rank and all("positions" in d for d in per_rank):
            sd["slot_positions"] = [list(p) for d in per_rank for p in d["positions"]]
        return sd


def _split(b: int, a: int, r: int) -> str:
    return f"micro-batch {b} x accumulation {a} x {r} rank{'s' if r != 1 else ''} = {b * a * r}"


def plan_resume(state: dict, ckpt_dir: Path, cfg: Config, world: int) -> ResumePlan:
    """Check that `state` can continue as `cfg` on `world` ranks; how (ResumePlan), or exit 7
    (ResumeMismatch) naming what would be needed."""
    saved = state.get("config") or {}
    s_data, s_eng = saved.get("data") or {}, saved.get("engine") or {}
    new = (cfg.data.batch_size, cfg.engine.grad_accum, world)
    old = (int(s_data.get("batch_size") or new[0]), int(s_eng.get("grad_accum") or new[1]),
           int(state.get("world_size") or new[2]))
    step = int(state.get("step", 0))
    shape = guard.model_shape_diff(saved, cfg)
    if shape:
        raise ResumeMismatch(f"{ckpt_dir} holds another model ({', '.join(shape)}): a resume keeps the "
                             "model's shape; start a new run (a new out_dir) to train another one, or "
                             "resume with the saved model.* fields (its config.json)")
    was_ds, is_ds = s_eng.get("backend") == "deepspeed", cfg.engine.backend == "deepspeed"
    stage = s_eng.get("zero_stage", cfg.engine.zero_stage)
    ds_native = is_ds and old[2] == world and stage == cfg.engine.zero_stage
    whole = state.get("model") is not None and state.get("optimizer") is not None
    if was_ds and not ds_native and not whole:
        to = (f"engine.backend={cfg.engine.backend}" + (f" zero_stage {cfg.engine.zero_stage}" if is_ds else "")
              + f" on {world} rank{'s' if world != 1 else ''}")
        raise ResumeMismatch(
            f"{ckpt_dir} cannot be resumed as {to}: it holds DeepSpeed ZeRO-{stage} state sharded over "
            f"{old[2]} ranks without the whole model and optimizer state (written with "
            "engine.ckpt_consolidated=false, or by an older version); resume it with engine.backend=deepspeed, "
            f"zero_stage {stage} on {old[2]} ranks (micro-batch and accumulation may change), or start a new "
            "run from its exported weights")
    g0, g = old[0] * old[1] * old[2], new[0] * new[1] * new[2]
    if old == new:
        return ResumePlan(old, new, step)
    if g0 != g and not cfg.engine.resume_rebatch:
        diff = [f"{k} {o} -> {n}" for k, o, n in zip(("data.batch_size", "engine.grad_accum", "ranks"), old, new)
                if o != n]
        raise ResumeMismatch(
            f"{ckpt_dir} cannot be resumed as configured ({', '.join(diff)}): the global batch changes "
            f"({_split(*old)} -> {_split(*new)}), and step numbers and the learning-rate schedule count "
            f"global batches. Keep data.batch_size x engine.grad_accum x ranks = {g0}, or pass "
            "--engine.resume_rebatch=true to continue from the images seen with the new batch's schedule")
    note = f"resuming on another shape: {_split(*old)} -> {_split(*new)}"
    if g0 == g:
        note += (f"; the same global batch, so the same samples, rows and noise per step from step {step} "
                 "(the rest of the interrupted epoch re-split over the new ranks, none twice, none skipped)")
        return ResumePlan(old, new, step, note)
    images = step * g0
    new_step = images // g
    note += (f"; engine.resume_rebatch: {images} images seen = step {step} of the old global batch -> "
             f"step {new_step} of the new one ({images - new_step * g} images short of a whole step); "
             f"learning rate and schedule now those of global batch {g}")
    return ResumePlan(old, new, new_step, note)


__all__ = ["ResumePlan", "plan_resume"]
