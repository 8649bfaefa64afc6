#!/usr/bin/env bash
# Every GPU measurement of issue 9 (speed, NLL/FID drift under bf16/tf32, FID feature options, bf16 attention),
# prepared for a lent GPU machine that gets 15 minutes of device time per session and 64 MiB per call.
#
# The FID Inception weights (95.7 MB) do not fit in one call beside the CIFAR-10 archive, so the work is two calls,
# the second issued right after the first (the machine goes back after ~30 s idle; files outside the checkout stay
# on it while it is warm):
#
#   here:      tools/gpu_session.sh bundle         # fills .gpu/ (git-ignored): weights split in two, wheels, CIFAR
#   device 1:  carry [.gpu/part_a, .gpu/wheels]               command: bash tools/gpu_session.sh one 330
#   device 2:  carry [.gpu/part_b, .gpu/wheels, .gpu/cifar10] command: bash tools/gpu_session.sh two 390
#   (timeout_s of each call: its budget + 30; both calls ~12 min with start-up: no room for a rerun in one
#   session, but every step is bounded and leaves its results, so a later session reruns only what is missing)
#   here:      tools/gpu_session.sh dry-run         # CPU rehearsal of both calls at toy sizes (~6 min on 2 cores)
#
# Call one: bench/bench_gpu.py (training and evaluation speed of both CIFAR-10 UNets, the forward matrix, the
# GroupNorm+SiLU fusion check), then the GPU tests, then with what is left bench/bench_head_sampling.py (a head
# method's sampling cost against analytic_ddpm), within BUDGET seconds. Call two, in priority order, each step
# under a deadline from BUDGET: train a short CIFAR-10 model with train.py; bench/bench_precision.py (NLL per method
# and K, and FID of the same seeds, in fp32 / tf32 / bf16 / bf16-attn); bench/bench_fid.py features (Inception speed
# and FID on the CIFAR-10 reference for each feature option); a bf16-attention loss-curve A/B of two short runs.
# Everything lands in $OUT (the device tool returns it); a step that fails or runs out of time is recorded in
# $OUT/steps.tsv and the next step still runs. Without the first call's half of the weights (machine given back in
# between) the FID steps are skipped and said so.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=(bash "$ROOT/tools/gpu_session.sh")          # (the copy on the device may lack the executable bit)
BUNDLE=${ADPM_GPU_BUNDLE:-$ROOT/.gpu}
STAGE=${ADPM_GPU_STAGE:-/tmp/adpm_gpu}          # outside the checkout: survives between calls while warm
OUT=${OUT:-$ROOT/outputs/gpu_session}
PY=${PY:-python3}
TINY=${ADPM_GPU_TINY:-0}                        # 1: toy sizes on a CPU (dry-run)
SHARED=${ADPM_SHARED:-$ROOT/../shared}
WEIGHTS=${ADPM_FID_WEIGHTS:-$ROOT/weights/pt_inception-2015-12-05.pth}
WEIGHTS_SHA256=271346ea5b8be269317dbc6dfb4c2abb7055140fbf63071818a2ab372acd760b
SPLIT_BYTES=58000000                            # part_a: 55.3 MiB (+ code, wheels < 64 MiB); part_b the rest
WHEELS="hydra_core-*.whl omegaconf-*.whl antlr4_python3_runtime-*.whl torch_fidelity-*.whl"
START=$(date +%s)

say() { echo "[gpu_session $(( $(date +%s) - START ))s] $*" >&2; }
die() { echo "error: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------------------------ here: bundle
bundle() {
    [ -f "$WEIGHTS" ] || die "no FID weights at $WEIGHTS: run 'make fid-weights' first"
    [ -d "$SHARED/wheels-gpu" ] || die "no $SHARED/wheels-gpu (set ADPM_SHARED=...)"
    [ -f "$SHARED/data/cifar10/jpeg_q75.npz" ] || die "no $SHARED/data/cifar10/jpeg_q75.npz"
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/cifar10"
    head -c "$SPLIT_BYTES" "$WEIGHTS" > "$BUNDLE/part_a"
    tail -c +"$((SPLIT_BYTES + 1))" "$WEIGHTS" > "$BUNDLE/part_b"
    (cd "$SHARED/wheels-gpu" && cp $WHEELS "$BUNDLE/wheels/") || die "a wheel of: $WHEELS is missing"
    cp "$SHARED/data/cifar10/jpeg_q75.npz" "$BUNDLE/cifar10/"
    cat "$BUNDLE/part_a" "$BUNDLE/part_b" | sha256sum | grep -q "$WEIGHTS_SHA256" \
        || say "warning: the weights are not the recorded converted file (FID will not compare to 3.116)"
    du -sh "$BUNDLE"/* >&2
    say "bundle ready: call one carries .gpu/part_a .gpu/wheels; call two carries .gpu/part_b .gpu/wheels .gpu/cifar10"
}

# ------------------------------------------------------------------------------------------------ device: both calls
setup_env() {
    mkdir -p "$OUT" "$STAGE"
    if ! "$PY" -c "import hydra, omegaconf, torch_fidelity" 2>/dev/null; then
        ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1 || die "hydra/torch-fidelity missing and no wheels in $BUNDLE/wheels"
        "$PY" -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$STAGE/site" "$BUNDLE"/wheels/*.whl \
            || die "installing the wheels failed"
        export PYTHONPATH="$STAGE/site:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$ROOT/src:${PYTHONPATH:-}"
    export WANDB_MODE=offline HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
    "$PY" - <<'EOF' > "$OUT/environment.txt" 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    printf 'step\tstatus\tseconds\tnote\n' > "$OUT/steps.tsv.tmp"; [ -f "$OUT/steps.tsv" ] || mv "$OUT/steps.tsv.tmp" "$OUT/steps.tsv"
    rm -f "$OUT/steps.tsv.tmp"
}

# step NAME SECONDS CMD...: run CMD with a time limit (never past the budget), log to $OUT/NAME.log, record status
step() {
    local name=$1 want=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 20 ]; then
        say "$name: skipped (budget: ${left}s left)"; printf '%s\tskipped\t0\tbudget\n' "$name" >> "$OUT/steps.tsv"; return 1
    fi
    local limit=$(( want < left ? want : left )) t0 rc
    t0=$(date +%s)
    say "$name: start (limit ${limit}s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local status=ok; [ $rc -eq 0 ] || status="rc=$rc"; [ $rc -eq 124 ] && status="timeout"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$*" >> "$OUT/steps.tsv"
    say "$name: $status in $(( $(date +%s) - t0 ))s"; tail -n 25 "$OUT/$name.log" >&2
    return $rc
}

call_one() {
    local budget=${1:-330}
    DEADLINE=$(( START + budget ))
    setup_env
    if [ -f "$BUNDLE/part_a" ]; then cp "$BUNDLE/part_a" "$STAGE/part_a"; say "staged part_a of the FID weights"; fi
    local tiny=(); [ "$TINY" = 1 ] && tiny=(--tiny --compile-cpu)
    # bench_gpu stops starting sections at its own budget; the step's limit adds room for the section in flight
    step bench_gpu $(( budget - 70 )) "$PY" "$ROOT/bench/bench_gpu.py" "${tiny[@]}" --out "$OUT/bench_gpu.json" \
        --budget-s $(( budget - 130 ))
    [ "$TINY" = 1 ] || step test_gpu 70 "$PY" -m pytest -q -m gpu -p no:cacheprovider "$ROOT/tests/test_gpu.py"
    # issue 17: a covariance-head method's sampling cost against analytic_ddpm (goal: within 5%), CIFAR-10 UNet,
    # the authors' simple head and the complex one; whatever budget is left
    local hs=(--device cuda --net cifar10 --K 10 100 --batch 250 --repeat 3)
    [ "$TINY" = 1 ] && hs=(--device cpu --net small --K 2 --batch 2 --repeat 1)
    for mode in simple complex; do
        step "head_sampling_$mode" 45 "$PY" "$ROOT/bench/bench_head_sampling.py" "${hs[@]}" --mode "$mode" \
            --out "$OUT/head_sampling_$mode.json"
    done
}

train_short() {  # train_short RUN_DIR STEPS [overrides...]: train.py on the CIFAR-10 JPEG copy, Gamma at the end
    local run_dir=$1 steps=$2; shift 2
    local size=(model=unet_cifar10_ddpm data.decode_workers=16 callbacks.gamma_calibration.num_samples=20)
    [ "$TINY" = 1 ] && size=(model=unet_tiny trainer=cpu data.batch_size=16 data.decode_workers=2 diffusion.N=100
                             callbacks.gamma_calibration.num_samples=2 callbacks.gamma_calibration.nll_images=4
                             "callbacks.gamma_calibration.nll_K=[10]")
    local per_epoch=$(( steps < 300 ? steps : 300 ))
    "$PY" "$ROOT/train.py" experiment=cifar10_ls "${size[@]}" data=image_folder data.train_dir="$STAGE/cifar/train" \
        data.test_dir="$STAGE/cifar/test" data.cache_dir="$STAGE/cifar_cache" \
        trainer.max_steps="$steps" trainer.limit_train_batches="$per_epoch" trainer.log_every_n_steps=10 \
        trainer.enable_progress_bar=false module.lr=2e-4 module.ema_decay=0.999 module.ema_warmup=true \
        module.compile=false callbacks.gamma_calibration.every_n_epochs=0 callbacks.gamma_calibration.plots=false \
        callbacks.gamma_calibration.progress=false callbacks.model_checkpoint.every_n_epochs=1000 logger=csv \
        hydra.run.dir="$run_dir" "$@"
}

call_two() {
    local budget=${1:-390}
    DEADLINE=$(( START + budget ))
    setup_env
    local fid_weights="" ckpt="$STAGE/train/checkpoints/last.ckpt"
    if [ -f "$STAGE/part_a" ] && [ -f "$BUNDLE/part_b" ]; then
        cat "$STAGE/part_a" "$BUNDLE/part_b" > "$STAGE/inception.pth"
        if sha256sum "$STAGE/inception.pth" | grep -q "$WEIGHTS_SHA256"; then fid_weights="$STAGE/inception.pth"
        else say "the reassembled FID weights have another sha256: FID steps use them but will say so"; fid_weights="$STAGE/inception.pth"; fi
    else
        say "FID weights incomplete (part_a from call one is gone: was the machine given back?): FID steps skipped"
        printf 'fid_weights\tmissing\t0\tpart_a not staged\n' >> "$OUT/steps.tsv"
    fi
    local limit=(); [ "$TINY" = 1 ] && limit=(--limit 600)
    [ -d "$STAGE/cifar/train" ] || "$PY" "$ROOT/tools/unpack_cifar_npz.py" "$BUNDLE/cifar10/jpeg_q75.npz" \
        "$STAGE/cifar" "${limit[@]}" || die "cannot unpack CIFAR-10"

    local steps=${ADPM_TRAIN_STEPS:-1000}; [ "$TINY" = 1 ] && steps=20
    step train 200 "${SELF[@]}" train-short "$STAGE/train" "$steps"
    cp "$STAGE"/train/csv/*/metrics.csv "$OUT/train_metrics.csv" 2>/dev/null
    cp "$STAGE"/train/gamma/*.json "$OUT/" 2>/dev/null

    if [ -f "$ckpt" ]; then
        local sizes=(--device cuda --nll-images 1000 --K 10,100 --fid-samples 5000 --fid-K 10 --fid-seeds 3
                     --inception-rate 2288)
        [ "$TINY" = 1 ] && sizes=(--device cpu --nll-images 8 --K 2,4 --fid-samples 16 --fid-K 2 --fid-seeds 2
                                  --reference-images 32)
        local fid=(--fid-weights "$fid_weights" --reference-cache "$STAGE/fid_reference")
        [ -n "$fid_weights" ] || fid=(--no-fid)
        step precision 240 "$PY" "$ROOT/bench/bench_precision.py" --ckpt "$ckpt" "${sizes[@]}" "${fid[@]}" \
            --out "$OUT/precision.json" --budget-s $(( DEADLINE - $(date +%s) - 150 ))
    else
        printf 'precision\tskipped\t0\tno checkpoint\n' >> "$OUT/steps.tsv"
    fi

    if [ -n "$fid_weights" ]; then
        local n=(--n-test 10000 --n-train 50000 --device cuda)
        [ "$TINY" = 1 ] && n=(--n-test 24 --n-train 24 --device cpu --variants fp32:12,bf16:12,fp32+cl:12)
        step fid_features 150 "$PY" "$ROOT/bench/bench_fid.py" features --data "$BUNDLE/cifar10/jpeg_q75.npz" \
            --weights "$fid_weights" "${n[@]}" --out "$OUT/fid_features.json" \
            --budget-s $(( DEADLINE - $(date +%s) - 90 ))
    fi


    # bf16 attention: the same short run (same seed, same data order) with the attention in fp32 and in bf16
    local ab=${ADPM_AB_STEPS:-300}; [ "$TINY" = 1 ] && ab=50  # the CSV has a loss every 10 steps
    step attention_a 90 "${SELF[@]}" train-short "$STAGE/attn_fp32" "$ab" trainer.precision=bf16-mixed \
        callbacks.gamma_calibration.at_fit_end=false && \
    step attention_b 90 "${SELF[@]}" train-short "$STAGE/attn_bf16" "$ab" trainer.precision=bf16-mixed \
        callbacks.gamma_calibration.at_fit_end=false module.attention_float32=false && \
    step attention_ab 30 "$PY" "$ROOT/tools/compare_loss_curves.py" "$STAGE"/attn_fp32/csv/*/metrics.csv \
        "$STAGE"/attn_bf16/csv/*/metrics.csv --labels "attention fp32,attention bf16" --out "$OUT/attention_ab.json"
    say "done: $OUT"
}

case "${1:-help}" in
    bundle) bundle ;;
    one) shift; call_one "$@" ;;
    two) shift; call_two "$@" ;;
    train-short) shift; train_short "$@" ;;   # (used by call two under `timeout`, which cannot run a function)
    dry-run)
        # both calls on this machine at toy sizes, with a bundle in a scratch folder: checks the plumbing only
        scratch=$(mktemp -d)
        export ADPM_GPU_BUNDLE=$scratch/bundle ADPM_GPU_STAGE=$scratch/stage OUT=${OUT_DRY:-$scratch/out} ADPM_GPU_TINY=1
        "${SELF[@]}" bundle && "${SELF[@]}" one 200 && "${SELF[@]}" two 600
        rc=$?
        echo "dry run: rc=$rc, results in $OUT" >&2; cat "$OUT/steps.tsv" >&2
        exit $rc ;;
    *) sed -n '2,25p' "$0"; exit 2 ;;
esac
