#!/usr/bin/env python3
"""What bf16 autocast would do to the MI estimators, and what it does now that they run in float32.

On real stage-1 and stage-2 checkpoints and real test images: the four per-sample quantities and L_mi
(alpha-free: the two cosine terms + lambda 0.1 * gap on X') computed
  - in float32 (the reference),
  - with every estimator module, score and reduction under bf16 autocast (what --amp did before issue 10),
  - through the project's code under bf16 autocast (the logits enter as bf16, as a bf16 target's would).
CPU bf16 autocast stands in for CUDA's (no GPU here). Prints one JSON object; --out writes it.

    python bench/amp_precision.py --target bench/results/fmnist_stage1_standard_at/best.pt \\
        --estimators bench/results/fmnist_stage2_only_max/estimators.pt --data-dir data --images 1000
"""
import json
from pathlib import Path

import torch
from common import machine_record, target_and_estimators_parser

from utils.attacks import PGDConfig, pgd_attack  # noqa: E402
from utils.data import load_splits  # noqa: E402
from utils.estimator_training import load_estimators  # noqa: E402
from utils.mi import (QUANTITIES, PAIRINGS, local_encodings, mi_from_scores, mi_quantities, score_tensor,  # noqa: E402
                      select_misled)
from utils.namid import namid_mi_loss  # noqa: E402
from utils.training import load_model  # noqa: E402


def quantities_all_in_bf16(estimators, x, x_adv, logits_nat, logits_adv):
    """The pre-issue-10 path: the estimators inside the autocast region like everything else."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local = {"nat": estimators["natural"].encode_local(x), "adv": estimators["adversarial"].encode_local(x_adv - x)}
        logits = {"nat": logits_nat, "adv": logits_adv}
        result = {}
        for name in QUANTITIES:
            estimator, local_key, logits_key = PAIRINGS[name]
            scores = score_tensor(estimators[estimator].encode_global(logits[logits_key]), local[local_key])
            result[name] = mi_from_scores(scores, "dv").float()
    return result


def l_mi(q, selected):
    return float(namid_mi_loss(q, selected, lam=0.1)[0])


def main():
    parser = target_and_estimators_parser(__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cpu")
    target, _ = load_model(args.target, device)
    target.eval().requires_grad_(False)
    estimators, checkpoint = load_estimators(args.estimators, device)
    attack = PGDConfig(**checkpoint["attack"])
    splits = load_splits("fashion-mnist", args.data_dir, val_size=0, train_limit=1, test_limit=args.images, seed=0)
    x_all = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    y_all = torch.tensor([splits.test[i][1] for i in range(len(splits.test))])
    generator = torch.Generator().manual_seed(0)
    deviations = {"estimators_in_bf16": {q: 0.0 for q in QUANTITIES}, "project_code_under_autocast": {q: 0.0 for q in QUANTITIES}}
    losses = {"float32": [], "estimators_in_bf16": [], "project_code_under_autocast": []}
    with torch.no_grad():
        for x, y in zip(x_all.split(args.batch_size), y_all.split(args.batch_size)):
            x_adv = pgd_attack(target, x, y, attack, generator)
            logits_nat, logits_adv = target(x), target(x_adv)
            selected = select_misled(logits_nat, logits_adv, y)
            reference = mi_quantities(estimators, *local_encodings(estimators, x, x_adv), logits_nat, logits_adv)
            old = quantities_all_in_bf16(estimators, x, x_adv, logits_nat, logits_adv)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                new = mi_quantities(estimators, *local_encodings(estimators, x, x_adv), logits_nat.bfloat16(),
                                    logits_adv.bfloat16())
            for name, q in (("estimators_in_bf16", old), ("project_code_under_autocast", new)):
                for quantity in QUANTITIES:
                    change = float((q[quantity] - reference[quantity]).abs().max())
                    deviations[name][quantity] = max(deviations[name][quantity], change)
            if selected.sum() >= 2:
                losses["float32"].append(l_mi(reference, selected))
                losses["estimators_in_bf16"].append(l_mi(old, selected))
                losses["project_code_under_autocast"].append(l_mi(new, selected))
    relative = {name: max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(values, losses["float32"]))
                for name, values in losses.items() if name != "float32"}
    record = {**machine_record(device), "target": args.target, "estimators": args.estimators, "images": len(y_all),
              "attack": checkpoint["attack"], "batches_with_two_or_more_in_X'": len(losses["float32"]),
              "max_abs_change_of_a_per_sample_estimate_nats": deviations,
              "max_relative_change_of_L_mi_per_batch": relative}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
