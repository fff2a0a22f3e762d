#!/usr/bin/env python3
"""Cost of one stage-2 estimator-training step against one PGD attack of the same settings, same batch.

The step is what train_MI_estimator.py runs per batch: PGD on the frozen target, one no-grad target
forward of [x, x~], the two local encodings, the four MI terms, backward and an Adam step. Target
(issue 3): step / attack <= 1.5. Prints one JSON line per setting and, with --out, writes them all.

    python bench/estimator_step.py --out bench/results/estimator_step.json
"""
import argparse
import json
from pathlib import Path

import torch
from common import machine_record, median_seconds

from models import build_model  # noqa: E402
from models.estimators import build_estimators  # noqa: E402
from utils.attacks import PGDConfig, pgd_attack  # noqa: E402
from utils.data import dataset_info  # noqa: E402
from utils.estimator_training import make_estimator_step  # noqa: E402
from utils.mi import paper_objective  # noqa: E402
from utils.runtime import resolve_device  # noqa: E402

SETTINGS = [  # (architecture, dataset, batch, hsize, ResNet width)
    ("small-cnn", "fashion-mnist", 128, 256, 64),
    ("small-cnn", "fashion-mnist", 128, 2048, 64),
    ("resnet18", "cifar10", 32, 2048, 64),
]


def measure(arch, dataset, batch, hsize, width, steps, repeats, device):
    info = dataset_info(dataset)
    torch.manual_seed(0)
    target = build_model(arch, info.num_classes, info.in_channels, info.image_size, info.mean, info.std, width=width)
    target.to(device).eval().requires_grad_(False)
    estimators = build_estimators(info.in_channels, info.num_classes, hsize).to(device)
    optimizer = torch.optim.Adam(estimators.parameters(), lr=1e-2)
    x = torch.rand(batch, info.in_channels, info.image_size, info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    eps = info.epsilon_linf
    attack = PGDConfig("linf", eps, eps / 4, steps)
    generator = torch.Generator(device=device).manual_seed(0)
    step = make_estimator_step(estimators, target, paper_objective, attack, generator, "dv")

    def attack_only():
        pgd_attack(target, x, y, attack, generator)

    def estimator_step():
        loss = step(x, y, 0)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    attack_s = median_seconds(attack_only, repeats, device)
    step_s = median_seconds(estimator_step, repeats, device)
    return {"arch": arch, "dataset": dataset, "batch": batch, "hsize": hsize, "pgd_steps": steps,
            "attack_s": round(attack_s, 4), "estimator_step_s": round(step_s, 4), "ratio": round(step_s / attack_s, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    for setting in SETTINGS:
        row = measure(*setting, args.steps, args.repeats, device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        record = {**machine_record(device), "results": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
