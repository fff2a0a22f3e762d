#!/bin/bash
# Standard AT at AT-MMC-10's learning rate (0.01): the lr confound of AT-MMC-10's gain over Standard AT
cd /work/main
export OMP_NUM_THREADS=1
for seed in 0 1 2; do
  out=/work/runs/control/seed$seed
  .venv/bin/python train_standard.py --dataset fashion-mnist --train-limit 5000 --test-limit 500 --epochs 10 --grad-clip 10 \
    --loss at --lr 0.01 --seed $seed --model-dir $out/standard-at-lr0.01 --device cpu --data-dir /work/main/data || exit 1
  .venv/bin/python test_comparison.py --test-limit 500 --attacks pgd aa --pgd-steps 40 \
    --checkpoints $out/standard-at-lr0.01/best.pt --labels "Standard AT (lr 0.01)" --seed $seed \
    --out-dir $out/eval-standard-at-lr0.01 --device cpu --data-dir /work/main/data || exit 1
done
