#!/usr/bin/env bash
# The evidence grids of docs/RESULTS.md: Fashion-MNIST at 1,000 and 5,000 images trained to convergence, the
# MaxUp score/temperature choice on a validation split, and language modelling on a KJV subset that overfits.
#
#   scripts/evidence.sh                      # every grid, one after the other, runs/evidence/<grid>
#   GRIDS="fm1k lm" JOBS=4 scripts/evidence.sh
#   LIMIT=400 scripts/evidence.sh            # stop training after 400 s, then report the finished runs
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
GRIDS=${GRIDS:-"fm1k fm5k fm1k_score lm"}
FM_DIR=${FM:+--data-dir $FM}
KJV=${KJV:-kjv}

# Fashion-MNIST: a ResNet-8 that fits 1,000 or 5,000 images; SGD lr 0.05, cosine decay, weight decay 5e-4; MaxUp
# after a warm-up of 5 epochs of its base augmentation (the paper's schedule). fm1k runs on two CPU cores in about
# 100 minutes (width 16, batch 64, 40 epochs, the test set evaluated after the last epoch only); fm5k and
# fm1k_score need a GPU (width 32, batch 128).
FM_ARGS="--dataset fashion-mnist $FM_DIR --model resnet --model-opt depth=8 --seeds 3"
FM_GPU="$FM_ARGS --model-opt width=32 --batch-size 128"
GRADAUG="gradaug(width_range=(0.8, 1.0), resolutions=(28, 24, 21))"
fm_methods() {  # $1: MaxUp's warm-up in steps, $2: the epochs of the compute-matched base runs
  local w="maxup(m=4, warmup_steps=$1)"
  echo "erm,cropflip,cutout,mixup,cutmix,$w+cropflip,$w+cutout,$w+cutmix,manifold_mixup,maxup(m=4)+manifold_mixup,sam,sam_mixup,cropflip@epochs=$2,cutout@epochs=$2,cutmix@epochs=$2,bgmix,dgmix,$GRADAUG"
}
# MaxUp's score and temperature over mixing augmentations, chosen on a validation split (5,000 of the 6,000 images)
SCORE_METHODS="erm,mixup,maxup(m=4)+mixup,maxup(m=4, score='kl')+mixup,maxup(m=4, temperature=0.5)+mixup,mixup(alpha=0.2),maxup(m=4)+mixup(alpha=0.2),maxup(m=4, score='kl')+mixup(alpha=0.2),cutmix,maxup(m=4)+cutmix,maxup(m=4, score='kl')+cutmix,maxup(m=4, temperature=0.5)+cutmix"
LM_METHODS="erm,embed_noise(sigma=0.1),maxup(m=4)+embed_noise(sigma=0.1),word_dropout(p=0.1),maxup(m=4)+word_dropout(p=0.1),token_sub(p=0.1),maxup(m=4)+token_sub(p=0.1)"

grid_args() {
  case $1 in
    fm1k) echo "$FM_ARGS --model-opt width=16 --batch-size 64 --train-size 1000 --epochs 40 --eval-every 40" ;;
    fm5k) echo "$FM_GPU --train-size 5000 --epochs 40" ;;
    fm1k_score) echo "$FM_GPU --train-size 6000 --val-size 5000 --epochs 150" ;;
    lm) echo "--task lm --corpus $KJV --train-tokens 100000 --epochs 25 --seeds 3" ;;
    *) echo "unknown grid $1 (fm1k, fm5k, fm1k_score, lm)" >&2; return 2 ;;
  esac
}
grid_methods() {
  case $1 in
    fm1k) fm_methods 80 100 ;;   # 16 steps per epoch; the base runs 2.5x the epochs, about MaxUp's time
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

report() {  # the finished runs of one grid: results.json, results.md, results.png
  local args
  args=$(grid_args "$1") || return 2
  "$PY" -m maxup compare $args --methods "$(grid_methods "$1")" --out "$RUNS/$1" --report --no-progress
}

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
