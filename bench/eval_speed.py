#!/usr/bin/env python3
"""Stage 4's CPU default for SmallCNN: how much faster is evaluation with the model in channels_last?

Times, interleaved with the plain (contiguous) model in every round, the two computations an evaluation is made
of: a no-grad forward of a batch (clean accuracy, AutoAttack's Square and FAB queries) and a forward plus the
input gradient of the summed cross-entropy (every PGD/APGD step). Same weights, same batch; the logits are
checked equal up to rounding.

    OMP_NUM_THREADS=1 python bench/eval_speed.py --out bench/results/eval_speed_cpu.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_record  # noqa: E402
from models import build_model  # noqa: E402


def computations(model, x, y):
    def forward():
        with torch.no_grad():
            model(x)

    def input_gradient():
        delta = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(delta), y, reduction="sum"), delta)
    return {"forward": forward, "forward+input gradient": input_gradient}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="test_comparison's default")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    torch.manual_seed(0)
    plain = build_model("small-cnn", 10, 1, 28, [0.5], [0.5]).eval()
    with torch.no_grad():  # the zero-initialised last layer of a fresh SmallCNN would make every logit 0
        plain.net.classifier.fc3.weight.normal_(0, 0.05)
    fast = build_model("small-cnn", 10, 1, 28, [0.5], [0.5]).eval()
    fast.load_state_dict(plain.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x, y = torch.rand(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    with torch.no_grad():
        difference = (plain(x) - fast(x)).abs().max().item()
    record = {**machine_record(device), "batch_size": args.batch_size, "rounds": args.rounds,
              "max_logit_difference": difference, "results": {}}
    print(f"max |logit difference| {difference:.2e}")
    for name, (baseline, other) in zip(computations(plain, x, y), zip(computations(plain, x, y).values(),
                                                                        computations(fast, x, y).values())):
        plain_s, fast_s, ratio = interleaved_medians(baseline, other, args.rounds, device)
        record["results"][name] = {"plain_s": plain_s, "channels_last_s": fast_s, "speedup": 1 / ratio,
                                   "plain_images_per_s": args.batch_size / plain_s,
                                   "channels_last_images_per_s": args.batch_size / fast_s}
        print(f"{name}: plain {plain_s * 1e3:.1f} ms, channels_last {fast_s * 1e3:.1f} ms, speed-up {1 / ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
