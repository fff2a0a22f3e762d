"""Mixup inference (Pang, Xu and Zhu, ICLR 2020) and the training it presupposes; docs/method.md section 15.

Training (train_standard.py --loss mixup | iat, softmax head only):
    mixup  lambda ~ Beta(alpha, alpha) per example, two independent permutations of the batch, soft-label
           cross-entropy on lambda x_p1 + (1 - lambda) x_p2 (the authors' train_resnet_mixup.py, alpha 1).
    iat    interpolated adversarial training (Lamb et al. 2019, as in the authors' code): PGD with random start
           on the clean batch against the model's PREDICTED labels, then mixup within the adversarial batch and
           within the clean batch (independent draws), one train-mode forward of both, and
           loss = r * CE(adversarial mix) + (1 - r) * CE(clean mix), r = --iat-adv-ratio (0.5).

Inference: MixupInference wraps any model of the repository. For x with prediction y^ = argmax f(x) (not
differentiated), it draws N partners x_s^i from a pool of held-out training images and returns

    log F(x),   F(x) = (1/N) sum_i softmax(f(lambda x + (1 - lambda) x_s^i))

as its logits (the repository's logits contract: argmax is the prediction), by logsumexp. Modes:
    pl        partners of class y^ (N 10, lambda 0.5)
    ol        per draw a class uniformly among the classes != y^, then a pool image of it (N 30, lambda 0.5;
              the authors use lambda 0.6 for IAT models)
    combined  PL (N 5, lambda 0.5) and OL (N 15, lambda 0.4); gap = max softmax f(x) - max F_PL(x): PL where
              gap < threshold (0.2), OL elsewhere
The partners come from the wrapper's own seeded torch.Generator (same seed, same calls: same predictions), and
gradients flow through lambda x into f, so EOT attacks can differentiate the whole predictor. The authors drew
their pool from the TEST set; here a pool is built from training-file images only (pool_from_splits refuses the
test split). No library implements mixup inference; mixup training is a few lines, hence written here.
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.attacks import frozen_eval, pgd_attack
from utils.losses import MIXUP_LOSSES  # noqa: F401  (the training objectives of this module)

MODES = ("pl", "ol", "combined")
DEFAULT_PARTNERS = {"pl": 10, "ol": 30}
POOL_SOURCES = ("val", "train")


def check_mixing_lambda(value: float, name: str = "lambda") -> float:
    """lambda is the weight of the input itself: in (0, 1] (1: no mixing, the base model)."""
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# Training: mixup and interpolated adversarial training


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_j targets_j log softmax(logits)_j (the authors' soft_cross_entropy)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def draw_mixup(batch: int, alpha: float, generator: torch.Generator):
    """(lambda per example, permutation 1, permutation 2): lambda ~ Beta(alpha, alpha) as X / (X + Y) with X, Y
    ~ Gamma(alpha) from `generator` (torch._standard_gamma is the one gamma sampler that takes a generator)."""
    device = generator.device
    gammas = torch._standard_gamma(torch.full((2, batch), float(alpha), device=device), generator=generator)
    lam = gammas[0] / (gammas[0] + gammas[1]).clamp_min(1e-30)
    first = torch.randperm(batch, generator=generator, device=device)
    second = torch.randperm(batch, generator=generator, device=device)
    return lam, first, second


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: torch.Tensor, first: torch.Tensor,
              second: torch.Tensor):
    """lambda x[first] + (1 - lambda) x[second] and its soft label lambda e_y[first] + (1 - lambda) e_y[second]."""
    weight = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    mixed = weight * x[first] + (1 - weight) * x[second]
    onehot = F.one_hot(y, num_classes).float()
    targets = lam.float()[:, None] * onehot[first] + (1 - lam.float()[:, None]) * onehot[second]
    return mixed, targets


def make_mixup_step(model, loss: str, num_classes: int, attack_schedule, generator: torch.Generator,
                    alpha: float = 1.0, adv_ratio: float = 0.5):
    """The training step of --loss mixup or iat (module docstring), in train_epoch's form
    step(x, y, index) -> (loss, logits on x or None, logits on x~ or None, extras).

    iat's attack is attack_schedule(index) (None in a clean warm-up epoch: then the step is plain mixup); its
    labels are the model's predictions on x (eval mode, no gradient), never y."""
    from utils.distributed import unwrap

    def step(x, y, index):
        config = attack_schedule(index) if loss == "iat" else None
        if config is None:
            model.train()
            mixed, targets = mix_batch(x, y, num_classes, *draw_mixup(len(x), alpha, generator))
            return soft_cross_entropy(model(mixed), targets), None, None, {}
        plain = unwrap(model)
        with torch.no_grad(), frozen_eval(plain):
            predicted = plain(x).argmax(dim=1)
        x_adv = pgd_attack(plain, x, predicted, config, generator)
        adv_mixed, adv_targets = mix_batch(x_adv, y, num_classes, *draw_mixup(len(x), alpha, generator))
        clean_mixed, clean_targets = mix_batch(x, y, num_classes, *draw_mixup(len(x), alpha, generator))
        model.train()
        logits = model(torch.cat([adv_mixed, clean_mixed]))  # one forward: BatchNorm sees both, as the authors'
        adv_loss = soft_cross_entropy(logits[:len(x)], adv_targets)
        clean_loss = soft_cross_entropy(logits[len(x):], clean_targets)
        with torch.no_grad(), frozen_eval(plain):
            logits_adv = plain(x_adv)  # train_adv_acc: the unmixed adversarials, as the other objectives report
        extras = {"train_adv_mix_loss": adv_loss.detach(), "train_clean_mix_loss": clean_loss.detach()}
        return adv_ratio * adv_loss + (1 - adv_ratio) * clean_loss, None, logits_adv, extras
    return step


# ----------------------------------------------------------------------------------------------
# Inference


@dataclass(frozen=True)
class MixupInferenceConfig:
    """Settings of the predictor (module docstring); partners None: the mode's default (pl 10, ol 30)."""
    mode: str = "ol"
    partners: Optional[int] = None
    lam: float = 0.5
    threshold: float = 0.2
    combined_pl_partners: int = 5
    combined_pl_lambda: float = 0.5
    combined_ol_partners: int = 15
    combined_ol_lambda: float = 0.4

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mixup inference mode {self.mode!r}; choose one of {MODES}")
        for name in ("lam", "combined_pl_lambda", "combined_ol_lambda"):
            check_mixing_lambda(getattr(self, name), name)
        for name in ("partners", "combined_pl_partners", "combined_ol_partners"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def num_partners(self) -> int:
        return self.partners or DEFAULT_PARTNERS.get(self.mode, 0)

    def describe(self) -> dict:
        """The settings in effect (results.json)."""
        if self.mode == "combined":
            return {key: value for key, value in asdict(self).items() if key not in ("partners", "lam")}
        return {"mode": self.mode, "partners": self.num_partners, "lam": self.lam}


class PartnerPool:
    """Clean images to mix with, grouped by class: images (P, C, H, W) in [0, 1], labels (P,), and where they
    come from (source, and their indices in the training file). Every class must have an image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, source: str = "given",
                 indices=None):
        labels = labels.long().to(images.device)
        order = torch.argsort(labels.cpu(), stable=True).to(images.device)
        self.images, self.labels = images[order].detach(), labels[order]
        self.indices = None if indices is None else [list(indices)[i] for i in order.tolist()]
        self.source, self.num_classes = source, num_classes
        counts = torch.bincount(self.labels.cpu(), minlength=num_classes)
        if len(counts) > num_classes or (counts == 0).any():
            missing = [c for c in range(num_classes) if c >= len(counts) or counts[c] == 0]
            raise ValueError(f"the partner pool ({source}) has no image of class(es) {missing[:10]}; a larger pool is needed")
        self.counts = counts.to(images.device)
        self.offsets = (torch.cumsum(counts, 0) - counts).to(images.device)

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Rows of the pool, one per entry of `classes`, each uniform among the pool's images of that class."""
        classes = classes.to(self.images.device)
        u = torch.rand(classes.shape, generator=generator, device=self.images.device)
        within = (u * self.counts[classes]).long().clamp_max(self.counts[classes] - 1)
        return self.offsets[classes] + within


def pool_from_splits(splits, source: str = "val", limit: Optional[int] = None, seed: int = 0,
                     device="cpu") -> PartnerPool:
    """The partner pool from a model's data splits (utils.data.load_splits with the model's own --val-size,
    --train-limit and --seed): its validation images (val, held out from training) or its training images
    (train). Never the test set: any other source is refused, and the pool's images must come from the
    training file (the authors drew theirs from the test set). limit: a class-balanced seeded subset."""
    from utils.data import class_balanced_indices, dataset_labels

    if source not in POOL_SOURCES:
        raise ValueError(f"the partner pool must be held out from the test set: {source!r} is not one of {POOL_SOURCES}")
    subset = splits.val if source == "val" else splits.train
    if subset.dataset is splits.test.dataset or subset.dataset is not splits.val.dataset:
        raise ValueError("the partner pool must come from the training file, never the test set")
    positions = list(range(len(subset)))
    if limit is not None and limit < len(subset):
        generator = torch.Generator().manual_seed(seed)
        positions = class_balanced_indices(dataset_labels(subset), limit, generator).tolist()
    if not positions:
        raise ValueError(f"the {source} split is empty: no partner images")
    items = subset.__getitems__(positions) if hasattr(subset, "__getitems__") else [subset[i] for i in positions]
    images = torch.stack([image for image, _ in items]).to(device)
    labels = torch.tensor([label for _, label in items])
    return PartnerPool(images, labels, splits.info.num_classes, source, [subset.indices[i] for i in positions])


class MixupInference(nn.Module):
    """The randomized predictor log F(x) around `model` (module docstring). reseed(seed) restarts its partner
    stream; last_draws keeps the last forward's partner classes and pool rows per branch ("pl", "ol"), and
    last_used_pl (combined) which examples took the PL output."""

    def __init__(self, model: nn.Module, pool: PartnerPool, config: MixupInferenceConfig = MixupInferenceConfig(),
                 seed: int = 0):
        super().__init__()
        self.model, self.pool, self.config = model, pool, config
        self.generator = torch.Generator(device=pool.images.device)
        self.reseed(seed)
        self.last_draws, self.last_predicted, self.last_used_pl = {}, None, None

    def reseed(self, seed: int):
        self.generator.manual_seed(int(seed) % (2 ** 63))
        return self

    def partner_classes(self, kind: str, predicted: torch.Tensor, partners: int) -> torch.Tensor:
        """(B, partners) classes: y^ itself (pl), or per draw uniform among the other classes (ol)."""
        predicted = predicted.to(self.pool.images.device)
        if kind == "pl":
            return predicted[:, None].expand(-1, partners)
        num_classes = self.pool.num_classes
        shift = torch.randint(1, num_classes, (len(predicted), partners), generator=self.generator,
                              device=predicted.device)
        return (predicted[:, None] + shift) % num_classes

    def mixed_log_probs(self, x: torch.Tensor, kind: str, predicted: torch.Tensor, partners: int, lam: float):
        """log (1/N) sum_i softmax(f(lam x + (1 - lam) x_s^i)), (B, L) in float32."""
        classes = self.partner_classes(kind, predicted, partners)
        rows = self.pool.draw(classes.reshape(-1), self.generator)
        self.last_draws[kind] = (classes.detach().cpu(), rows.view(classes.shape).cpu())
        others = self.pool.images[rows].to(device=x.device, dtype=x.dtype).view(len(x), partners, *x.shape[1:])
        mixed = lam * x[:, None] + (1 - lam) * others
        logits = self.model(mixed.flatten(0, 1)).float().view(len(x), partners, -1)
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(partners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        self.last_draws = {}
        with torch.no_grad():
            base = self.model(x).float()
        predicted = base.argmax(dim=1)
        self.last_predicted = predicted.cpu()
        if config.mode in ("pl", "ol"):
            return self.mixed_log_probs(x, config.mode, predicted, config.num_partners, config.lam)
        pl = self.mixed_log_probs(x, "pl", predicted, config.combined_pl_partners, config.combined_pl_lambda)
        ol = self.mixed_log_probs(x, "ol", predicted, config.combined_ol_partners, config.combined_ol_lambda)
        gap = F.softmax(base, dim=1).amax(dim=1) - pl.detach().exp().amax(dim=1)
        use_pl = gap < config.threshold
        self.last_used_pl = use_pl.cpu()
        return torch.where(use_pl[:, None], pl, ol)
