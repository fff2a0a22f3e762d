"""PGD under L-inf and L2 (Madry et al. 2018), the attack every stage trains and evaluates with.

Written by hand because the training loop needs things no library attack offers together: a private
random stream (the training loop's RNG is left untouched, so runs resume bit-identically), the
TRADES KL objective, and returning the model to the mode it was in. tests/test_attacks.py checks it
against torchattacks' PGD.

Also here, for stage 4's adaptive attacks (utils/evaluation.py): the targeted margin h_t - max_{j != t} h_j
that multi-targeted PGD ascends (pgd_attack with loss "targeted-margin" and a `target` per example), and
MI-FGSM (momentum_attack); and the "label-mi" loss, the plug-in label MI I(Y; Y^) of the batch's soft
confusion matrix (utils/label_mi.py), which PGD minimises jointly over the batch. Every margin masks with
-inf, never by multiplying with (1 - one_hot): on logits that are all <= 0 (MMC's -||z - mu||^2, ADP's
log p_bar) a masked 0 would be the largest "other" logit.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.label_mi import label_mi

NORMS = ("linf", "l2")
ATTACK_LOSSES = ("ce", "cw", "kl", "targeted-margin", "targeted-ce", "label-mi")
_TINY = 1e-12


@dataclass(frozen=True)
class PGDConfig:
    """Settings of one PGD attack. epsilon and step_size are in [0, 1] pixel units."""
    norm: str = "linf"
    epsilon: float = 8 / 255
    step_size: float = 2 / 255
    num_steps: int = 10
    loss: str = "ce"            # ce: cross-entropy; cw: CW margin; kl: TRADES' KL to the clean prediction;
                                # targeted-margin: h_t - max_{j != t} h_j towards pgd_attack's `target`;
                                # targeted-ce: -CE(h, target) (iterative least-likely class, ILCM);
                                # label-mi: minus the batch's plug-in I(Y; Y^) (PGD minimises the label MI)
    random_start: str = "uniform"  # uniform: uniform in the ball; normal: 0.001 * N(0, 1) (TRADES); none

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.loss not in ATTACK_LOSSES:
            raise ValueError(f"unknown attack loss {self.loss!r}; choose one of {ATTACK_LOSSES}")
        if self.random_start not in ("uniform", "normal", "none"):
            raise ValueError(f"unknown random start {self.random_start!r}")
        if not self.epsilon > 0 or not self.step_size > 0 or self.num_steps < 1:
            raise ValueError("PGD needs epsilon > 0, step_size > 0 and num_steps >= 1")


@contextmanager
def frozen_eval(model):
    """Eval mode with no parameter gradients for the duration; the model's mode and flags are restored."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _per_example_norm(t, norm):
    flat = t.flatten(1)
    norms = flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1)))


def project(delta, norm, epsilon):
    """Project each perturbation of the batch onto the epsilon ball of the given norm."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / _per_example_norm(delta, "l2").clamp_min(_TINY)).clamp(max=1.0)
    return delta * scale


def random_start(x, config, generator):
    """The initial perturbation: uniform in the ball, small Gaussian (TRADES), or zero."""
    if config.random_start == "none":
        return torch.zeros_like(x)
    if config.random_start == "normal":
        return 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if config.norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * config.epsilon
    # Uniform in the L2 ball: a uniform direction times a radius with density ~ r^(d-1).
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _per_example_norm(direction, "l2").clamp_min(_TINY)
    d = x[0].numel()
    u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
    return direction * config.epsilon * u.pow(1.0 / d)


def cw_margin(logits, y):
    """Per-example CW margin max_{j != y} z_j - z_y (positive when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def targeted_margin(logits, target):
    """Per-example targeted margin h_t - max_{j != t} h_j (positive when the model predicts t); the other
    logits are masked with -inf (cw_margin), so it is right when every logit is <= 0."""
    return -cw_margin(logits, target)


def attack_objective(logits, y, loss, clean_probs=None, target=None):
    """The summed quantity that PGD ascends (a sum keeps per-example gradients independent of the batch size).
    The exception is "label-mi": minus the plug-in label MI of the whole batch's soft confusion matrix
    (utils.label_mi.label_mi, in float32), a joint objective, so each example's gradient depends on its batch."""
    if loss == "label-mi":
        return -label_mi(F.softmax(logits.float(), dim=1), y)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if loss == "cw":
        return cw_margin(logits, y).sum()
    if loss == "targeted-margin":
        return targeted_margin(logits, target).sum()
    if loss == "targeted-ce":
        return -F.cross_entropy(logits, target, reduction="sum")
    return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="sum")


def _ascent_step(grad, norm, step_size):
    if norm == "linf":
        return step_size * grad.sign()
    return step_size * grad / _per_example_norm(grad, "l2").clamp_min(_TINY)


def ascend(x, delta, grad, norm: str, step_size: float, epsilon: float):
    """One PGD update from the objective's gradient: a step up the gradient (its sign under L-inf, its
    direction under L2), then back into the epsilon ball and into [0, 1]."""
    delta = delta + _ascent_step(grad, norm, step_size)
    delta = project(delta, norm, epsilon)
    return (x + delta).clamp(0, 1) - x


_COMPILED_ASCEND = {}  # backend -> torch.compile(ascend), made on first use
COMPILED_STEP_ATTRIBUTE = "pgd_compiled_step"


def compile_attack_step(model, backend: str = "inductor"):
    """Have pgd_attack run its update on this model through torch.compile: one fused kernel instead of
    about six (the model's own forward and backward are compiled by model.compile())."""
    setattr(model, COMPILED_STEP_ATTRIBUTE, backend)


def _update_for(model, x, config: PGDConfig):
    """The update pgd_attack runs, with the step size and epsilon as it takes them: floats for the eager
    update; for the compiled one, 0-dim tensors written on x's device by torch.full (no copy from the host),
    since torch.compile specialises on clamp's float bounds and an epsilon ramp would recompile it every batch."""
    backend = getattr(model, COMPILED_STEP_ATTRIBUTE, None)
    if backend is None:
        return ascend, config.step_size, config.epsilon
    if backend not in _COMPILED_ASCEND:
        _COMPILED_ASCEND[backend] = torch.compile(ascend, backend=backend)
    step_size, epsilon = (torch.full((), value, device=x.device, dtype=x.dtype)
                          for value in (config.step_size, config.epsilon))
    return _COMPILED_ASCEND[backend], step_size, epsilon


def pgd_attack(model, x, y, config: PGDConfig, generator=None, target=None):
    """Adversarial examples for (x, y) within config's ball around x and inside [0, 1].

    The model runs in eval mode with parameter gradients off (both restored afterwards), the random
    start comes from `generator` (a torch.Generator on x's device; a fresh nondeterministically
    seeded one when None), never from the global RNG, and the result is detached. Nothing in the loop
    reads a value back to the host (no .item(), no data-dependent branch), so on a GPU the host queues
    every step without waiting for the device; the update is compiled when compile_attack_step(model) was called.
    `target` (a class per example) is the class the "targeted-margin" and "targeted-ce" losses push towards; other
    losses ignore it.
    """
    if config.loss in ("targeted-margin", "targeted-ce") and target is None:
        raise ValueError(f'the "{config.loss}" loss needs a target class per example')
    if generator is None:
        generator = torch.Generator(device=x.device)
        generator.seed()
    x = x.detach()
    with frozen_eval(model):
        clean_probs = None
        if config.loss == "kl":
            with torch.no_grad():
                clean_probs = F.softmax(model(x), dim=1)
        delta = project(random_start(x, config, generator), config.norm, config.epsilon)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        update, step_size, epsilon = _update_for(model, x, config)
        for _ in range(config.num_steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                objective = attack_objective(model(x + delta), y, config.loss, clean_probs, target)
                grad, = torch.autograd.grad(objective, delta)
            with torch.no_grad():
                delta = update(x, delta.detach(), grad, config.norm, step_size, epsilon)
    return (x + delta).detach()


def momentum_attack(model, x, y, epsilon: float, step_size: float, num_steps: int, decay: float = 1.0):
    """MI-FGSM (Dong et al. 2018) under L-inf, on the cross-entropy, from x itself (no random start):
    g <- decay * g + grad / mean|grad| (per example), x <- clip to the ball and [0, 1] of x + step * sign(g).

    torchattacks' MIFGSM computes the same (it handles one channel and the [0, 1] box correctly) but divides
    by mean|grad| unguarded: where the cross-entropy is saturated, as on an MMC model whose logits are ~10^2
    apart, the gradient is exactly 0, its momentum becomes NaN for good, and since sign(NaN) = 0 the example
    stops there even where the momentum would carry it on. Here a zero gradient adds nothing to the momentum.
    The model runs as in pgd_attack (eval mode, parameter gradients off, both restored)."""
    x = x.detach()
    with frozen_eval(model):
        delta = torch.zeros_like(x)
        momentum = torch.zeros_like(x)
        dims = tuple(range(1, x.dim()))
        for _ in range(num_steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                objective = attack_objective(model(x + delta), y, "ce")
                grad, = torch.autograd.grad(objective, delta)
            with torch.no_grad():
                scale = grad.abs().mean(dim=dims, keepdim=True)
                momentum = decay * momentum + grad / torch.where(scale > 0, scale, torch.ones_like(scale))
                delta = ascend(x, delta.detach(), momentum, "linf", step_size, epsilon)
    return (x + delta).detach()


def perturbation_norms(x_adv, x, norm):
    """Per-example norm of x_adv - x (for budget checks)."""
    return _per_example_norm(x_adv - x, norm).flatten()
