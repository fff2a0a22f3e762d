"""MI estimates, the Eq. 6 selection and the stage-2 objectives against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.estimators import LocalEncoder, MIEstimator, build_estimators
from utils.mi import (MI_MEASURES, cosine, masked_mean, mi_estimate, mi_from_scores, only_max_objective,
                      paper_objective, reference_objective, select_misled)

# s[i][j] for one location (K = 1): global vector of sample i against the local patch of sample j.
S = [[2.0, 0.5, -1.0],
     [1.0, 3.0, 0.0],
     [0.2, -0.4, 1.5]]


def scores():
    return torch.tensor(S)[:, :, None]


def softplus(v):
    return math.log1p(math.exp(v))


def test_dv_excludes_the_diagonal_by_hand():
    expected = [S[i][i] - math.log(sum(math.exp(S[i][j]) for j in range(3) if j != i)) + math.log(2) for i in range(3)]
    assert torch.allclose(mi_from_scores(scores(), "dv"), torch.tensor(expected), atol=1e-6)
    # The published code's version, with exp(0) = 1 added for the zeroed diagonal, differs:
    buggy = [S[i][i] - math.log(1 + sum(math.exp(S[i][j]) for j in range(3) if j != i)) + math.log(2) for i in range(3)]
    assert not torch.allclose(mi_from_scores(scores(), "dv"), torch.tensor(buggy), atol=1e-3)


def test_jsd_and_nce_by_hand():
    jsd = [(math.log(2) - softplus(-S[i][i])) - sum(softplus(S[i][j]) - math.log(2) for j in range(3) if j != i) / 2
           for i in range(3)]
    nce = [S[i][i] - math.log(sum(math.exp(S[i][j]) for j in range(3))) + math.log(3) for i in range(3)]
    assert torch.allclose(mi_from_scores(scores(), "jsd"), torch.tensor(jsd), atol=1e-6)
    assert torch.allclose(mi_from_scores(scores(), "nce"), torch.tensor(nce), atol=1e-6)


def test_locations_are_averaged():
    two_locations = torch.stack([torch.tensor(S), torch.tensor(S) * 2], dim=2)
    expected = (mi_from_scores(scores(), "dv") + mi_from_scores(scores() * 2, "dv")) / 2
    assert torch.allclose(mi_from_scores(two_locations, "dv"), expected, atol=1e-6)


@pytest.mark.parametrize("measure", MI_MEASURES)
def test_fewer_than_two_samples_give_zeros_not_nan(measure):
    assert torch.equal(mi_from_scores(torch.ones(1, 1, 4), measure), torch.zeros(1))
    assert mi_from_scores(torch.ones(0, 0, 4), measure).shape == (0,)


def test_local_map_size_follows_the_input():
    assert LocalEncoder(1, 16)(torch.rand(2, 1, 28, 28)).shape == (2, 16, 49)
    assert LocalEncoder(3, 16)(torch.rand(2, 3, 32, 32)).shape == (2, 16, 64)
    assert LocalEncoder(3, 16)(torch.rand(2, 3, 64, 64)).shape == (2, 16, 256)


def test_shortcut_starts_close_to_identity():
    estimator = MIEstimator(in_channels=1, num_classes=10, hsize=32)
    weight = estimator.head.block.shortcut.weight[:, :, 0, 0]
    assert torch.equal(weight[:10].diagonal(), torch.ones(10))
    off_diagonal = weight[:10] - torch.diag(weight[:10].diagonal())
    assert off_diagonal.abs().max() <= 0.01 and weight[10:].abs().max() <= 0.01


def label_images(labels, generator):
    """16x16 images whose mean intensity encodes the label, plus noise: u depends on the label."""
    base = (labels.float() + 1) / 5
    return (base[:, None, None, None] + 0.05 * torch.randn(len(labels), 1, 16, 16, generator=generator)).clamp(0, 1)


@pytest.mark.parametrize("measure", MI_MEASURES)
def test_dependent_pairs_score_higher_than_independent_ones(measure):
    """A known answer: local inputs that encode the label carry information about label-like logits,
    shuffled pairs carry none. After brief training the estimate separates them."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    estimator = MIEstimator(in_channels=1, num_classes=4, hsize=32)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-3)
    for _ in range(60):
        labels = torch.randint(0, 4, (32,), generator=generator)
        logits = 3 * F.one_hot(labels, 4).float() + 0.1 * torch.randn(32, 4, generator=generator)
        loss = -mi_estimate(estimator, estimator.encode_local(label_images(labels, generator)), logits, measure).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    estimator.eval()
    with torch.no_grad():
        labels = torch.randint(0, 4, (64,), generator=generator)
        logits = 3 * F.one_hot(labels, 4).float()
        local = estimator.encode_local(label_images(labels, generator))
        dependent = mi_estimate(estimator, local, logits, measure).mean()
        shuffled = mi_estimate(estimator, local, logits[torch.randperm(64, generator=generator)], measure).mean()
    assert dependent > shuffled + 0.1, (measure, float(dependent), float(shuffled))


def test_selection_uses_argmax_over_classes():
    logits_nat = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, 0.0], [0.0, 1.0]])
    logits_adv = torch.tensor([[0.0, 1.0], [0.0, 2.0], [4.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 0, 0])
    # sample 0: right then fooled -> selected; 1: robust; 2: robust; 3: wrong when natural
    assert select_misled(logits_nat, logits_adv, y).tolist() == [True, False, False, False]


def test_masked_mean_and_cosine_on_empty_sets_are_zero():
    values, empty = torch.tensor([1.0, 2.0]), torch.tensor([False, False])
    assert masked_mean(values, empty).item() == 0.0
    assert cosine(values, values, empty).item() == 0.0
    assert masked_mean(values, torch.tensor([True, False])).item() == 1.0


def quantities():
    return {"nat_mi_clean": torch.tensor([1.0, 2.0, 3.0, 4.0]), "nat_mi_adv": torch.tensor([0.5, 1.0, 1.0, 2.0]),
            "adv_mi_adv": torch.tensor([2.0, 0.0, 1.0, 1.0]), "adv_mi_clean": torch.tensor([1.0, 1.0, 0.0, 3.0])}


LOGITS_NAT = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
LOGITS_ADV = torch.tensor([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
Y = torch.tensor([0, 0, 1, 0])  # correct: 0, 1, 2; fooled: 0, 2; selected X' = {0, 2}


def test_paper_objective_by_hand():
    beta = 0.5
    natural = ((1.0 - beta * 0.5) + (3.0 - beta * 1.0)) / 2
    adversarial = ((2.0 - beta * 1.0) + (1.0 - beta * 0.0)) / 2
    assert paper_objective(quantities(), LOGITS_NAT, LOGITS_ADV, Y, beta=beta).item() == pytest.approx(-(natural + adversarial))


def test_paper_objective_with_no_selected_sample_is_zero():
    all_wrong = torch.tensor([1, 1, 0, 1])  # no sample is correct when natural
    assert paper_objective(quantities(), LOGITS_NAT, LOGITS_ADV, all_wrong).item() == 0.0


def test_only_max_objective_by_hand():
    natural = (1.0 + 2.0 + 3.0) / 3       # I_N(x; h(x)) over the correct samples 0, 1, 2
    adversarial = (2.0 + 1.0) / 2         # I_A(n; h(x~)) over the fooled samples 0, 2
    assert only_max_objective(quantities(), LOGITS_NAT, LOGITS_ADV, Y).item() == pytest.approx(-(natural + adversarial))


def test_reference_objective_by_hand():
    q = quantities()
    q["adv_mi_adv"] = torch.tensor([2.0, 0.5, 1.0, 1.0])
    q["adv_mi_clean"] = torch.tensor([1.0, 1.5, 0.5, 3.0])
    def cos(a, b):
        return sum(u * v for u, v in zip(a, b)) / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))
    pick = lambda name, idx: [q[name][i].item() for i in idx]
    wrong, robust, n_correct = [0, 2], [1], 3  # sample 3 is wrong when natural: in neither subset
    w_nat = 5 * abs(cos(pick("nat_mi_clean", wrong), pick("nat_mi_adv", wrong))) - sum(pick("nat_mi_clean", wrong)) / n_correct
    w_adv = 5 * abs(cos(pick("adv_mi_adv", wrong), pick("adv_mi_clean", wrong))) - sum(pick("adv_mi_adv", wrong)) / len(wrong)
    r_nat = 5 * abs(1 - cos(pick("nat_mi_clean", robust), pick("nat_mi_adv", robust))) - sum(pick("nat_mi_clean", robust)) / n_correct
    r_adv = 8 * abs(1 - cos(pick("adv_mi_clean", robust), pick("adv_mi_adv", robust))) + 0.1 * sum(pick("adv_mi_adv", robust)) / len(robust)
    expected = w_nat + w_adv + 0.5 * (r_nat + r_adv)
    assert reference_objective(q, LOGITS_NAT, LOGITS_ADV, Y).item() == pytest.approx(expected, rel=1e-5)


def test_objectives_give_finite_gradients_to_the_estimators():
    torch.manual_seed(0)
    estimators = build_estimators(in_channels=1, num_classes=2, hsize=16)
    x, x_adv = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    from utils.mi import local_encodings, mi_quantities
    for objective in (paper_objective, only_max_objective, reference_objective):
        estimators.zero_grad()
        local_nat, local_adv = local_encodings(estimators, x, x_adv)
        q = mi_quantities(estimators, local_nat, local_adv, LOGITS_NAT, LOGITS_ADV)
        objective(q, LOGITS_NAT, LOGITS_ADV, Y).backward()
        grads = [p.grad for p in estimators.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), objective.__name__


@pytest.mark.parametrize("measure", MI_MEASURES)
def test_a_constant_critic_scores_at_most_zero(measure):
    constant = torch.full((5, 5, 3), 0.7)
    assert (mi_from_scores(constant, measure) <= 1e-6).all()


# ---------------------------------------------------------------------------------------------------------
# Wiring: which estimator reads which input, and precision

def wiring_setup(train=False):
    torch.manual_seed(0)
    estimators = build_estimators(in_channels=1, num_classes=10, hsize=16).train(train)
    x = torch.rand(6, 1, 28, 28)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    logits_nat, logits_adv = torch.randn(6, 10), torch.randn(6, 10) * 2 + 1
    return estimators, x, x_adv, logits_nat, logits_adv


def test_the_adversarial_estimator_reads_the_pattern_and_the_natural_one_the_image():
    from utils.mi import local_encodings
    estimators, x, x_adv, _, _ = wiring_setup()
    local_nat, local_adv = local_encodings(estimators, x, x_adv)
    assert torch.allclose(local_nat, estimators["natural"].encode_local(x), atol=1e-6)
    assert torch.allclose(local_adv, estimators["adversarial"].encode_local(x_adv - x), atol=1e-6)
    assert not torch.allclose(local_adv, estimators["adversarial"].encode_local(x_adv), atol=1e-3), "E_a was fed x~, not n"


@pytest.mark.parametrize("train", [False, True])
def test_each_quantity_pairs_its_own_estimator_encoding_and_logits(train):
    """I_N(x; h(x~)) must read h(x~), I_A(n; h(x)) must read h(x), and so on: each quantity equals the
    hand-wired pairing and differs from every other pairing of the same estimator."""
    from utils.mi import QUANTITIES, local_encodings, mi_from_scores, mi_quantities, score_tensor
    estimators, x, x_adv, logits_nat, logits_adv = wiring_setup(train)
    local = dict(zip(("nat", "adv"), local_encodings(estimators, x, x_adv)))
    q = mi_quantities(estimators, local["nat"], local["adv"], logits_nat, logits_adv)
    expected_pairs = {"nat_mi_clean": ("natural", "nat", "nat"), "nat_mi_adv": ("natural", "nat", "adv"),
                      "adv_mi_adv": ("adversarial", "adv", "adv"), "adv_mi_clean": ("adversarial", "adv", "nat")}

    def by_hand(estimator, local_key, logits_key):
        # the head sees h(x) and h(x~) as one batch (in train mode its BN statistics are shared)
        g_nat, g_adv = estimators[estimator].encode_global(torch.cat([logits_nat, logits_adv])).chunk(2)
        return mi_from_scores(score_tensor({"nat": g_nat, "adv": g_adv}[logits_key], local[local_key]))

    for name in QUANTITIES:
        estimator, local_key, logits_key = expected_pairs[name]
        assert torch.allclose(q[name], by_hand(estimator, local_key, logits_key), atol=1e-5), name
        wrong_logits = {"nat": "adv", "adv": "nat"}[logits_key]
        assert not torch.allclose(q[name], by_hand(estimator, local_key, wrong_logits), atol=1e-3), f"{name} reads the wrong logits"
        other = {"natural": "adversarial", "adversarial": "natural"}[estimator]
        other_local = {"nat": "adv", "adv": "nat"}[local_key]
        assert not torch.allclose(q[name], by_hand(other, other_local, logits_key), atol=1e-3), f"{name} uses the wrong estimator"


def test_in_train_mode_the_global_head_normalises_both_logit_batches_together():
    """Separate passes would normalise h(x) and h(x~) with their own batch statistics in stage 2 and with
    the shared running statistics afterwards."""
    from utils.mi import local_encodings, mi_estimate, mi_quantities
    estimators, x, x_adv, logits_nat, logits_adv = wiring_setup(train=True)
    local_nat, local_adv = local_encodings(estimators, x, x_adv)
    q = mi_quantities(estimators, local_nat, local_adv, logits_nat, logits_adv)
    separate = mi_estimate(estimators["natural"], local_nat, logits_adv)
    assert not torch.allclose(q["nat_mi_adv"], separate, atol=1e-3)
    estimators.eval()  # in eval mode (running statistics) one pass and two passes agree
    q = mi_quantities(estimators, local_nat, local_adv, logits_nat, logits_adv)
    assert torch.allclose(q["nat_mi_adv"], mi_estimate(estimators["natural"], local_nat, logits_adv), atol=1e-5)


def test_estimators_run_in_float32_under_bf16_autocast():
    """--amp may put the target and the attacks in bf16, never the estimators, scores or MI reductions
    (CPU bf16 autocast stands in for CUDA's here)."""
    from tests.helpers import assert_all_float32_without_autocast, record_estimator_precision
    from utils.mi import local_encodings, mi_quantities
    estimators, x, x_adv, logits_nat, logits_adv = wiring_setup()
    reference = mi_quantities(estimators, *local_encodings(estimators, x, x_adv), logits_nat, logits_adv)
    seen = record_estimator_precision(estimators)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local_nat, local_adv = local_encodings(estimators, x, x_adv)
        q = mi_quantities(estimators, local_nat, local_adv, logits_nat.bfloat16(), logits_adv.bfloat16())
    assert_all_float32_without_autocast(seen)
    for name in q:
        assert q[name].dtype == torch.float32
        # the logits were rounded to bf16 on the way in; everything after that is float32
        assert torch.allclose(q[name], reference[name], atol=0.05), (name, (q[name] - reference[name]).abs().max())
