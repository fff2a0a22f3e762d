#!/usr/bin/env python3
"""One Standard AT step against one NAMID step, same process, model, batch and attack (issue 4).

The NAMID step runs the target forward once on x and once on x~ and reuses those logits for the
selection, the base loss and every MI term (the published code ran 7 forwards: ratio 5.5 on
ResNet-18, batch 64, CPU). Target: ratio <= 1.2 at PGD-10. Prints one JSON line per architecture.

    python bench/step_speed.py --arch resnet18 small-cnn --out bench/results/step_speed.json
"""
import argparse
import json
from pathlib import Path

import torch
from common import interleaved_medians, machine_record

from models import build_model  # noqa: E402
from models.estimators import build_estimators  # noqa: E402
from utils.attacks import PGDConfig  # noqa: E402
from utils.cli import DATASET_DEFAULTS  # noqa: E402
from utils.data import dataset_info  # noqa: E402
from utils.losses import OBJECTIVES  # noqa: E402
from utils.namid import make_namid_step  # noqa: E402
from utils.runtime import resolve_device  # noqa: E402
from utils.training import make_adversarial_step  # noqa: E402

DATASET_OF = {"small-cnn": "fashion-mnist"}  # every other architecture is timed on CIFAR-10-shaped input


def timed_step(model, optimizer, step, x, y):
    def run():
        loss = step(x, y, 0)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def measure(arch, batch, steps, repeats, device, hsize=None):
    dataset = DATASET_OF.get(arch, "cifar10")
    info = dataset_info(dataset)
    hsize = hsize or DATASET_DEFAULTS[dataset]["hsize"]
    torch.manual_seed(0)
    model = build_model(arch, info.num_classes, info.in_channels, info.image_size, info.mean, info.std).to(device)
    estimators = build_estimators(info.in_channels, info.num_classes, hsize).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, info.in_channels, info.image_size, info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    eps = info.epsilon_linf
    objective = OBJECTIVES["at"]
    attack = objective.training_attack(PGDConfig("linf", eps, eps / 4, steps))
    generator = torch.Generator(device=device).manual_seed(0)
    schedule = lambda index: attack  # noqa: E731
    at_step = make_adversarial_step(model, objective, schedule, 6.0, generator)
    namid_step = make_namid_step(model, estimators, objective, schedule, generator, beta=6.0, alpha=5.0, lam=0.1,
                                 measure="dv")
    at_s, namid_s, ratio = interleaved_medians(timed_step(model, optimizer, at_step, x, y),
                                               timed_step(model, optimizer, namid_step, x, y), repeats, device)
    return {"arch": arch, "dataset": dataset, "batch": batch, "pgd_steps": steps, "hsize": hsize,
            "at_step_s": round(at_s, 4), "namid_step_s": round(namid_s, 4), "ratio": round(ratio, 3),
            "ratio_is": "median over rounds of the NAMID step's time / the AT step's, the two timed alternately"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "small-cnn"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    parser.add_argument("--hsize", type=int, default=None, help="estimator width (default: the dataset's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    for arch in args.arch:
        row = measure(arch, args.batch, args.steps, args.repeats, device, args.hsize)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({**machine_record(device), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
