#!/bin/bash
# Multi-targeted margin PGD (9 wrong classes x 100 steps of eps/10) on seed 0's three ensembles, at eps 0.15, on the
# study's 250 test images of seed 0. Usage: bash bench/results/adp-mnist-cpu/margin_check/run.sh DATA
# (MNIST in torchvision's layout under DATA), from anywhere; PYTHON picks the interpreter (default python3).
DATA=${1:?usage: run.sh DATA}
cd "$(dirname "$0")/../../../.." || exit 1
export OMP_NUM_THREADS=1
for d in ensemble adp-2-0 adp; do
  start=$(date +%s)
  ${PYTHON:-python3} test_comparison.py --test-limit 250 --epsilon 0.15 --attacks pgd-mt --mt-targets 9 --mt-steps 100 \
    --mt-step-size 0.015 --checkpoints bench/results/adp-mnist-cpu/seed0/$d/best.pt --labels $d --seed 0 \
    --out-dir bench/results/adp-mnist-cpu/margin_check/$d --device cpu --data-dir "$DATA"
  echo "$d rc=$? $(( $(date +%s) - start )) s"
done
