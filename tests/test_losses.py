"""Standard AT, TRADES and MART losses against hand computations on a fixed example."""
import math

import torch

from utils.losses import OBJECTIVES, mart_loss, standard_at_loss, trades_loss

LOGITS_NAT = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]]
LOGITS_ADV = [[0.5, 1.5, 0.0], [0.2, 0.4, 1.1]]
LABELS = [0, 1]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def tensors():
    return torch.tensor(LOGITS_NAT), torch.tensor(LOGITS_ADV), torch.tensor(LABELS)


def test_standard_at_is_cross_entropy_on_adversarials():
    expected = sum(-math.log(softmax(row)[y]) for row, y in zip(LOGITS_ADV, LABELS)) / 2
    assert math.isclose(standard_at_loss(*tensors()).item(), expected, rel_tol=1e-6)


def test_trades_by_hand():
    beta = 6.0
    ce = sum(-math.log(softmax(row)[y]) for row, y in zip(LOGITS_NAT, LABELS)) / 2
    kls = sum(kl(softmax(n), softmax(a)) for n, a in zip(LOGITS_NAT, LOGITS_ADV)) / 2
    assert math.isclose(trades_loss(*tensors(), beta=beta).item(), ce + beta * kls, rel_tol=1e-6)


def test_mart_by_hand():
    beta, total = 6.0, 0.0
    for nat, adv, y in zip(LOGITS_NAT, LOGITS_ADV, LABELS):
        p_adv, p_nat = softmax(adv), softmax(nat)
        hardest_wrong = max((p, j) for j, p in enumerate(p_adv) if j != y)[1]
        boosted_ce = -math.log(p_adv[y]) - math.log(1.0001 - p_adv[hardest_wrong] + 1e-12)
        weighted_kl = sum(pn * (math.log(pn) - math.log(pa + 1e-12)) for pn, pa in zip(p_nat, p_adv)) * (1.0000001 - p_nat[y])
        total += boosted_ce + beta * weighted_kl
    assert math.isclose(mart_loss(*tensors(), beta=beta).item(), total / 2, rel_tol=1e-5)


def test_objectives_pick_the_right_training_attack():
    assert OBJECTIVES["at"].attack_loss == "ce" and not OBJECTIVES["at"].needs_clean_logits
    assert OBJECTIVES["trades"].attack_loss == "kl" and OBJECTIVES["trades"].needs_clean_logits
    assert OBJECTIVES["mart"].attack_loss == "ce" and OBJECTIVES["mart"].needs_clean_logits
