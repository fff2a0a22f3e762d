#!/bin/bash
# The bounded attacks again, now with AutoAttack, on every model of the study (its 1 000 test images per seed):
# bash run.sh "0 rce" "0 sce" ...   (R: the study folder; its checkpoints are those committed here)
cd /work/main
R=/work/runs/reproduce_rce-fashion-mnist-cpu
O=/work/runs/aa_check
for pair in "$@"; do
  s=${pair% *}; m=${pair#* }; label=$([ $m = rce ] && echo RCE || echo SCE)
  start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/python test_detection.py --checkpoints $R/seed$s/$m/best.pt --labels $label \
    --attacks fgsm bim ilcm aware aa --aware-targets 9 --test-limit 1000 --seed $s --device cpu --data-dir /work/main/data \
    --out-dir $O/seed${s}_$m > $O/seed${s}_$m.log 2>&1
  echo "seed$s $m rc $? $(( $(date +%s) - start )) s" >> $O/times.txt
done
