"""The RCE paper's detection scores and their thresholds (docs/method.md section 14).

Every score is high for a normal input and is computed from the model's logits h (for an RCE model h = -Z,
defenses/rce.py), with F = softmax(h):
    confidence   max_i F_i
    non-ME       the entropy of the non-maximal probabilities renormalised, F_i / sum_{j != m} F_j, i != m = argmax F
    K-density    log KD(x), KD(x) = (1/n) sum_i exp(-||z(x) - z_i||^2 / sigma^2) over a fixed random sample of n
                 training features z_i of the predicted class (z: the input of the last linear layer); the log is
                 taken by logsumexp, since with the authors' sigma^2 the kernels underflow float32 on networks
                 whose features are larger than their ResNet's. log is monotone: the same AUC and rejections as KD.
A detector rejects x when its score is below a threshold chosen on the clean validation split at a false-positive
rate: the FPR-quantile of the clean validation scores (fpr_threshold). "all" rejects when any of the three does,
each at its own lower threshold, chosen so that the three together reject the same rate of clean validation images
(combined_thresholds): at each detector's own thresholds the union would reject up to three times as many.
Fitted once per checkpoint (kernels from the checkpoint's own training split, thresholds on its validation split)
and saved next to it (load_or_fit_detectors), reused while the settings match.
No library implements non-ME or this kernel density (ART, advertorch, torchattacks checked); scikit-learn's
KernelDensity would, but is not a dependency, and the attack needs the log-density's gradient.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from defenses.rce import check_detectable, logits_and_features
from utils.checkpoint import atomic_torch_save, file_sha256
from utils.errors import UserError

DETECTORS = ("confidence", "non-me", "k-density")
COMBINED = "all"
DETECTOR_LABELS = {"confidence": "confidence", "non-me": "non-ME", "k-density": "K-density", COMBINED: "all three"}
# The authors' kernel widths sigma^2 (their test_adv.py and auc_of_roc_RCE.m), by head.
DEFAULT_SIGMA2 = {"rce": 0.1 / 0.26, "softmax": 1.0 / 0.26}
DETECTORS_FORMAT = "namid-detectors-2"  # 2: "all" has its own thresholds (fits of format 1 are refitted)


# ----------------------------------------------------------------------------------------------
# Scores (differentiable: the detector-aware attack ascends them)


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """(B,) max_i softmax(h)_i."""
    return F.softmax(logits.float(), dim=1).amax(dim=1)


def non_maximal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) non-ME: -sum_{i != m} F^_i log F^_i with F^_i = F_i / sum_{j != m} F_j, m = argmax F, in log space."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    top = F.one_hot(log_probs.argmax(dim=1), logits.shape[1]).bool()
    normaliser = torch.logsumexp(log_probs.masked_fill(top, float("-inf")), dim=1, keepdim=True)
    # masked_fill, not torch.where: no -inf may enter the product, whose gradient would then be 0 * inf = nan
    log_renormalised = (log_probs - normaliser).masked_fill(top, 0.0)
    return -(log_renormalised.exp().masked_fill(top, 0.0) * log_renormalised).sum(dim=1)


class KernelDensity:
    """log KD over fixed kernels: kernels (N, d) training features, labels (N,) their classes."""

    def __init__(self, kernels: torch.Tensor, labels: torch.Tensor, sigma2: float, num_classes: int):
        self.kernels, self.labels, self.sigma2, self.num_classes = kernels, labels.long(), float(sigma2), num_classes
        self._by_class = [kernels[self.labels == c] for c in range(num_classes)]

    def to(self, device):
        return KernelDensity(self.kernels.to(device), self.labels.to(device), self.sigma2, self.num_classes)

    def counts(self) -> list:
        return [len(k) for k in self._by_class]

    def log_density(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B,) log KD(x) over the kernels of classes[b] (-inf for a class without kernels); differentiable.
        ||z - z_i||^2 by its expansion, in float64 (cancellation), clamped at 0."""
        precise = torch.float32 if features.device.type == "mps" else torch.float64
        z = features.to(precise)
        result = torch.full((len(z),), float("-inf"), dtype=precise, device=z.device)
        for c in classes.unique().tolist():
            kernels = self._by_class[c].to(device=z.device, dtype=precise)
            if len(kernels) == 0:
                continue
            rows = (classes == c).nonzero().squeeze(1)
            zc = z[rows]
            squared = (zc.pow(2).sum(1, keepdim=True) - 2 * zc @ kernels.t() + kernels.pow(2).sum(1)[None]).clamp_min(0)
            value = torch.logsumexp(-squared / self.sigma2, dim=1) - math.log(len(kernels))
            result = result.index_put((rows,), value)
        return result.float()


# ----------------------------------------------------------------------------------------------
# Thresholds, AUC, ROC


def fpr_threshold(clean_scores: torch.Tensor, fpr: float) -> float:
    """The threshold tau rejecting (score < tau) floor(fpr * n) of the n clean scores (fewer only on ties): the
    k-th smallest score, k = floor(fpr * n) (0-based), so the clean false-positive rate is at most fpr."""
    scores = torch.as_tensor(clean_scores, dtype=torch.float64).flatten()
    if len(scores) == 0:
        raise UserError("no clean scores to set a detection threshold on (empty validation split)")
    k = min(int(math.floor(fpr * len(scores))), len(scores) - 1)
    return float(scores.sort().values[k])


def combined_thresholds(clean_scores: dict, fpr: float, iterations: int = 40) -> dict:
    """Per detector, the threshold at a common per-detector rate q, the largest q (bisection on [fpr / 3, fpr])
    at which rejecting when any score is below its threshold rejects at most fpr of the clean scores."""
    def at(q):
        thresholds = {name: fpr_threshold(clean_scores[name], q) for name in DETECTORS}
        rejected = torch.zeros(len(clean_scores[DETECTORS[0]]), dtype=torch.bool)
        for name in DETECTORS:
            rejected |= torch.as_tensor(clean_scores[name], dtype=torch.float64) < thresholds[name]
        return thresholds, float(rejected.double().mean())

    own, rate = at(fpr)
    if rate <= fpr:  # the scores reject the same images: each detector's own thresholds already do
        return own
    low, high = fpr / len(DETECTORS), fpr  # the union rejects at most 3 q and at least q
    best = at(low)[0]
    for _ in range(iterations):
        middle = (low + high) / 2
        thresholds, rate = at(middle)
        if rate <= fpr:
            low, best = middle, thresholds
        else:
            high = middle
    return best


def rank_auc(positive, negative) -> float:
    """ROC AUC of positives (high scores) against negatives: the rank-sum (Mann-Whitney) formula with average
    ranks for ties, so identical score sets give 0.5. nan when either set is empty."""
    from scipy.stats import rankdata
    positive = torch.as_tensor(positive, dtype=torch.float64).flatten().numpy()
    negative = torch.as_tensor(negative, dtype=torch.float64).flatten().numpy()
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    import numpy
    ranks = rankdata(numpy.concatenate([positive, negative]))  # -inf ranks lowest, as it should
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_points(positive, negative) -> tuple:
    """(false-positive rates, true-positive rates) of the rule "accept when score >= t" over every threshold t:
    the fraction of negatives (adversarials) and of positives (clean) accepted, from (0, 0) to (1, 1)."""
    import numpy
    positive = numpy.asarray(torch.as_tensor(positive, dtype=torch.float64).flatten())
    negative = numpy.asarray(torch.as_tensor(negative, dtype=torch.float64).flatten())
    thresholds = numpy.unique(numpy.concatenate([positive, negative]))[::-1]
    fpr = [0.0] + [float((negative >= t).mean()) if len(negative) else 0.0 for t in thresholds]
    tpr = [0.0] + [float((positive >= t).mean()) if len(positive) else 0.0 for t in thresholds]
    return fpr, tpr


# ----------------------------------------------------------------------------------------------
# The fitted detectors of one checkpoint


@dataclass(frozen=True)
class DetectorSettings:
    """What a fit depends on; a saved fit is reused only when every field matches."""
    checkpoint_sha256: str
    dataset: str
    train_limit: object
    val_size: int
    data_seed: int
    kernels_per_class: int
    sigma2: float
    fpr: float
    seed: int


class Detectors:
    """Kernel density, the thresholds and the validation FPR of one model."""

    def __init__(self, density: KernelDensity, thresholds: dict, val_fpr: dict, settings: DetectorSettings,
                 combined: dict | None = None):
        self.density, self.thresholds, self.val_fpr, self.settings = density, thresholds, val_fpr, settings
        self.combined = dict(thresholds if combined is None else combined)  # the thresholds of "all"

    def to(self, device):
        return Detectors(self.density.to(device), self.thresholds, self.val_fpr, self.settings, self.combined)

    def scores(self, logits: torch.Tensor, features: torch.Tensor) -> dict:
        """Per detector, (B,) scores (high = normal); K-density on the kernels of the predicted class."""
        predicted = logits.argmax(dim=1)
        return {"confidence": confidence(logits), "non-me": non_maximal_entropy(logits),
                "k-density": self.density.log_density(features, predicted)}

    def accepted(self, scores: dict) -> dict:
        """Per detector and for "all" (accepted by the three), (B,) bool: not rejected."""
        accepted = {name: scores[name] >= self.thresholds[name] for name in DETECTORS}
        accepted[COMBINED] = torch.stack([scores[name] >= self.combined[name] for name in DETECTORS]).all(dim=0)
        return accepted

    def state(self) -> dict:
        """What detectors.pt holds (tensors and plain types only: loadable with weights_only=True)."""
        return {"format": DETECTORS_FORMAT, "settings": asdict(self.settings), "kernels": self.density.kernels.cpu(),
                "kernel_labels": self.density.labels.cpu(), "num_classes": self.density.num_classes,
                "thresholds": dict(self.thresholds), "combined_thresholds": dict(self.combined),
                "val_fpr": dict(self.val_fpr)}

    @classmethod
    def from_state(cls, state: dict):
        settings = DetectorSettings(**state["settings"])
        density = KernelDensity(state["kernels"], state["kernel_labels"], settings.sigma2, state["num_classes"])
        return cls(density, state["thresholds"], state["val_fpr"], settings, state["combined_thresholds"])


@torch.no_grad()
def model_scores(model, detectors: Detectors, x: torch.Tensor) -> tuple:
    """(logits, scores dict) of a batch, no gradient."""
    logits, features = logits_and_features(model, x)
    return logits.float(), detectors.scores(logits.float(), features)


def detectors_path(checkpoint_path) -> Path:
    """Where the detectors of a checkpoint are kept: next to it, <run folder>/<checkpoint name>.detectors.pt."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.detectors.pt")


def settings_for(checkpoint: dict, checkpoint_path, kernels_per_class: int, sigma2, fpr: float,
                 seed: int) -> DetectorSettings:
    """The settings of a fit on this checkpoint; sigma2 None: the authors' for the checkpoint's head."""
    head = checkpoint["model_spec"].get("head", "softmax")
    check_detectable(head, f"checkpoint {checkpoint_path}")
    config = checkpoint.get("config", {})
    missing = [key for key in ("val_size", "seed") if key not in config]
    if missing:
        raise UserError(f"checkpoint {checkpoint_path} does not record its data split ({', '.join(missing)}), so its "
                        f"training split cannot be rebuilt for the detectors")
    if not config["val_size"]:
        raise UserError(f"checkpoint {checkpoint_path} was trained with --val-size 0: there is no validation split "
                        f"to choose the detection thresholds on")
    return DetectorSettings(checkpoint_sha256=file_sha256(checkpoint_path), dataset=checkpoint["model_spec"]["dataset"],
                            train_limit=config.get("train_limit"), val_size=int(config["val_size"]),
                            data_seed=int(config["seed"]), kernels_per_class=int(kernels_per_class),
                            sigma2=float(DEFAULT_SIGMA2[head] if sigma2 is None else sigma2), fpr=float(fpr),
                            seed=int(seed))


def _batches(dataset, batch_size: int, indices=None):
    from torch.utils.data import DataLoader, Subset
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def fit_detectors(model, settings: DetectorSettings, num_classes: int, data_dir, device, batch_size: int = 256,
                  progress=None) -> Detectors:
    """Kernels: per class, a seeded random sample of min(kernels_per_class, class size) images of the checkpoint's
    training split (by their true label), their features; thresholds: the FPR-quantile of each score on the clean
    validation split (every image, correctly classified or not: the rule rejects inputs, not errors), and for all
    three together the lower ones at which their union rejects that rate (combined_thresholds)."""
    from utils.data import dataset_labels, load_splits
    splits = load_splits(settings.dataset, data_dir, val_size=settings.val_size, train_limit=settings.train_limit,
                         test_limit=1, seed=settings.data_seed, augment=False)
    labels = dataset_labels(splits.train)
    generator = torch.Generator().manual_seed(settings.seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:settings.kernels_per_class]])
    chosen = torch.sort(torch.cat(chosen)).values
    model.eval()
    features = []
    for x, _ in _wrap(progress, _batches(splits.train, batch_size, chosen.tolist()), "kernels"):
        with torch.no_grad():
            features.append(logits_and_features(model, x.to(device))[1].cpu())
    density = KernelDensity(torch.cat(features), labels[chosen], settings.sigma2, num_classes)
    on_device = density.to(device)
    val_scores = {name: [] for name in DETECTORS}
    for x, _ in _wrap(progress, _batches(splits.val, batch_size), "thresholds"):
        with torch.no_grad():
            logits, features = logits_and_features(model, x.to(device))
            scores = Detectors(on_device, {}, {}, settings).scores(logits.float(), features)
        for name in DETECTORS:
            val_scores[name].append(scores[name].detach().cpu())
    val_scores = {name: torch.cat(values) for name, values in val_scores.items()}
    thresholds = {name: fpr_threshold(val_scores[name], settings.fpr) for name in DETECTORS}
    detectors = Detectors(density, thresholds, {}, settings, combined_thresholds(val_scores, settings.fpr))
    accepted = detectors.accepted(val_scores)
    detectors.val_fpr = {name: 1.0 - float(flags.double().mean()) for name, flags in accepted.items()}
    return detectors


def _wrap(progress, loader, what):
    return progress(loader, what) if progress is not None else loader


def load_or_fit_detectors(model, checkpoint: dict, checkpoint_path, settings: DetectorSettings, data_dir, device,
                          batch_size: int = 256, refit: bool = False, progress=None, warn=print) -> tuple:
    """(Detectors, "reused" | "fitted"): the saved fit next to the checkpoint when its settings match, else a new
    fit saved there (atomically; if the folder is not writable, a warning and the fit is used unsaved)."""
    path = detectors_path(checkpoint_path)
    if path.is_file() and not refit:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: fit anew
            state = None
        if isinstance(state, dict) and state.get("format") == DETECTORS_FORMAT and state.get("settings") == asdict(settings):
            return Detectors.from_state(state), "reused"
    detectors = fit_detectors(model, settings, checkpoint["model_spec"]["num_classes"], data_dir, device, batch_size,
                              progress)
    try:
        atomic_torch_save(detectors.state(), path)
    except OSError as error:
        warn(f"could not save the detectors of {checkpoint_path} to {path} ({error.strerror or error}); they will be "
             f"fitted again next time")
    return detectors, "fitted"
