"""Diagnostic run for ../fmnist_stage3_namid_runs.md: gradient norm of the base loss vs alpha * L_mi.

Loads the epoch-1 model of run (d) and the only-max estimators, replays the first 40 batches of epoch 2
(same loader seed, epsilon ramp and PGD-10) and prints per batch |X'|, both gradient norms and the terms.
Run from the repository root: OMP_NUM_THREADS=2 PYTHONPATH=. python3 <this file> > gradient_split.log
"""
import torch, torch.nn.functional as F
from utils.training import load_model, training_attack_schedule
from utils.estimator_training import load_estimators
from utils.data import load_splits, make_loader
from utils.attacks import PGDConfig, pgd_attack
from utils.mi import local_encodings
from utils.namid import namid_step_mi
ck = torch.load("checkpoints/bench_fmnist_namid_at_onlymax_est/last.pt", weights_only=True)
model, _ = load_model("checkpoints/bench_fmnist_namid_at_onlymax_est/best.pt", "cpu")
est, _ = load_estimators("checkpoints/bench_fmnist_estimators_only_max/estimators.pt", "cpu")
s = load_splits("fashion-mnist", "data", val_size=1000, train_limit=10000, test_limit=10, seed=0)
loader = make_loader(s.train, 128, shuffle=True, seed=0, epoch=1)
sched = training_attack_schedule(PGDConfig("linf", 0.1, 0.025, 10), 1, len(loader), 1, 3)
g = torch.Generator().manual_seed(0)
def gnorm(loss):
    model.zero_grad(); loss.backward(retain_graph=True)
    return torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)).item()
for i, (x, y) in enumerate(loader):
    if i >= 40: break
    xa = pgd_attack(model, x, y, sched(i), g)
    with torch.no_grad(): ln_, la_ = local_encodings(est, x, xa)
    model.train(); a, b = model(x), model(xa)
    base = F.cross_entropy(b, y)
    mi, t = namid_step_mi(est, ln_, la_, a, b, y, "dv", 0.1, True, True)
    gm = gnorm(5 * mi) if mi.requires_grad else 0.0
    print(i, "selected", int(t["selected"]), "base grad", round(gnorm(base), 3), "5*L_mi grad", round(gm, 3), "L_mi", round(float(mi), 5), {k: round(float(v), 4) for k, v in t.items() if k != "selected"})
