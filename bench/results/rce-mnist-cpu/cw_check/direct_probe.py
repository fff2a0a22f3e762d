"""The probe behind cw_check/README.md's second table: advertorch's C&W-L2 called directly on the seed-0 RCE
SmallCNN of rce-mnist-cpu, 100 class-balanced MNIST test images, targets drawn uniformly among the wrong classes.

    C0=10 OMP_NUM_THREADS=1 python bench/results/rce-mnist-cpu/cw_check/direct_probe.py 500,1,0.1,4 [...]

Each argument is iterations,abort_early (1/0),lr,binary_search_steps; C0 the initial constant (default 1);
--data-dir is MNIST_DIR (default data)."""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from utils.advertorch_compat import advertorch_attacks  # noqa: E402
from utils.data import load_splits  # noqa: E402
from utils.training import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
torch.manual_seed(0)
model, _ = load_model(REPO / "bench/results/rce-mnist-cpu/seed0/rce/best.pt", "cpu")
model.eval()
for p in model.parameters():
    p.requires_grad_(False)
splits = load_splits("mnist", os.environ.get("MNIST_DIR", "data"), val_size=0, train_limit=1, test_limit=100, seed=0,
                     augment=False)
x = torch.stack([splits.test[i][0] for i in range(100)])
y = torch.tensor([splits.test[i][1] for i in range(100)])
target = (y + torch.randint(1, 10, (100,), generator=torch.Generator().manual_seed(1))) % 10
for spec in sys.argv[1:]:
    steps, abort, lr, search = spec.split(",")
    attack = advertorch_attacks().CarliniWagnerL2Attack(
        model, 10, confidence=0, targeted=True, learning_rate=float(lr), binary_search_steps=int(search),
        max_iterations=int(steps), abort_early=abort == "1", initial_const=float(os.environ.get("C0", "1")),
        clip_min=0., clip_max=1.)
    started = time.time()
    adv = attack.perturb(x, target)
    with torch.no_grad():
        reached = model(adv).argmax(1) == target
    l2 = (adv - x).flatten(1).norm(dim=1)
    print(spec, f"reached {reached.float().mean():.2f}", f"median L2 {l2[reached].median():.2f}",
          f"{time.time() - started:.0f}s", flush=True)
