#!/usr/bin/env bash
# The long plan, for a device lease of more than one command: a
# session's GPU checks in stages that each fit one 10-minute command. With one command, run
# bench/gpu_check.sh instead (the proof of every headline figure; bench/README.md, "The GPU
# proof"); these stages add ViT-B and ViT-L, the ablations of (d), the profile and DeepSpeed.
# Run them in the order below, a few per command, and stop when time runs out.
#
# Here, once, before the first device command (builds / downloads the wheels that machine lacks):
#   bench/gpu_session.sh wheels
# On the GPU machine (the device tool runs commands in a copy of this repository; carry .whl),
# one command each, most important first (estimates, not measurements: each command starts with
# cold Triton and inductor caches, and every train_step variant compiles afresh):
#   bench/gpu_session.sh tests                  # results and logs go to $OUT (else ./gpu-out)
#   bench/gpu_session.sh halfL
#   bench/gpu_session.sh kernels
#   bench/gpu_session.sh ablations
#   bench/gpu_session.sh B
#   bench/gpu_session.sh deepspeed profile
# Every benchmark rewrites its JSON after each row, so a command killed at its limit still
# returns what it measured (meta.complete = false).
# At most 8 files come back per device command: two or three stages per command fit.
# Back here, with the folder the device tool returned the files in:
#   .venv/bin/python bench/results_io.py import FILES_AT        # JSON -> bench/results/ + markdown
#   .venv/bin/python bench/make_perf_section.py --update-readme
#
# Stages:
#   wheels     (here) deepspeed and the packages it needs that the GPU image lacks, into .whl/
#   tests      LDAE_GPU_TESTS=1 pytest: kernels compiled for the GPU against the reference,
#              attention backends, models, the no-host-sync check of the training step
#   kernels    bench/kernels.py, a trimmed grid (d 16 and 128, batch 64 and 256; adaLN at its defaults)
#   halfL      bench/train_step.py, ViT-1/2L (the paper's default): a,b,c,d at micro-batch 128
#              (eager math attention, variant (a), is estimated at ~120 GB at 256: an estimate from
#              saved-tensor sizes, not a measurement), then (d) at 256 (the memory target: it must
#              fit in 80 GB without activation checkpointing)
#   ablations  ViT-1/2L micro-batch 128: (d) and each of its ablations (vs_d)
#   B          ViT-B: a,b,c,d at micro-batch 128, (d) at 256
#   L          ViT-L: a,b,c,d at micro-batch 64, (d) at 128
#   profile    ViT-1/2L micro-batch 128, variant (d) (b128: it runs even if b256 turns out not to
#              fit): only the top-kernel table comes back
#   deepspeed  `deepspeed train.py` on 1 GPU: ZeRO-2, bf16, FusedAdam, a few steps of ViT-B; a
#              functional check (its images/s include the synthetic-image loader, 8 workers)
#
# The commit the copy was made from is not visible there (no .git): pass it as LDAE_GIT_COMMIT
# (e.g. `LDAE_GIT_COMMIT=<git rev-parse --short HEAD> bench/gpu_session.sh ...`) so results record it.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

run() {  # run NAME CMD...: tee the output into $OUT_DIR/NAME.log, remember a failure, go on
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

install_wheels() {
    [ -d .whl ] || { echo "no .whl/ here: run 'bench/gpu_session.sh wheels' locally and carry .whl"; return 1; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"
}

step() {  # step NAME ARGS...: one bench/train_step.py run writing into $OUT_DIR
    local name=$1
    shift
    run "$name" $PY bench/train_step.py --out-dir "$OUT_DIR" "$@"
}

for stage in "$@"; do
    case "$stage" in
    wheels)
        # Afresh: two versions of one package in .whl/ would stop the install on the GPU machine.
        rm -rf .whl
        mkdir -p .whl  # ignored by .gitignore, so it travels only when named in `carry`
        # deepspeed ships only a source archive; its wheel is pure Python (ops build at run time).
        # Pinned: pydantic requires one exact pydantic-core and refuses to import beside another.
        $PY -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 || status=1
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
            typing-inspection==0.4.5 typing-extensions==4.16.0 || status=1
        ls -la .whl
        ;;
    tests)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
        $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
            | tee -a "$OUT_DIR/gpu.txt"
        # Bounded, so a hang leaves time for the stages after it in the same command.
        run tests timeout -k 10 480 env LDAE_GPU_TESTS=1 $PY -m pytest -q -p no:cacheprovider \
            tests/test_kernel_noise.py tests/test_kernel_pca_loss.py tests/test_kernel_adaln_norm.py \
            tests/test_attention.py tests/test_models.py tests/test_objective.py \
            tests/test_engine.py::test_training_step_has_no_cuda_sync
        ;;
    kernels) run kernels $PY bench/kernels.py --dims 16,128 --batch-sizes 64,256 --out-dir "$OUT_DIR" ;;
    halfL)
        step halfL_b128 --sizes halfL --batch-sizes 128 --variants a,b,c,d
        step halfL_b256 --sizes halfL --batch-sizes 256 --variants d
        ;;
    ablations) step ablations --sizes halfL --batch-sizes 128 --variants d,ablations ;;
    B)
        step B_b128 --sizes B --batch-sizes 128 --variants a,b,c,d
        step B_b256 --sizes B --batch-sizes 256 --variants d
        ;;
    L)
        step L_b64 --sizes L --batch-sizes 64 --variants a,b,c,d
        step L_b128 --sizes L --batch-sizes 128 --variants d
        ;;
    profile)
        # Traces are large (and TensorBoard's copy sits too deep to come back): keep them here.
        rm -rf /tmp/ldae-profile
        step profile --sizes halfL --batch-sizes 128 --variants d --no-write --profile /tmp/ldae-profile
        cp /tmp/ldae-profile/*/profile_top_kernels.md "$OUT_DIR/profile_top_kernels.md" 2>/dev/null
        ;;
    deepspeed)
        install_wheels || { status=1; continue; }
        rm -rf /tmp/ds_run
        run deepspeed deepspeed --num_gpus 1 train.py --preset demo --model.size=B --model.patch_size=16 \
            --data.img_size=256 --data.batch_size=64 --data.synthetic_images=1024 --tokenizer.latent_dim=128 \
            --tokenizer.fit_images=256 --engine.backend=deepspeed --engine.zero_stage=2 --engine.steps=20 \
            --optim.blr=1.5e-4 --engine.log_every=5 --eval.probe=false --eval.figure=false \
            --data.num_workers=8 --out /tmp/ds_run
        # Outside $OUT: checkpoints are large, and a run killed at the limit must not fill the
        # 8 files that come back.
        cp /tmp/ds_run/metrics.jsonl "$OUT_DIR/deepspeed_metrics.jsonl" 2>/dev/null
        rm -rf /tmp/ds_run
        ;;
    *)
        echo "unknown stage '$stage'; see the header of $0"
        status=1
        ;;
    esac
done
# At most 8 files come back from a device command: the JSON files carry everything the markdown
# tables hold (results_io.py import rebuilds them), so the markdown copies give their slots up.
if [ -n "${OUT:-}" ]; then
    find "$OUT_DIR" -maxdepth 1 -name '*.md' ! -name 'profile_top_kernels.md' -delete
fi
ls -la "$OUT_DIR"
exit $status
