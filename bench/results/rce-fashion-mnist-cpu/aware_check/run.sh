#!/bin/bash
# $1: list of "seed model" pairs
cd /work/main
R=/work/runs/reproduce_rce-fashion-mnist-cpu
for pair in "$@"; do
  s=${pair% *}; m=${pair#* }; label=$([ $m = rce ] && echo RCE || echo SCE)
  start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/python test_detection.py --checkpoints $R/seed$s/$m/best.pt --labels $label \
    --attacks fgsm bim ilcm aware --aware-targets 9 --test-limit 1000 --seed $s --device cpu --data-dir /work/main/data \
    --out-dir /work/runs/aware9/seed${s}_$m > /work/runs/aware9/seed${s}_$m.log 2>&1
  echo "seed$s $m rc $? $(( $(date +%s) - start )) s" >> /work/runs/aware9/times.txt
done
