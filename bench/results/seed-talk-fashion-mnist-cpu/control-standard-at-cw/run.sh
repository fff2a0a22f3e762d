#!/bin/bash
# Standard AT (softmax head, lr 0.05 as the study's Standard AT) whose training PGD ascends the CW margin, as
# AT-MMC-10's does: the inner-attack confound of AT-MMC-10's gain over Standard AT. One seed per call (run two
# side by side): run.sh SEED
cd /work/main
export OMP_NUM_THREADS=1
seed=$1
out=/work/runs/control-cw/seed$seed
.venv/bin/python train_standard.py --dataset fashion-mnist --train-limit 5000 --test-limit 500 --epochs 10 --grad-clip 10 \
  --loss at --at-attack-loss cw --seed $seed --model-dir $out/standard-at-cw --device cpu --data-dir /work/main/data || exit 1
.venv/bin/python test_comparison.py --test-limit 500 --attacks pgd aa --pgd-steps 40 \
  --checkpoints $out/standard-at-cw/best.pt --labels "Standard AT (CW-margin training PGD)" --seed $seed \
  --out-dir $out/eval-standard-at-cw --device cpu --data-dir /work/main/data || exit 1
