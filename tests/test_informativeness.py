"""The informativeness check of stage 2 (docs/method.md section 5) and stage 3's refusal of estimators that fail it."""
import json
import math
import shutil

import pytest
import torch

import train_MIAT
from models.estimators import MIEstimator
from tests.helpers import assert_one_line_error, run_script
from utils.run_warnings import read_warnings
from utils.estimator_training import (MIN_GAIN_NATS, REPORT_FILE, collect_mi, informativeness, judge_estimator,
                                      uninformative_reason)
from utils.mi import derangement, local_encodings, mi_estimate, mi_quantities, paper_objective


def test_judge_estimator_by_hand():
    real, shuffled = torch.tensor([1.0, 1.2, 0.8, 1.0]), torch.tensor([-0.5, -0.3, -0.7, -0.5])
    verdict = judge_estimator(real, shuffled)
    se = math.sqrt((0.04 + 0.04) / 3) / 2  # sample std over sqrt(n)
    assert verdict["mean"] == pytest.approx(1.0) and verdict["se"] == pytest.approx(se, rel=1e-5)
    assert verdict["gain_over_shuffled"] == pytest.approx(1.5) and verdict["gain_se"] == pytest.approx(0.0, abs=1e-6)
    assert verdict["margin_over_constant"] == pytest.approx(3 * se, rel=1e-5)
    assert verdict["margin_over_shuffled"] == pytest.approx(MIN_GAIN_NATS)  # the floor binds
    assert verdict["verdict"] == "informative"
    # above 0 by 3 SE but below the floor; 2 SE above 0 only; below shuffled pairs; too few samples; NaN
    small = torch.full((1000,), 0.03) + 0.001 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    cases = [(small, small - 1.0), (torch.tensor([0.2, 0.6, -0.2, 0.2]), torch.full((4,), -1.0)),
             (real, real + 0.1), (real[:1], shuffled[:1]), (torch.tensor([1.0, float("nan")]), shuffled[:2])]
    for real_values, shuffled_values in cases:
        assert judge_estimator(real_values, shuffled_values)["verdict"] == "not informative", real_values[:4]


def test_derangement_pairs_every_sample_with_another():
    for n in (2, 3, 17, 128):
        permutation = derangement(n, torch.Generator().manual_seed(n))
        assert sorted(permutation.tolist()) == list(range(n))
        assert (permutation != torch.arange(n)).all()
    assert torch.equal(derangement(50, torch.Generator().manual_seed(1)), derangement(50, torch.Generator().manual_seed(1)))
    assert not torch.equal(derangement(50, torch.Generator().manual_seed(1)), derangement(50, torch.Generator().manual_seed(2)))


def synthetic_pairs(n, generator):
    """Images whose class pattern the 'logits' reveal: u = pattern_c + noise, h = 4 onehot(c) + noise."""
    classes = torch.randint(0, 10, (n,), generator=generator)
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(123))
    u = patterns[classes] + 0.5 * torch.randn(n, 1, 28, 28, generator=generator)
    logits = 4 * torch.nn.functional.one_hot(classes, 10).float() + 0.5 * torch.randn(n, 10, generator=generator)
    return u, logits


def trained_estimator(shuffle_pairs: bool):
    """An estimator trained by DV maximisation on dependent pairs, or on pairs whose logits were permuted
    across the batch (independent of the images)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    estimator = MIEstimator(1, 10, hsize=32)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-3)
    for _ in range(60):
        u, logits = synthetic_pairs(64, generator)
        if shuffle_pairs:
            logits = logits[torch.randperm(64, generator=generator)]
        loss = -mi_estimate(estimator, estimator.encode_local(u), logits).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return estimator.eval()


@torch.no_grad()
def held_out_verdict(estimator):
    """judge_estimator on 8 fresh batches of 64 dependent pairs, the reference shuffled by derangement()."""
    generator, shuffler = torch.Generator().manual_seed(99), torch.Generator().manual_seed(7)
    real, shuffled = [], []
    for _ in range(8):
        u, logits = synthetic_pairs(64, generator)
        local = estimator.encode_local(u)
        real.append(mi_estimate(estimator, local, logits))
        shuffled.append(mi_estimate(estimator, local[derangement(64, shuffler)], logits))
    return judge_estimator(torch.cat(real), torch.cat(shuffled))


def test_an_estimator_of_a_dependent_pair_is_informative_and_one_trained_on_shuffled_pairs_is_not():
    dependent = held_out_verdict(trained_estimator(shuffle_pairs=False))
    assert dependent["verdict"] == "informative" and dependent["mean"] > 0.5, dependent
    independent = held_out_verdict(trained_estimator(shuffle_pairs=True))
    assert independent["verdict"] == "not informative", independent
    assert abs(independent["mean"]) < 0.3, independent


def test_collect_mi_reference_is_the_same_estimator_on_deranged_pairs(tiny_estimators, tiny_target, fmnist_batches):
    """The shuffled values are mi_quantities with another sample's local encoding, drawn by derangement(seed)."""
    from utils.attacks import PGDConfig
    from utils.estimator_training import load_estimators
    from utils.training import load_model
    estimators, _ = load_estimators(tiny_estimators, "cpu")
    target, _ = load_model(tiny_target, "cpu")
    _, _, x, y = fmnist_batches
    x, y = x[:40], y[:40]
    attack = PGDConfig("linf", 0.1, 0.05, 2)
    values = collect_mi(estimators, target.eval(), [(x, y)], attack, lambda *a: torch.zeros(()), "cpu", 3, "dv")
    generator = torch.Generator().manual_seed(3)
    from utils.attacks import pgd_attack
    x_adv = pgd_attack(target, x, y, attack, generator)
    with torch.no_grad():
        logits_nat, logits_adv = target(torch.cat([x, x_adv])).chunk(2)
        local_nat, local_adv = local_encodings(estimators, x, x_adv)
        pairing = derangement(40, torch.Generator().manual_seed(3))
        by_hand = mi_quantities(estimators, local_nat[pairing], local_adv[pairing], logits_nat, logits_adv, "dv")
        real = mi_quantities(estimators, local_nat, local_adv, logits_nat, logits_adv, "dv")
    for name in ("nat_mi_clean", "adv_mi_adv"):
        assert torch.allclose(values[f"{name}_shuffled"], by_hand[name], atol=1e-5)
        assert torch.allclose(values[name], real[name], atol=1e-5)
        assert not torch.allclose(values[f"{name}_shuffled"], values[name], atol=1e-3)
    verdicts = informativeness(values)
    fooled = values["fooled"]
    assert verdicts["adversarial"]["n"] == int(fooled.sum()) and verdicts["natural"]["n"] == 40
    assert verdicts["adversarial"]["mean"] == pytest.approx(float(values["adv_mi_adv"][fooled].mean()), rel=1e-5, abs=1e-6)


def test_bounded_eq5_clamps_each_subtracted_estimate_at_zero():
    logits_nat = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])  # all correct for y = (0, 0, 1)
    logits_adv = torch.tensor([[0.0, 3.0], [0.0, 3.0], [0.0, 3.0]])  # samples 0 and 1 fooled: X' = {0, 1}
    y = torch.tensor([0, 0, 1])
    q = {"nat_mi_clean": torch.tensor([1.0, 2.0, 9.0]), "nat_mi_adv": torch.tensor([-50.0, 0.5, 9.0]),
         "adv_mi_adv": torch.tensor([0.4, 0.6, 9.0]), "adv_mi_clean": torch.tensor([0.3, -80.0, 9.0])}
    literal = -(((1 + 50) + (2 - 0.5)) / 2 + ((0.4 - 0.3) + (0.6 + 80)) / 2)
    bounded = -(((1 - 0) + (2 - 0.5)) / 2 + ((0.4 - 0.3) + (0.6 - 0)) / 2)
    assert float(paper_objective(q, logits_nat, logits_adv, y)) == pytest.approx(literal)
    assert float(paper_objective(q, logits_nat, logits_adv, y, bounded=True)) == pytest.approx(bounded)


# ---------------------------------------------------------------------------------------------------------
# Stage 3 refuses estimators whose report does not judge them informative


def estimators_with_report(tiny_estimators, folder, natural_gain, adversarial_gain):
    """A copy of the tiny estimators next to a report computed by informativeness() on synthetic values."""
    folder.mkdir()
    shutil.copy(tiny_estimators, folder / "estimators.pt")
    generator = torch.Generator().manual_seed(0)
    noise = lambda: 0.1 * torch.randn(200, generator=generator)  # noqa: E731
    values = {"nat_mi_clean": natural_gain + noise(), "nat_mi_clean_shuffled": noise() - 0.5,
              "adv_mi_adv": adversarial_gain + noise(), "adv_mi_adv_shuffled": noise() - 0.5,
              "fooled": torch.arange(200) % 2 == 0}
    (folder / REPORT_FILE).write_text(json.dumps({"informativeness": informativeness(values)}))
    return folder


def stage3_args(fmnist_dir, estimators, model_dir, *extra):
    return ["--estimators", str(estimators), "--data-dir", str(fmnist_dir), "--train-limit", "100", "--val-size", "50",
            "--test-limit", "50", "--batch-size", "50", "--num-steps", "1", "--eval-steps", "1", "--warmup-epochs", "0",
            "--eps-ramp-epochs", "0", "--epochs", "1", "--device", "cpu", "--model-dir", str(model_dir), *extra]


def test_stage3_refuses_uninformative_estimators_unless_allowed(fmnist_dir, tiny_estimators, tmp_path):
    bad = estimators_with_report(tiny_estimators, tmp_path / "bad", natural_gain=1.5, adversarial_gain=0.0)
    assert "E_a 0.0" in uninformative_reason(bad / "estimators.pt") and uninformative_reason(bad / "estimators.pt", ("natural",)) is None
    result = run_script("train_MIAT.py", stage3_args(fmnist_dir, bad / "estimators.pt", tmp_path / "refused"))
    assert_one_line_error(result, "not judged informative")
    assert "E_a" in result.stderr and "not informative" in result.stderr and "--allow-uninformative-estimators" in result.stderr
    assert not (tmp_path / "refused").exists()
    # no report (or one from before the check): refused too, saying how to write one
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(tiny_estimators, missing / "estimators.pt")
    assert_one_line_error(run_script("train_MIAT.py", stage3_args(fmnist_dir, missing / "estimators.pt", tmp_path / "r2")), "--report-only")
    for broken in ('{"informativeness": {"natural": 1}}', '[1, 2]', '{"informativeness": "yes"}', "{not json"):
        (missing / REPORT_FILE).write_text(broken)
        assert "--report-only" in uninformative_reason(missing / "estimators.pt"), broken
    # WMIM reads only E_n, so only E_n is judged for it
    assert train_MIAT.main(stage3_args(fmnist_dir, bad, tmp_path / "wmim", "--mi-mode", "wmim")) == 0

    allowed = tmp_path / "allowed"
    assert train_MIAT.main(stage3_args(fmnist_dir, bad, allowed, "--allow-uninformative-estimators")) == 0
    config = json.loads((allowed / "config.json").read_text())
    assert config["args"]["allow_uninformative_estimators"] is True and config["estimators_informative"] is False
    assert config["estimators_informativeness"]["adversarial"]["verdict"] == "not informative"
    assert any("not judged informative" in w for w in read_warnings(allowed))
    assert torch.load(allowed / "best.pt", weights_only=True)["estimators_informative"] is False
    # ... and the evaluation flags its row
    import test_comparison
    out = tmp_path / "eval"
    assert test_comparison.main(["--checkpoints", str(allowed / "best.pt"), str(tmp_path / "wmim" / "best.pt"),
                                 "--data-dir", str(fmnist_dir), "--test-limit", "10", "--attacks", "pgd", "--pgd-steps", "1",
                                 "--device", "cpu", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["trained_with"]["estimators_informative"] for m in results["models"]] == [False, True]
    flagged = [line for line in (out / "results.md").read_text().splitlines() if "did not judge informative" in line]
    assert len(flagged) == 1 and "NAMID" in flagged[0] and "WMIM" not in flagged[0]


def test_stage3_accepts_informative_estimators(fmnist_dir, tiny_estimators, tmp_path):
    good = estimators_with_report(tiny_estimators, tmp_path / "good", natural_gain=1.5, adversarial_gain=0.8)
    assert uninformative_reason(good / "estimators.pt") is None
    run = tmp_path / "run"
    assert train_MIAT.main(stage3_args(fmnist_dir, good, run)) == 0
    assert json.loads((run / "config.json").read_text())["estimators_informative"] is True
