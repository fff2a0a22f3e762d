#!/usr/bin/env python3
"""Whether the ADP authors' attack loss points elsewhere than the honest one: per test image, the cosine and the
sign agreement between the input gradients of cross-entropy on the ensemble's averaged probabilities taken as
logits (the -p attacks of test_comparison.py, the authors' cleverhans protocol) and of cross-entropy on their log
(the honest attacks), at the clean image. FGSM, BIM and MIM step along the gradient's sign, so where the signs
agree the two protocols craft the same adversarials.

    python bench/adp_protocol_gradients.py --checkpoints RUN/seed0/ensemble/best.pt ... --dataset mnist \
        --data-dir DATA --out bench/results/adp_protocol_gradients.json
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from common import machine_record  # puts the repository on sys.path
from utils.data import load_splits  # noqa: E402
from utils.training import load_model  # noqa: E402


def gradient_agreement(model, x, y) -> tuple:
    """Per example: cosine and the share of pixels (where either gradient is non-zero) with equal signs."""
    x = x.clone().requires_grad_(True)
    logits = model(x)  # log of the averaged probabilities
    honest = torch.autograd.grad(F.cross_entropy(logits, y), x, retain_graph=True)[0].flatten(1)
    authors = torch.autograd.grad(F.cross_entropy(F.softmax(logits, dim=1), y), x)[0].flatten(1)
    moving = (honest != 0) | (authors != 0)
    agree = ((torch.sign(honest) == torch.sign(authors)) & moving).sum(1) / moving.sum(1).clamp(min=1)
    return F.cosine_similarity(honest, authors, dim=1).tolist(), agree.tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--test-limit", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    test = load_splits(args.dataset, args.data_dir, test_limit=args.test_limit, seed=args.seed).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    record = {**machine_record(torch.device("cpu")), "test_images": len(y), "seed": args.seed, "checkpoints": {}}
    for path in args.checkpoints:
        model, _ = load_model(path, "cpu")
        model.eval()
        cosine, agree = gradient_agreement(model, x, y)
        summary = {"cosine_median": statistics.median(cosine), "cosine_min": min(cosine),
                   "images_with_cosine_below_0.99": sum(c < 0.99 for c in cosine),
                   "sign_agreement_median": statistics.median(agree), "sign_agreement_min": min(agree)}
        record["checkpoints"][path] = summary
        print(path, json.dumps(summary))
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
