"""The Frank-Wolfe Wasserstein attack (FWA) of Wu, Wang and Yu, "Stronger and Faster Wasserstein
Adversarial Attacks" (ICML 2020): Frank-Wolfe with the linear minimisation oracle solved on its
entropic-regularised dual.

No installable library provides it (the authors' repository needs a compiled extension and is not
packaged, and the NAMID published code's import of it was broken), so it is written here from the paper.

Threat model. Each channel of an image x is a histogram of pixel mass. An adversarial image is
x' = Pi^T 1 for a transport plan Pi >= 0 with Pi 1 = x (every pixel's mass goes somewhere: mass
conservation) and transport cost <Pi, C> <= radius * sum(x): the radius is relative to the image's
total mass, as in Wong et al. (2019) and Wu et al. (2020). C is the Euclidean distance between pixel
positions; mass moves only inside a kernel_size x kernel_size window (local transport, 5 in the paper)
and never between channels.

Algorithm, per batch:
    Pi_0 = the identity plan (x' = x)
    for t = 0 .. T-1:
        g = grad of CE(h(x'_t), y) w.r.t. x'_t;  G[i, o] = g[i + o] / max|g|  (gradient w.r.t. the plan)
        S = argmax over feasible plans of <Pi, G> + gamma * entropy(Pi)        (the LMO)
        Pi_{t+1} = (1 - eta_t) Pi_t + eta_t S,  eta_t = 2 / (t + 2)
The LMO's dual has one variable, the multiplier lambda >= 0 of the cost constraint: for a given
lambda every row of the plan is x_i * softmax_o((G[i, o] - lambda C[o]) / gamma), and the cost of that
plan falls as lambda grows, so lambda is found by bisection (lambda = 0 when the budget does not bind).

Where this differs from the authors' code, and why:
- The box [0, 1]: x' = Pi^T 1 exceeds 1 where mass piles up. The authors clip the final image, which
  destroys mass and leaves the Wasserstein ball. Here the mass that would overflow a pixel is sent
  back to where it came from ("capacity repair"): row sums are kept and the cost only falls, so the
  returned image is exactly the image of a feasible plan. The model is attacked at the repaired image,
  and the gradient there drives the next LMO as if the repair were the identity.
- The bisection returns the feasible end of its bracket, so every LMO answer meets the budget (the
  authors take the midpoint, which can exceed it by the tolerance).
- Per example, the latest iterate that the model misclassified is returned (the paper returns the
  last iterate); any iterate is feasible, so this only makes the evaluation stricter.

The plan is stored densely over the local window: a tensor (B, C, K, H*W) with K = kernel_size^2,
entry [b, c, o, i] = mass sent from pixel i to pixel i + offset_o. F.unfold gathers a per-pixel
quantity onto the plan's entries and F.fold (its adjoint) sums a plan into the image it produces.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.attacks import frozen_eval


@dataclass(frozen=True)
class FWAConfig:
    """Settings of the Frank-Wolfe Wasserstein attack; radius is relative to the image's total mass."""
    radius: float = 0.005
    num_steps: int = 40
    kernel_size: int = 5
    entropy: float = 1e-3        # gamma of the entropic regularisation (gradients are scaled to max 1)
    dual_steps: int = 20         # bisection steps on the dual variable (bracket width 2^-20 * ~2)
    repair_rounds: int = 50      # capacity-repair rounds before the conservative fallback (~15-25 suffice)

    def __post_init__(self):
        if not self.radius > 0 or not self.entropy > 0:
            raise ValueError("FWA needs radius > 0 and entropy > 0")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"FWA's kernel size must be odd and >= 3, got {self.kernel_size}")
        if self.num_steps < 1 or self.dual_steps < 1 or self.repair_rounds < 0:
            raise ValueError("FWA needs num_steps >= 1, dual_steps >= 1 and repair_rounds >= 0")


class LocalTransport:
    """The geometry of local transport on (H, W) images: window offsets, their costs and validity."""

    def __init__(self, height: int, width: int, kernel_size: int, device, dtype=torch.float32):
        self.height, self.width, self.kernel_size = height, width, kernel_size
        self.padding = kernel_size // 2
        self.centre = (kernel_size * kernel_size) // 2  # the offset (0, 0): mass that stays put
        steps = torch.arange(kernel_size, device=device, dtype=dtype) - self.padding
        dy, dx = torch.meshgrid(steps, steps, indexing="ij")
        self.cost = (dy ** 2 + dx ** 2).sqrt().reshape(1, 1, -1, 1)  # (1, 1, K, 1), Euclidean pixel distance
        ones = torch.ones(1, 1, height, width, device=device, dtype=dtype)
        self.valid = self.gather(ones).bool()  # (1, 1, K, HW): the destination lies inside the image

    def gather(self, image):
        """(B, C, H, W) -> (B, C, K, HW): entry [o, i] holds image[i + offset_o] (0 outside the image)."""
        b, c, h, w = image.shape
        cols = F.unfold(image.reshape(b * c, 1, h, w), self.kernel_size, padding=self.padding)
        return cols.reshape(b, c, -1, h * w)

    def image_of(self, plan):
        """The image a plan produces: the mass arriving at every pixel (column sums)."""
        b, c, k, n = plan.shape
        image = F.fold(plan.reshape(b * c, k, n), (self.height, self.width), self.kernel_size, padding=self.padding)
        return image.reshape(b, c, self.height, self.width)

    def identity_plan(self, x):
        """The plan that moves nothing (its image is x)."""
        b, c, h, w = x.shape
        plan = x.new_zeros(b, c, self.kernel_size ** 2, h * w)
        plan[:, :, self.centre] = x.reshape(b, c, h * w)
        return plan

    def cost_of(self, plan):
        """Per-example transport cost <Pi, C>."""
        return (plan * self.cost).sum(dim=(1, 2, 3))

    def source_mass(self, plan):
        """Per-pixel mass leaving each source pixel (row sums), as an image-shaped (B, C, H, W) tensor."""
        b, c, _, _ = plan.shape
        return plan.sum(dim=2).reshape(b, c, self.height, self.width)


# Overflow below this is float rounding (scaling by 1 - 1e-7 / incoming can round to 1 and never
# converge); the attack's final clamp to [0, 1] removes it.
_ROUNDING = 1e-6


def transport_budget(x, radius: float):
    """The per-example cost budget: radius times the image's total mass."""
    return radius * x.flatten(1).sum(dim=1)


def _dual_upper_bound(geometry: LocalTransport, radius: float, gamma: float) -> float:
    """A lambda at which the entropic LMO surely meets the budget.

    With gradients scaled into [-1, 1], an off-diagonal entry's weight relative to the row's stay-put
    entry is at most exp((2 - lambda * 1) / gamma) (every move costs >= 1), so the row cost is at most
    x_i (K - 1) C_max exp((2 - lambda) / gamma), which is <= radius * x_i once lambda reaches this bound.
    """
    k = geometry.kernel_size ** 2
    c_max = float(geometry.cost.max())
    return 2.0 + gamma * max(0.0, math.log((k - 1) * c_max / radius)) + 1e-3


def linear_minimisation_oracle(gradient, x, geometry: LocalTransport, budget, config: FWAConfig):
    """argmax over feasible plans of <Pi, gradient> + gamma * entropy(Pi), by bisection on the dual.

    gradient: (B, C, K, HW), scaled so that every |entry| <= 1. The returned plan has row sums x,
    is zero outside the image, and costs at most `budget` (the feasible end of the bracket is kept;
    an example whose bracket never became feasible, which the bound rules out, keeps the identity plan).
    """
    b = x.shape[0]
    rows = x.reshape(b, x.shape[1], 1, -1)
    scaled = (gradient / config.entropy).masked_fill(~geometry.valid, float("-inf"))
    scaled_cost = geometry.cost / config.entropy

    def weights_at(lam):  # per row, the softmax over the window
        return torch.softmax(scaled - lam.view(-1, 1, 1, 1) * scaled_cost, dim=2)

    def cost_at(lam):
        return (rows * (weights_at(lam) * geometry.cost).sum(dim=2, keepdim=True)).sum(dim=(1, 2, 3))

    low = x.new_zeros(b)
    high = torch.where(cost_at(low) <= budget, low,
                       x.new_full((b,), _dual_upper_bound(geometry, config.radius, config.entropy)))
    for _ in range(config.dual_steps):
        middle = (low + high) / 2
        ok = cost_at(middle) <= budget
        high = torch.where(ok, middle, high)
        low = torch.where(ok, low, middle)
    plan = rows * weights_at(high)
    ok = (geometry.cost_of(plan) <= budget).view(-1, 1, 1, 1)
    return torch.where(ok, plan, geometry.identity_plan(x))


def _scale_incoming(plan, keep, geometry: LocalTransport):
    """Scale the mass moving into every pixel j by keep[j] and leave the rest at its source."""
    factor = geometry.gather(keep)
    factor[:, :, geometry.centre] = 1.0  # mass that stays put is never scaled
    kept = plan * factor
    returned = (plan - kept).sum(dim=2)
    kept[:, :, geometry.centre] += returned
    return kept


def capacity_repair(plan, x, geometry: LocalTransport, rounds: int):
    """A plan whose image lies in [0, 1], made by sending overflowing mass back to its source.

    Row sums are unchanged and the cost can only fall. Each round scales the mass moving into every
    overflowing pixel just enough to remove the overflow; returned mass can make its source overflow in
    turn, so after `rounds` rounds any example still overflowing gets a conservative pass that keeps
    x_j + incoming_j <= 1 everywhere (which bounds the final image by 1 whatever is returned).
    """
    for _ in range(rounds):
        image = geometry.image_of(plan)
        excess = (image - 1).clamp_min(0)
        if not bool((excess > _ROUNDING).any()):
            return plan
        incoming = image - plan[:, :, geometry.centre].reshape(image.shape)
        keep = torch.where(incoming > 0, 1 - excess / incoming.clamp_min(1e-30), torch.ones_like(incoming))
        plan = _scale_incoming(plan, keep.clamp(0, 1), geometry)
    image = geometry.image_of(plan)
    overflowing = (image > 1 + _ROUNDING).flatten(1).any(dim=1)
    if not bool(overflowing.any()):
        return plan
    incoming = image - plan[:, :, geometry.centre].reshape(image.shape)
    keep = torch.where(incoming > 0, (1 - x) / incoming.clamp_min(1e-30), torch.ones_like(incoming)).clamp(0, 1)
    conservative = _scale_incoming(plan, keep, geometry)
    return torch.where(overflowing.view(-1, 1, 1, 1), conservative, plan)


def _loss_gradient(model, image, y):
    """Per-example CE gradient at `image` and the logits there (the model is already frozen)."""
    image = image.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(image)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        grad, = torch.autograd.grad(loss, image)
    return grad.float(), logits.detach()


def _keep_if_fooled(logits, y, plan, best, ever_fooled):
    """Per example, the latest plan whose image the model misclassifies."""
    fooled = logits.argmax(dim=1) != y
    return torch.where(fooled.view(-1, 1, 1, 1), plan, best), ever_fooled | fooled


def fw_wasserstein_attack(model, x, y, config: FWAConfig, return_plan: bool = False):
    """FWA adversarials for (x, y): images of feasible transport plans, inside [0, 1].

    The model runs in eval mode with parameter gradients off (both restored). Deterministic: no
    random numbers are drawn. With return_plan, also returns the (B, C, K, HW) plan whose image each
    adversarial is (see LocalTransport for the layout), for checking the constraints.
    """
    x = x.detach()
    original_dtype = x.dtype
    x = x.float()
    geometry = LocalTransport(x.shape[2], x.shape[3], config.kernel_size, x.device)
    budget = transport_budget(x, config.radius)
    plan = geometry.identity_plan(x)
    best, ever_fooled = plan, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with frozen_eval(model):
        for t in range(config.num_steps):
            feasible_plan = capacity_repair(plan, x, geometry, config.repair_rounds)
            grad, logits = _loss_gradient(model, geometry.image_of(feasible_plan).clamp(0, 1), y)
            best, ever_fooled = _keep_if_fooled(logits, y, feasible_plan, best, ever_fooled)
            scale = grad.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            vertex = linear_minimisation_oracle(geometry.gather(grad / scale), x, geometry, budget, config)
            step = 2.0 / (t + 2)
            plan = (1 - step) * plan + step * vertex
        final_plan = capacity_repair(plan, x, geometry, config.repair_rounds)
        with torch.no_grad():
            logits = model(geometry.image_of(final_plan).clamp(0, 1))
        best, ever_fooled = _keep_if_fooled(logits, y, final_plan, best, ever_fooled)
    best = torch.where(ever_fooled.view(-1, 1, 1, 1), best, final_plan)
    # The clamp only removes float rounding (the repaired plan's image is within [0, 1] up to ~1e-7).
    x_adv = geometry.image_of(best).clamp(0, 1).to(original_dtype).detach()
    return (x_adv, best.detach()) if return_plan else x_adv
