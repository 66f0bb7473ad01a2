#!/usr/bin/env bash
# The GPU proof in ONE device command: a lent H100 (80 GB) or H200 (141 GB) gives about 15 minutes
# in all (machine start, one command of at most 10 minutes, transfers), so what the issue's targets
# need runs here in stages, most important first, each under its own time limit, within 540 s of
# the start. Every stage writes its file into $OUT as it goes: a command stopped at the limit still
# returns what it measured. At most 8 files come back, and these are all it leaves there:
#   env.json         GPU, driver, torch/triton/CUDA versions, commit, date, the command; one row per
#                    stage (status, seconds, its limit, test counts, rows written)
#   train_step.json  bench/train_step.py at the paper's shapes: ViT-1/2L, layout 'dit' (256 tokens,
#                    no class token), d = 32, bf16; one process per variant, appended to this file
#   kernels.json     bench/kernels.py --quick: d = 32 first, then d = 128; bytes as each kernel
#                    moves them (the row says how many passes), GB/s against a copy of the same run
#   tests.log        the GPU tests that matter first (a chosen subset)
#   learn.json       bench/learn_check.py (pretrained vs random-init on real data)
#   diffmae_step.json bench/train_step.py --method diffmae: ViT-L at 224 px, 75% masked, the
#                    presets' cross_self decoder, top-down wired deepest first (FLOPs in the rows)
#   profile.md       the top-kernel table of (d), if time is left
#   gpu_check.log    everything this script printed, ending with bench/make_perf_section.py over
#                    the files above (kept in a scratch folder after each stage, printed at the end;
#                    `make_perf_section.py --results-dir FILES_AT` rebuilds it from the files)
#
# Here, after the last commit (copies 5 train + 1 val Tiny ImageNet shards, about 42 MB, into gpu-data/; fetches
# wheels into .whl/ only if the GPU image lacks a package; checks what travels fits 64 MiB; records
# the commit and prints the device call with it filled in):
#   bench/gpu_check.sh --prepare
# The device call (the tool `run`; the commit is the one --prepare prints):
#   run(command="LDAE_GIT_COMMIT=<commit> bash bench/gpu_check.sh",
#       carry=["gpu-data"], timeout_s=570)
# Back here, with the folder the files came back in (files_at):
#   .venv/bin/python bench/results_io.py import FILES_AT
#   .venv/bin/python bench/make_perf_section.py --update-readme
# Before it, the same stages through the same code at toy size on CPU (the kernels in the Triton
# interpreter, the tiny model, learn_check --toy on one shard), files into $OUT or a temp folder:
#   bench/gpu_check.sh --rehearse
# --dry-run (with or without --rehearse) prints each stage's command and runs nothing.
#
# Stages and limits on the GPU (seconds; a cold machine: Triton and inductor compile everything,
# into one cache folder every stage shares, so later stages and the tests find the kernels built):
#   env       20   nvidia-smi, versions, commit, date, command -> env.json
#   train_d   85   (d) ours at micro-batch 'auto' (the largest all four variants fit by the memory
#                  estimate of bench/train_step.py: 64 on an H100, 128 on an H200), then at 'max'
#                  (the largest (d) fits: 256) if that differs and started within 55 s
#   train_a   40   (a) eager at 'auto'
#   train_c   40   (c) the timm-block peer at 'auto'
#   train_b   85   (b) torch.compile'd at 'auto' (its whole-model compile is the slow part): its
#                  limit is 85 s or what the four train slots' 250 s leave, whichever is more
#   kernels   50   bench/kernels.py --quick: d = 32 then d = 128, B 256, fp32 and bf16 images;
#                  adaLN at T 256, C 1024; the torch.compile baseline only in the first 15 s
#   tests     35   LDAE_GPU_TESTS=1 pytest, a chosen subset: the kernels against float64 at the
#                  training shapes, the attention backends, the speed switches
#   learn    rest  bench/learn_check.py on gpu-data (5 train shards, 1 val): pretraining budget
#                  min(150, time left - 110 - 90) s, but never under min(75, time left - 110) s
#                  (the 90 s kept for diffmae give way first), the limit 100 s above it (decode,
#                  calibration, kNN and probe of the pretrained and 3 random-init encoders)
#   diffmae   90   bench/train_step.py --method diffmae, ViT-L, cross_self decoder read top-down
#                  (diffmae.decoder_topdown=deepest_first, the DiffMAE presets'): (d), (a) at
#                  micro-batch 256, no variant started after 55 s; if 45 s are left
#   profile  rest  (d) at 'auto' under the profiler, if 60 s are left: the top-kernel table
#   switches rest  (d) with one speed switch on each (bf16 residual, SDPA cuDNN, the whole step
#                  as a CUDA graph, fused adaLN with bf16 output), appended to train_step.json
#                  with vs_d, if 75 s are left; no variant started in the last 40 s
# The limits of the stages before the learning run add up to 355 s, so it gets at least 75 s of
# pretraining even if every earlier stage runs into its limit (diffmae is then skipped), and
# 150 s when they end 165 s sooner than that (the first 90 s of that margin are diffmae's).
# Each train variant runs in its own process under its own limit (a compile that hangs costs its
# slot, not the next variant's); all append to train_step.json, whose ratios span them.
# A stage that runs into its limit gets SIGINT (pytest then prints its summary), SIGKILL 5 s later.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

MODE=gpu
DRY=0
for arg in "$@"; do
    case "$arg" in
    --prepare) MODE=prepare ;;
    --rehearse) MODE=rehearse ;;
    --dry-run) DRY=1 ;;
    -h | --help)
        sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "gpu_check.sh: unknown argument '$arg' (--prepare, --rehearse, --dry-run; see its header)" >&2
        exit 2
        ;;
    esac
done

if [ "$MODE" = gpu ]; then
    PY=${PYTHON:-python3}
elif [ -x .venv/bin/python ]; then
    PY=${PYTHON:-.venv/bin/python}
else
    PY=${PYTHON:-python3}
fi
GPU_DATA=${LDAE_GPU_DATA:-gpu-data}
TRAIN_SHARDS=5
VAL_SHARDS=1
CARRY_LIMIT=${LDAE_CARRY_LIMIT_BYTES:-67108864} # the device tool's 64 MiB for all that travels
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# --prepare ---------------------------------------------------------------------------------------

prepare() {
    local src=${LDAE_SHARDS_SRC:-../shared/data/tinyimagenet-wds}
    local want=() f i
    for ((i = 0; i < TRAIN_SHARDS; i++)); do want+=("$(printf 'train-%06d.tar.gz' "$i")"); done
    for ((i = 0; i < VAL_SHARDS; i++)); do want+=("$(printf 'val-%06d.tar.gz' "$i")"); done
    [ -f "$src/SHA256SUMS" ] || { echo "gpu_check --prepare: $src/SHA256SUMS missing (see ../shared/data/README.md)" >&2; return 1; }
    src=$(cd "$src" && pwd)
    rm -rf "$GPU_DATA"
    mkdir -p "$GPU_DATA"
    : >"$GPU_DATA/SHA256SUMS"
    for f in "${want[@]}"; do
        [ -f "$src/$f" ] || { echo "gpu_check --prepare: shard $src/$f missing" >&2; return 1; }
        grep -E "^[0-9a-f]{64} [ *]?$f\$" "$src/SHA256SUMS" >>"$GPU_DATA/SHA256SUMS" \
            || { echo "gpu_check --prepare: $f has no line in $src/SHA256SUMS" >&2; return 1; }
        cp "$src/$f" "$GPU_DATA/$f"
    done
    [ -f "$src/classes.tsv" ] && cp "$src/classes.tsv" "$GPU_DATA/"
    (cd "$GPU_DATA" && sha256sum --quiet -c SHA256SUMS) || { echo "gpu_check --prepare: copied shards fail their checksums" >&2; return 1; }

    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit-dirty"
    echo "$commit" >"$GPU_DATA/COMMIT"
    {
        echo "# gpu_check --prepare, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit: the learning stage's shards"
        echo "# from $src (name, bytes, sha256)"
        for f in "${want[@]}"; do
            echo "$f $(stat -c %s "$GPU_DATA/$f") $(grep -E " [ *]?$f\$" "$GPU_DATA/SHA256SUMS" | cut -c1-64)"
        done
    } >"$GPU_DATA/SOURCE.txt"
    echo "took from $src: ${want[*]}"

    # The GPU image's packages (the device README's KINDS.md); a missing one travels as a wheel.
    local kinds=${LDAE_DEVICE_KINDS:-/work/.library/device/KINDS.md} need=() carry='"gpu-data"' have p
    if [ -r "$kinds" ]; then
        have=$(grep -o 'Packages: .*' "$kinds" | head -n 1 | sed 's/^Packages: //; s/\.$//' | tr ',' '\n' | sed 's/^ *//')
        for p in torch triton numpy pillow safetensors timm pytest; do
            grep -qx "$p" <<<"$have" || need+=("$p")
        done
        echo "GPU image (from $kinds): ${need[*]:-nothing} missing of torch triton numpy pillow safetensors timm pytest"
    else
        echo "GPU image's package list not readable ($kinds): no wheels fetched"
    fi
    if [ ${#need[@]} -gt 0 ]; then
        rm -rf .whl
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "${need[@]}" || { echo "gpu_check --prepare: could not fetch wheels for ${need[*]}" >&2; return 1; }
        carry='"gpu-data", ".whl"'
    fi

    # What the device tool sends: tracked and untracked-not-ignored files, plus the carried folders.
    local tree data whl=0 total
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
    data=$(du -sb "$GPU_DATA" | cut -f1)
    [ ${#need[@]} -gt 0 ] && whl=$(du -sb .whl | cut -f1)
    total=$((tree + data + whl))
    echo "travels: tree $(mib "$tree") + $GPU_DATA $(mib "$data") + .whl $(mib "$whl") = $(mib "$total") of $(mib "$CARRY_LIMIT")"
    if [ "$total" -gt "$CARRY_LIMIT" ]; then
        echo "gpu_check --prepare: $(mib "$total") is over the $(mib "$CARRY_LIMIT") the device tool carries; removed $GPU_DATA (take fewer shards)" >&2
        rm -rf "$GPU_DATA"
        return 1
    fi
    echo "device call:"
    echo "  run(command=\"LDAE_GIT_COMMIT=$commit bash bench/gpu_check.sh\", carry=[$carry], timeout_s=570)"
}

if [ "$MODE" = prepare ]; then
    prepare
    exit $?
fi

# The stages -------------------------------------------------------------------------------------

if [ "$MODE" = gpu ]; then
    TOTAL=${GPU_CHECK_TOTAL_S:-540}
    OUT_DIR=${OUT:-$PWD/gpu-out}
    if [ -z "${LDAE_GIT_COMMIT:-}" ] && [ -f "$GPU_DATA/COMMIT" ]; then
        LDAE_GIT_COMMIT="$(cat "$GPU_DATA/COMMIT") (from $GPU_DATA/COMMIT)"
    fi
    DATA_DIR=$GPU_DATA
    TESTS=(env LDAE_GPU_TESTS=1 "$PY" -m pytest -v -p no:cacheprovider
        tests/test_gpu_check.py::test_kernel_matches_reference_at_real_shape
        tests/test_attention.py tests/test_speed_switches.py)
    KERNELS=("$PY" bench/kernels.py --quick --budget-s 15)
    TRAIN=("$PY" bench/train_step.py --sizes halfL --warmup 3 --steps 10)
    TRAIN_PLANS=("auto:d;max:d" "auto:a" "auto:c" "auto:b")
    TRAIN_D_START=55
    LEARN=("$PY" bench/learn_check.py --data-dir "$DATA_DIR" --train-shards "$TRAIN_SHARDS"
        --val-shards "$VAL_SHARDS")
    PROFILE=("$PY" bench/train_step.py --sizes halfL --plan auto:d --warmup 3 --steps 3
        --profile-steps 3)
    DIFFMAE=("$PY" bench/train_step.py --method diffmae --sizes L --decoder-kind cross_self
        --decoder-topdown deepest_first --plan "256:d,a" --warmup 3 --steps 10)
    # Cold compiles are most of the train and test stages: one cache for every stage.
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/ldae-gpu-check/triton}
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ldae-gpu-check/inductor}
    LIMIT_ENV=20 LIMIT_TESTS=35 LIMIT_KERNELS=50 LIMIT_TRAIN="85 40 40 85" TRAIN_TOTAL=250
    LEARN_MAX=150 LEARN_MIN=30 LEARN_EXTRA=100
    LEARN_KEEP=75 DIFFMAE_RESERVE=90 LIMIT_DIFFMAE=90 DIFFMAE_MIN=45 DIFFMAE_TAIL=35
    PROFILE_MIN=60
    SWITCHES=("$PY" bench/train_step.py --sizes halfL --plan "auto:d+bf16res,d+cudnn,d+adaln-act,d+stepgraph"
        --warmup 3 --steps 10)
    SWITCHES_MIN=75 SWITCHES_TAIL=40
else
    # Toy sizes on CPU through the same scripts and files; the Triton kernels run interpreted.
    # One thread: at toy sizes a second one only adds OpenMP hand-offs on a shared machine.
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    TOTAL=${GPU_CHECK_TOTAL_S:-600}
    if [ -n "${OUT:-}" ]; then
        OUT_DIR=$OUT
    elif [ "$DRY" = 1 ]; then
        OUT_DIR=${TMPDIR:-/tmp}/gpu_check_rehearsal.DRY-RUN
    else
        OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_rehearsal.XXXXXX")
    fi
    DATA_DIR=$GPU_DATA
    ls "$DATA_DIR"/train-*.tar* >/dev/null 2>&1 || DATA_DIR=../shared/data/tinyimagenet-wds
    TESTS=("$PY" -m pytest -v -p no:cacheprovider
        tests/test_gpu_check.py::test_kernel_matches_reference_at_real_shape
        tests/test_attention.py tests/test_speed_switches.py -k "real_shape or backend or switch")
    KERNELS=("$PY" bench/kernels.py --cpu-smoke --quick --compile-backend eager --budget-s 30)
    TRAIN=("$PY" bench/train_step.py --cpu-smoke --compile-backend eager)
    TRAIN_PLANS=("auto:d;max:d" "auto:a" "auto:c" "auto:b")
    TRAIN_D_START=60
    LEARN=("$PY" bench/learn_check.py --toy --data-dir "$DATA_DIR" --train-shards 1 --val-shards 1)
    PROFILE=("$PY" bench/train_step.py --cpu-smoke --compile-backend eager --plan auto:d --warmup 0 --steps 1
        --profile-steps 1)
    DIFFMAE=("$PY" bench/train_step.py --method diffmae --cpu-smoke --compile-backend eager
        --decoder-kind cross_self --decoder-topdown deepest_first --plan "4:d,a")
    LIMIT_ENV=60 LIMIT_TESTS=150 LIMIT_KERNELS=120 LIMIT_TRAIN="90 60 60 60" TRAIN_TOTAL=270
    LEARN_MAX=10 LEARN_MIN=5 LEARN_EXTRA=140
    LEARN_KEEP=10 DIFFMAE_RESERVE=0 LIMIT_DIFFMAE=90 DIFFMAE_MIN=20 DIFFMAE_TAIL=30
    PROFILE_MIN=30
    SWITCHES=("$PY" bench/train_step.py --cpu-smoke --compile-backend eager --plan "auto:d+bf16res,d+stepgraph")
    SWITCHES_MIN=20 SWITCHES_TAIL=10
fi
[ -n "${LDAE_GIT_COMMIT:-}" ] || LDAE_GIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "")
export LDAE_GIT_COMMIT
COMMAND="${LDAE_GIT_COMMIT:+LDAE_GIT_COMMIT=${LDAE_GIT_COMMIT%% *} }bash bench/gpu_check.sh${*:+ $*}"
KEEP=" env.json train_step.json kernels.json tests.log learn.json diffmae_step.json profile.md gpu_check.log "
SCRATCH=${TMPDIR:-/tmp}/gpu_check.$$
START=$SECONDS
FAILED=0

quoted() { # the words as a shell would need them typed
    local out=() a
    for a in "$@"; do out+=("$(printf '%q' "$a")"); done
    echo "${out[*]}"
}

left() { echo $((TOTAL - (SECONDS - START))); }

within() { # within WANT: WANT seconds, or what is left before the deadline (at least 1)
    local l
    l=$(($(left) - 5))
    if [ "$l" -lt "$1" ]; then echo $((l > 1 ? l : 1)); else echo "$1"; fi
}

record() { # record STAGE ARGS...: a row of env.json (results_io.py gpu-stage)
    "$PY" bench/results_io.py gpu-stage "$OUT_DIR/env.json" --stage "$@" || true
}

tidy() { # only the files that come back stay in $OUT; the rest moves to $SCRATCH
    local p
    for p in "$OUT_DIR"/* "$OUT_DIR"/.[!.]*; do
        [ -e "$p" ] || continue
        case "$KEEP" in *" ${p##*/} "*) [ -f "$p" ] && continue ;; esac
        mkdir -p "$SCRATCH/extra"
        echo "moved ${p##*/} out of \$OUT (only 8 files come back): $SCRATCH/extra/"
        mv "$p" "$SCRATCH/extra/"
    done
}

summarize() {
    # Kept out of $OUT (8 files come back, and it is rebuilt from them); printed at the end.
    [ "$DRY" = 1 ] && return 0
    "$PY" bench/make_perf_section.py --results-dir "$OUT_DIR" --include-cpu --all >"$SCRATCH/summary.md.tmp" 2>/dev/null \
        && mv "$SCRATCH/summary.md.tmp" "$SCRATCH/summary.md"
}

stage() { # stage NAME LIMIT FILE LOG CMD...: run CMD under LIMIT, record its row, refresh the summary
    local name=$1 limit=$2 file=$3 log=$4 rc t0 extra=()
    shift 4
    echo "=== [$((SECONDS - START)) s] stage $name (limit $limit s): $(quoted "$@")"
    [ "$DRY" = 1 ] && return 0
    t0=$SECONDS
    if [ "$log" != - ]; then
        # The log alone holds the output; the last lines are echoed for the device tool's tail.
        timeout -s INT -k 5 "$limit" "$@" >"$OUT_DIR/$log" 2>&1
        rc=$?
        tail -n 12 "$OUT_DIR/$log"
        extra+=(--log "$log")
    else
        timeout -s INT -k 5 "$limit" "$@" 2>&1
        rc=$?
    fi
    [ "$file" != - ] && extra+=(--file "$file")
    [ "$rc" -eq 0 ] || FAILED=1
    echo "=== [$((SECONDS - START)) s] stage $name: exit $rc after $((SECONDS - t0)) s"
    record "$name" --rc "$rc" --seconds "$((SECONDS - t0))" --limit-s "$limit" "${extra[@]}"
    tidy
    summarize
    return "$rc"
}

skip() { # skip NAME STATUS: a stage that did not run
    echo "=== [$((SECONDS - START)) s] stage $1: $2"
    [ "$DRY" = 1 ] && return 0
    [ "$2" = "${2#skipped}" ] && FAILED=1
    record "$1" --status "$2"
    summarize
}

run_stages() {
    echo "gpu_check ($MODE): $COMMAND"
    echo "out: $OUT_DIR; data: $DATA_DIR; deadline $TOTAL s"
    if [ "$DRY" = 0 ]; then
        mkdir -p "$SCRATCH"
        [ "$MODE" = gpu ] && timeout 20 nvidia-smi
    fi
    stage env "$LIMIT_ENV" - - "$PY" bench/results_io.py gpu-env "$OUT_DIR/env.json" --command "$COMMAND" \
        --mode "$MODE" --data-dir "$DATA_DIR"
    # The step at the paper's shapes: each variant its own process and its own slot; (b) last,
    # with whatever the slots before it left unused.
    local limits=($LIMIT_TRAIN) t_train=$SECONDS i key lim
    for i in "${!TRAIN_PLANS[@]}"; do
        key=${TRAIN_PLANS[$i]%%;*}
        key=${key#*:}
        lim=${limits[$i]}
        if [ "$i" -eq $((${#TRAIN_PLANS[@]} - 1)) ] && [ "$DRY" = 0 ]; then
            lim=$((TRAIN_TOTAL - (SECONDS - t_train)))
            [ "$lim" -lt "${limits[$i]}" ] && lim=${limits[$i]}
        fi
        stage "train_$key" "$(within "$lim")" train_step.json - "${TRAIN[@]}" --plan "${TRAIN_PLANS[$i]}" \
            --budget-s "$TRAIN_D_START" --append --json "$OUT_DIR/train_step.json"
    done
    stage kernels "$(within "$LIMIT_KERNELS")" kernels.json - "${KERNELS[@]}" --json "$OUT_DIR/kernels.json"
    stage tests "$(within "$LIMIT_TESTS")" - tests.log "${TESTS[@]}"

    local budget keep
    budget=$(($(left) - LEARN_EXTRA - 10 - DIFFMAE_RESERVE))
    if [ "$budget" -lt "$LEARN_KEEP" ]; then # the DiffMAE stage's reserve gives way first
        keep=$(($(left) - LEARN_EXTRA - 10))
        budget=$((keep < LEARN_KEEP ? keep : LEARN_KEEP))
    fi
    [ "$budget" -gt "$LEARN_MAX" ] && budget=$LEARN_MAX
    [ "$budget" -lt "$LEARN_MIN" ] && budget=$LEARN_MIN
    if [ ! -f bench/learn_check.py ]; then
        skip learn "failed: bench/learn_check.py is not in this tree (it would run: $(quoted "${LEARN[@]}" --budget-s "$budget" --out "$OUT_DIR/learn.json" --device auto))"
    elif [ "$DRY" = 0 ] && ! ls "$DATA_DIR"/train-*.tar* >/dev/null 2>&1; then
        skip learn "failed: no train-*.tar* shards in $DATA_DIR (run bench/gpu_check.sh --prepare and carry it)"
    else
        stage learn "$(within $((budget + LEARN_EXTRA)))" learn.json - "${LEARN[@]}" --budget-s "$budget" \
            --out "$OUT_DIR/learn.json" --device auto
    fi

    if [ "$(left)" -ge "$DIFFMAE_MIN" ] || [ "$DRY" = 1 ]; then
        local dlimit
        dlimit=$(within "$LIMIT_DIFFMAE")
        stage diffmae "$dlimit" diffmae_step.json - "${DIFFMAE[@]}" \
            --budget-s "$((dlimit > DIFFMAE_TAIL + 1 ? dlimit - DIFFMAE_TAIL : 1))" --json "$OUT_DIR/diffmae_step.json"
    else
        skip diffmae "skipped: $(left) s left, under the $DIFFMAE_MIN s it needs"
    fi

    if [ "$(left)" -ge "$PROFILE_MIN" ] || [ "$DRY" = 1 ]; then
        local t0=$SECONDS table
        if stage profile "$(within "$(left)")" - - "${PROFILE[@]}" --no-write --profile "$SCRATCH/profile" \
            && [ "$DRY" = 0 ]; then
            table=$(ls "$SCRATCH"/profile/*/profile_top_kernels.md 2>/dev/null | head -n 1)
            if [ -n "$table" ]; then
                cp "$table" "$OUT_DIR/profile.md"
            else
                FAILED=1
                record profile --status "failed: exit 0 but no profile_top_kernels.md written" \
                    --seconds "$((SECONDS - t0))"
            fi
        fi
    else
        skip profile "skipped: $(left) s left, under the $PROFILE_MIN s it needs"
    fi
    # Last, with what is left: (d) with one speed switch on each, against (d) above (vs_d).
    if [ "$(left)" -ge "$SWITCHES_MIN" ] || [ "$DRY" = 1 ]; then
        local slimit
        slimit=$(within "$(left)")
        stage switches "$slimit" train_step.json - "${SWITCHES[@]}" --append --json "$OUT_DIR/train_step.json" \
            --budget-s "$((slimit > SWITCHES_TAIL + 1 ? slimit - SWITCHES_TAIL : 1))"
    else
        skip switches "skipped: $(left) s left, under the $SWITCHES_MIN s it needs"
    fi
    [ "$DRY" = 1 ] && return 0
    record "" --done
    summarize
    tidy
    echo "=== [$((SECONDS - START)) s] done; files in $OUT_DIR:"
    ls -la "$OUT_DIR"
    [ -f "$SCRATCH/summary.md" ] && cat "$SCRATCH/summary.md"
    rm -rf "$SCRATCH/profile" "$SCRATCH/summary.md"
    rmdir "$SCRATCH" 2>/dev/null # kept when it holds files moved out of $OUT
    return $FAILED
}

if [ "$DRY" = 1 ]; then
    run_stages
    exit 0
fi
mkdir -p "$OUT_DIR"
run_stages 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
