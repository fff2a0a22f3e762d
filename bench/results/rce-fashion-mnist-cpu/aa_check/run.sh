#!/bin/bash
# The attacks within epsilon again, now with AutoAttack, on the study's models (its 1 000 test images per seed):
#   bash run.sh "ATTACKS" "SEED MODEL" ...
# seed 0's RCE: bash run.sh "fgsm bim ilcm aware aa" "0 rce"; the others: bash run.sh aa "0 sce" "1 rce" ...
# (their FGSM, BIM, ILCM and detector-aware records are aware_check's; bench/detection_worst_case.py --combine
# joins them). R: the study folder; its checkpoints are those committed here.
cd /work/main
R=/work/runs/reproduce_rce-fashion-mnist-cpu
O=/work/runs/aa_check
attacks=$1; shift
for pair in "$@"; do
  s=${pair% *}; m=${pair#* }; label=$([ $m = rce ] && echo RCE || echo SCE)
  start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/python test_detection.py --checkpoints $R/seed$s/$m/best.pt --labels $label \
    --attacks $attacks --aware-targets 9 --test-limit 1000 --seed $s --device cpu --data-dir /work/main/data \
    --out-dir $O/seed${s}_$m > $O/seed${s}_$m.log 2>&1
  echo "seed$s $m rc $? $(( $(date +%s) - start )) s" >> $O/times.txt
done
