#!/usr/bin/env bash
# The evidence grids of docs/RESULTS.md: Fashion-MNIST at 1,000 and 5,000 images trained to convergence, with
# noisy labels, long-tailed, with the learned and saliency-guided mixing methods, with token mixing on a small ViT,
# adversarially trained; the MaxUp score/temperature choice on a validation split; language modelling on a KJV
# subset that overfits.
#
#   scripts/evidence.sh                      # every grid, one after the other, runs/evidence/<grid>
#   GRIDS="fm1k lm" JOBS=4 scripts/evidence.sh
#   GRIDS="fm1k_noise40s fm5k_lt100" JOBS=2 scripts/evidence.sh   # two CPU cores: one run per core
#   LIMIT=400 scripts/evidence.sh            # stop training after 400 s, then report the finished runs
#   scripts/evidence.sh --list               # the grids' options and methods, one line each
#
# Environment: PY (python, default python3), RUNS (output root, default runs/evidence), FM (Fashion-MNIST IDX
# folder, default: the loader's standard location), KJV (a corpus folder, default kjv), JOBS (worker processes per
# grid, default 1), METHODS (train only these of the grid's methods first), LIMIT (seconds of training for all
# grids together, default none), PARALLEL=1 runs the grids side by side (on a GPU: several small runs share it).
# Re-running continues: finished runs are reused (--resume).
set -uo pipefail
PY=${PY:-python3}
RUNS=${RUNS:-runs/evidence}
JOBS=${JOBS:-1}
GRIDS=${GRIDS:-"fm1k fm1k_noise40s fm1k_noise40a fm5k_lt100 fm5k_lt10 fm1k_mix fm1k_vit fm1k_adv fm5k fm1k_score lm"}
FM_DIR=${FM:+--data-dir $FM}
KJV=${KJV:-kjv}

# Fashion-MNIST: a ResNet-8 that fits 1,000 or 5,000 images; SGD lr 0.05, cosine decay, weight decay 5e-4; MaxUp
# after a warm-up of 5 epochs of its base augmentation (the paper's schedule). The fm1k* and fm5k_lt* grids run on
# two CPU cores (width 16, batch 64, 40 epochs: ERM fits 1,000 images by epoch 25; the test set evaluated only
# every --eval-every epochs); fm1k takes about two hours, fm1k_mix and fm1k_adv (with its robust evaluation) about
# an hour and a half each, the others 20 to 40 minutes each. fm5k and fm1k_score need a GPU (width 32, batch 128).
FM_DATA="--dataset fashion-mnist $FM_DIR --seeds 3"
FM_ARGS="$FM_DATA --model resnet --model-opt depth=8"
FM_CPU="$FM_ARGS --model-opt width=16 --batch-size 64 --epochs 40"
FM_GPU="$FM_ARGS --model-opt width=32 --batch-size 128"
GRADAUG="gradaug(width_range=(0.8, 1.0), resolutions=(28, 24, 21))"
EMA="ema(decay=0.984)"  # a memory of 64 steps, a tenth of fm1k's 640
fm_methods() {  # $1: MaxUp's warm-up in steps, $2: the epochs of the compute-matched base runs
  local w="maxup(m=4, warmup_steps=$1)"
  echo "erm,cropflip,cutout,mixup,cutmix,$w+cropflip,$w+cutout,$w+cutmix,manifold_mixup,maxup(m=4)+manifold_mixup,sam,sam_mixup,cropflip@epochs=$2,cutout@epochs=$2,cutmix@epochs=$2,bgmix,dgmix,$GRADAUG"
}
# weight averaging beside the main methods (issue: EMA's effect in the converged regime); SWA over the last quarter
FM_AVERAGE="erm+$EMA,cutmix+$EMA,maxup(m=4, warmup_steps=80)+cutmix+$EMA,cutmix+swa(start=30)"
# noisy labels: the stops and the warm-up at the fractions of the schedule the digits grid used (not tuned); the
# bootstrap also with the authors' class-balance term (--reg-term 1.0), their fix for the collapse onto one class
# that the training accuracy showed (10%) in the first seeds without it
NOISE_METHODS="erm,mixup,bootstrap(mixup=true, warmup_epochs=13),bootstrap(mixup=true, warmup_epochs=13, reg_weight=1.0),paddles(amplitude_stop=13, phase_stop=20),maxup(m=4, warmup_steps=80)+mixup"
LT_METHODS="erm,balanced_softmax,cmo,cmo+balanced_softmax,bilateral_mixup,class_distance_mix,mixup"
# the small ViT (4x4 patches: 49 tokens and a class token) with AdamW, as on digits; TokenMix without a teacher
VIT_METHODS="erm,cutmix,tokenmix,transmix"
MIX_METHODS="erm,mixup,cutmix,fmix,saliencymix(saliency='fine_grained'),puzzlemix,automix,samix,mixupe,maxup(m=4, warmup_steps=80)+cutmix"
ADV="adv(eps=0.1, steps=5)"
ADV_METHODS="erm,$ADV,$ADV+ema(decay=0.98),$ADV+cutmix,$ADV+cutmix+ema(decay=0.98),maxup(m=4)+gaussian(sigma=0.1)"
# MaxUp's score and temperature over mixing augmentations, chosen on a validation split (5,000 of the 6,000 images)
SCORE_METHODS="erm,mixup,maxup(m=4)+mixup,maxup(m=4, score='kl')+mixup,maxup(m=4, temperature=0.5)+mixup,mixup(alpha=0.2),maxup(m=4)+mixup(alpha=0.2),maxup(m=4, score='kl')+mixup(alpha=0.2),cutmix,maxup(m=4)+cutmix,maxup(m=4, score='kl')+cutmix,maxup(m=4, temperature=0.5)+cutmix"
LM_METHODS="erm,embed_noise(sigma=0.1),maxup(m=4)+embed_noise(sigma=0.1),word_dropout(p=0.1),maxup(m=4)+word_dropout(p=0.1),token_sub(p=0.1),maxup(m=4)+token_sub(p=0.1)"
GRID_NAMES="fm1k, fm1k_noise40s, fm1k_noise40a, fm5k_lt100, fm5k_lt10, fm1k_mix, fm1k_vit, fm1k_adv, fm5k, fm1k_score, lm"

grid_args() {
  case $1 in
    fm1k) echo "$FM_CPU --train-size 1000 --eval-every 40" ;;
    fm1k_noise40s) echo "$FM_CPU --train-size 1000 --eval-every 10 --label-noise 0.4 --noise-type symmetric" ;;
    fm1k_noise40a) echo "$FM_CPU --train-size 1000 --eval-every 10 --label-noise 0.4 --noise-type asymmetric" ;;
    fm5k_lt100) echo "$FM_CPU --train-size 5000 --eval-every 40 --imbalance 100" ;;  # 1,236 images, 500 to 5
    fm5k_lt10) echo "$FM_CPU --train-size 5000 --eval-every 40 --imbalance 10" ;;    # 2,040 images, 500 to 50
    fm1k_mix) echo "$FM_CPU --train-size 1000 --eval-every 40" ;;
    fm1k_vit) echo "$FM_DATA --model vit --model-opt patch_size=4 --optimizer adamw --lr 0.003 --weight-decay 0.05 \
--batch-size 64 --epochs 100 --train-size 1000 --eval-every 100" ;;
    fm1k_adv) echo "$FM_CPU --train-size 1000 --no-normalize --eval-every 5 --robust-eps 0.1 --robust-limit 500" ;;
    fm5k) echo "$FM_GPU --train-size 5000 --epochs 40" ;;
    fm1k_score) echo "$FM_GPU --train-size 6000 --val-size 5000 --epochs 150" ;;
    lm) echo "--task lm --corpus $KJV --train-tokens 100000 --epochs 25 --seeds 3" ;;
    *) echo "unknown grid $1 ($GRID_NAMES)" >&2; return 2 ;;
  esac
}
grid_methods() {
  case $1 in
    fm1k) echo "$(fm_methods 80 100),$FM_AVERAGE" ;;  # 16 steps per epoch; the base runs 2.5x the epochs
    fm1k_noise40s | fm1k_noise40a) echo "$NOISE_METHODS" ;;
    fm5k_lt100 | fm5k_lt10) echo "$LT_METHODS" ;;
    fm1k_mix) echo "$MIX_METHODS" ;;
    fm1k_vit) echo "$VIT_METHODS" ;;
    fm1k_adv) echo "$ADV_METHODS" ;;
    fm5k) fm_methods 200 100 ;;  # 40 steps per epoch
    fm1k_score) echo "$SCORE_METHODS" ;;
    lm) echo "$LM_METHODS" ;;
  esac
}

train() {  # one grid: train (continuing), stopped at the deadline when LIMIT is set
  local args methods
  args=$(grid_args "$1") || return 2
  methods=${METHODS:-$(grid_methods "$1")}  # METHODS: a part of the grid first (the report lists the whole grid)
  local jobs
  jobs=$(eval echo "\${JOBS_$1:-$JOBS}")  # JOBS_fm5k=6: that grid's own number of worker processes
  local run=("$PY" -m maxup compare $args --methods "$methods" --out "$RUNS/$1" --resume --jobs "$jobs" --no-progress)
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - $(date +%s)))
    [ "$left" -gt 0 ] || return 0
    timeout --signal=INT --kill-after=20 "$left" "${run[@]}"
  else
    "${run[@]}"
  fi
}

report() {  # the finished runs of one grid: results.json, results.md, results.png (and robust.* for fm1k_adv)
  local args
  args=$(grid_args "$1") || return 2
  "$PY" -m maxup compare $args --methods "$(grid_methods "$1")" --out "$RUNS/$1" --report --no-progress || return 1
  if [ "$1" = fm1k_adv ]; then  # pixels in [0, 1]; PGD, 10 steps, on the first 1,000 test images, last epoch
    local attack=(--eps 0.05,0.1,0.2 --steps 10 $FM_DIR --resume --no-progress)
    "$PY" -m maxup robust "$RUNS"/fm1k_adv/*/seed-* "${attack[@]}" --out "$RUNS/fm1k_adv_robust" &&
      "$PY" -m maxup robust "$RUNS"/fm1k_adv/*ema*/seed-* --weights ema "${attack[@]}" \
        --out "$RUNS/fm1k_adv_robust_ema"
  fi
}

if [ "${1:-}" = --list ]; then  # each grid's name, compare options and methods, tab-separated (no training)
  for g in $GRIDS; do printf '%s\t%s\t%s\n' "$g" "$(grid_args "$g")" "$(grid_methods "$g")"; done
  exit 0
fi
[ -n "${LIMIT:-}" ] && DEADLINE=$(($(date +%s) + LIMIT))
status=0
mkdir -p "$RUNS"
if [ "${PARALLEL:-0}" = 1 ]; then
  pids=()
  for g in $GRIDS; do train "$g" > "$RUNS.$g.log" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
else
  mkdir -p "$RUNS"
  for g in $GRIDS; do train "$g" || status=1; done
fi
for g in $GRIDS; do report "$g" || status=1; done
exit $status
