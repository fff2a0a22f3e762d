#!/bin/bash
# AutoAttack alone on the other models (their FGSM, BIM, ILCM and 9-target detector-aware records are aware_check's;
# bench/detection_worst_case.py --combine joins them): bash run_aa_only.sh "1 rce" "2 rce" "0 sce" ...
cd /work/main
R=/work/runs/reproduce_rce-fashion-mnist-cpu
O=/work/runs/aa_check
for pair in "$@"; do
  s=${pair% *}; m=${pair#* }; label=$([ $m = rce ] && echo RCE || echo SCE)
  start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/python test_detection.py --checkpoints $R/seed$s/$m/best.pt --labels $label \
    --attacks aa --test-limit 1000 --seed $s --device cpu --data-dir /work/main/data \
    --out-dir $O/seed${s}_$m > $O/seed${s}_$m.log 2>&1
  echo "seed$s $m rc $? $(( $(date +%s) - start )) s" >> $O/times.txt
done
