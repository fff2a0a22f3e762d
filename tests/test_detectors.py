"""The detectors (defenses/detectors.py), the detection attacks (utils/detection.py) and test_detection.py: scores
against hand computations, AUC and thresholds, detectors.pt, targeted attacks on reversed logits, the
detector-aware attack against the oblivious one, and the script end to end on tiny CE and RCE checkpoints."""
import json
import math

import pytest
import torch

import test_detection
import train_standard
from bench import detection_worst_case
from defenses.detectors import (DEFAULT_SIGMA2, Detectors, KernelDensity, combined_thresholds, confidence,
                                detectors_path, fpr_threshold, load_or_fit_detectors, non_maximal_entropy, rank_auc,
                                settings_for)
from tests.helpers import interrupt_then_resume, assert_one_line_error, run_script
from utils.detection import (Outcome, attack_metrics, attack_outcome, aware_objective, build_detection_attacks,
                             clean_outcome, outcome_from_record, weak_minimum_norm_attack, worst_case_metrics)
from utils.errors import UserError
from utils.training import load_model


# ----------------------------------------------------------------------------------------------
# Scores, AUC and thresholds


def test_non_me_of_a_vector_uniform_over_the_non_maximal_classes_is_log_l_minus_1():
    probs = torch.full((1, 10), 0.02)
    probs[0, 4] = 0.82
    assert non_maximal_entropy(probs.log()).item() == pytest.approx(math.log(9), rel=1e-5)
    assert confidence(probs.log()).item() == pytest.approx(0.82, rel=1e-5)


def test_non_me_matches_the_authors_formula_and_has_finite_gradients():
    torch.manual_seed(0)
    logits = 3 * torch.randn(20, 10, requires_grad=True)
    p = torch.softmax(logits, 1)
    top = p.argmax(1, keepdim=True)
    rest = p.scatter(1, top, 0.0)
    s = rest.sum(1)
    authors = (-(rest * torch.log(rest.clamp_min(1e-30))).sum(1)) / s + torch.log(s)  # test_adv.py's form
    assert torch.allclose(non_maximal_entropy(logits), authors, atol=1e-5)
    gradient, = torch.autograd.grad(non_maximal_entropy(logits).sum(), logits)
    assert torch.isfinite(gradient).all()


def test_k_density_is_in_0_1_and_1_when_every_kernel_is_z():
    torch.manual_seed(0)
    kernels, labels = torch.randn(30, 5), torch.arange(30) % 3
    density = KernelDensity(kernels, labels, sigma2=0.385, num_classes=3)
    z = torch.randn(8, 5)
    values = density.log_density(z, torch.arange(8) % 3).exp()
    assert ((values > 0) & (values <= 1)).all()
    manual = torch.exp(-((z[0] - kernels[labels == 0]) ** 2).sum(1) / 0.385).mean()
    assert values[0].item() == pytest.approx(manual.item(), rel=1e-5)
    point = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0]])
    same = KernelDensity(point.repeat(7, 1), torch.zeros(7, dtype=torch.long), sigma2=0.385, num_classes=1)
    assert same.log_density(point, torch.zeros(1, dtype=torch.long)).exp().item() == pytest.approx(1.0, abs=1e-6)


def test_auc_of_identical_and_separated_score_sets():
    scores = torch.randn(50)
    assert rank_auc(scores, scores) == pytest.approx(0.5)
    assert rank_auc(scores + 100, scores) == 1.0 and rank_auc(scores, scores + 100) == 0.0
    torch.manual_seed(1)
    pos, neg = torch.randint(0, 5, (40,)).float(), torch.randint(0, 5, (30,)).float()  # many ties
    pairwise = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert rank_auc(pos, neg) == pytest.approx(pairwise.item())
    assert math.isnan(rank_auc(pos, []))


def test_threshold_rejects_the_fpr_quantile_of_clean_scores():
    torch.manual_seed(2)
    scores = torch.randn(1000)
    tau = fpr_threshold(scores, 0.05)
    assert (scores < tau).sum().item() == 50, "exactly floor(0.05 * 1000) clean scores below the threshold"
    assert (scores < fpr_threshold(scores[:333], 0.05)).float().mean() == pytest.approx(0.05, abs=0.02)
    assert (scores[:333] < fpr_threshold(scores[:333], 0.05)).sum().item() == math.floor(0.05 * 333)


def test_all_three_together_reject_the_fpr_not_three_times_it():
    torch.manual_seed(3)
    scores = {"confidence": torch.randn(1000), "non-me": torch.randn(1000), "k-density": torch.randn(1000)}
    own = {name: fpr_threshold(values, 0.05) for name, values in scores.items()}
    union_at_own = torch.stack([scores[n] < own[n] for n in scores]).any(0).float().mean().item()
    assert union_at_own > 0.12, "independent scores: each at 5 % reject about 14 % together"
    combined = combined_thresholds(scores, 0.05)
    union = torch.stack([scores[n] < combined[n] for n in scores]).any(0).float().mean().item()
    assert 0.045 <= union <= 0.05 and all(combined[n] <= own[n] for n in scores)
    detectors = Detectors(None, own, {}, None, combined)
    accepted = detectors.accepted(scores)
    assert 1 - accepted["all"].float().mean().item() == pytest.approx(union)
    assert 1 - accepted["k-density"].float().mean().item() == pytest.approx(0.05)
    same = {name: scores["confidence"] for name in scores}  # identical scores: the union is each one
    assert combined_thresholds(same, 0.05)["confidence"] == pytest.approx(own["confidence"])


# ----------------------------------------------------------------------------------------------
# Tiny trained checkpoints


def train(fmnist_dir, model_dir, head, epochs=3, train_limit="600"):
    train_standard.main(["--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--train-limit", train_limit,
                         "--val-size", "200", "--test-limit", "50", "--batch-size", "32", "--epochs", str(epochs),
                         "--milestones", "100", "--loss", "natural", "--head", head, "--eval-steps", "1",
                         "--device", "cpu", "--model-dir", str(model_dir)])
    return model_dir / "best.pt"


@pytest.fixture(scope="module")
def checkpoints(fmnist_dir, tmp_path_factory):
    """best.pt of a tiny CE and a tiny RCE SmallCNN (natural training, 600 Fashion-MNIST images, 3 epochs)."""
    folder = tmp_path_factory.mktemp("detection")
    return {head: train(fmnist_dir, folder / head, head) for head in ("softmax", "rce")}


@pytest.fixture(scope="module")
def test_batch(fmnist_dir):
    from utils.data import load_splits
    splits = load_splits("fashion-mnist", fmnist_dir, val_size=0, train_limit=1, test_limit=100, seed=1)
    xs, ys = zip(*(splits.test[i] for i in range(len(splits.test))))
    return torch.stack(xs), torch.tensor(ys)


def fitted(checkpoints, fmnist_dir, head, **overrides):
    model, checkpoint = load_model(checkpoints[head], "cpu")
    options = dict(kernels_per_class=100, sigma2=None, fpr=0.05, seed=0) | overrides
    settings = settings_for(checkpoint, checkpoints[head], **options)
    detectors, status = load_or_fit_detectors(model.eval(), checkpoint, checkpoints[head], settings, fmnist_dir, "cpu")
    return model, detectors, status


def test_detectors_file_round_trip_reuse_and_refit(checkpoints, fmnist_dir):
    path = detectors_path(checkpoints["rce"])
    path.unlink(missing_ok=True)
    model, detectors, status = fitted(checkpoints, fmnist_dir, "rce")
    assert status == "fitted" and path.is_file() and path.name == "best.detectors.pt"
    assert detectors.settings.sigma2 == DEFAULT_SIGMA2["rce"] == pytest.approx(0.1 / 0.26)
    assert detectors.density.counts() == [60] * 10, "600 balanced training images: 60 per class, fewer than 100"
    assert all(abs(rate - 0.05) <= 0.0051 for name, rate in detectors.val_fpr.items() if name != "all")
    state = torch.load(path, weights_only=True)
    again = Detectors.from_state(state)
    assert again.thresholds == detectors.thresholds and torch.equal(again.density.kernels, detectors.density.kernels)
    assert fitted(checkpoints, fmnist_dir, "rce")[2] == "reused"
    model, refitted, status = fitted(checkpoints, fmnist_dir, "rce", fpr=0.1)
    assert status == "fitted" and refitted.thresholds["confidence"] >= detectors.thresholds["confidence"]
    assert fitted(checkpoints, fmnist_dir, "rce", fpr=0.1)[2] == "reused"
    assert fitted(checkpoints, fmnist_dir, "softmax")[1].settings.sigma2 == pytest.approx(1 / 0.26)


def test_targeted_attacks_reach_their_target_under_argmax_of_the_reversed_logits(checkpoints, fmnist_dir, test_batch):
    model, detectors, _ = fitted(checkpoints, fmnist_dir, "rce")
    x, y = test_batch[0][:16], test_batch[1][:16]
    args = test_detection.build_parser().parse_args(["--checkpoints", "x", "--epsilon", "0.3", "--cw-steps", "50",
                                                     "--cw-search-steps", "2", "--cw-lr", "0.05", "--jsma-gamma", "0.1"])
    args.aware_step_size = 0.075
    for attack in build_detection_attacks(["ilcm", "jsma", "cw"], args, 10):
        x_adv, target = attack.craft(model, detectors, x, y, torch.Generator().manual_seed(0))
        with torch.no_grad():
            z = model.net.network(model.normalize(x_adv))
        reached = (model(x_adv).argmax(1) == target).float().mean().item()
        assert torch.equal(model(x_adv).argmax(1), z.argmin(1))
        least = {"jsma": 0.25}.get(attack.name, 0.5)  # JSMA changes at most 10 % of the pixels (chance: 1/9)
        assert reached >= least, f"{attack.name} reached its target on {reached:.0%}"
        if attack.name == "ilcm":
            with torch.no_grad():
                assert torch.equal(target, model(x).argmin(1)), "ILCM's target: the least likely class under h"


def test_default_cw_fools_nearly_every_correctly_classified_image_of_a_ce_model(checkpoints, fmnist_dir, test_batch):
    # C&W has no budget; at the earlier defaults (lr 0.01, 50 iterations) it fooled 37 % of a CE SmallCNN's images
    model, detectors, _ = fitted(checkpoints, fmnist_dir, "softmax")
    x, y = test_batch[0][:24], test_batch[1][:24]
    batches = [(0, (x, y))]
    clean = clean_outcome(model, detectors, batches, "cpu")
    args = test_detection.build_parser().parse_args(["--checkpoints", "x", "--cw-search-steps", "3"])
    [attack] = build_detection_attacks(["cw"], args, 10)
    metrics = attack_metrics(y, clean, attack_outcome(model, detectors, attack, batches, "cpu", 0))
    assert metrics["success_rate"] >= 0.9 and weak_minimum_norm_attack("cw", metrics["success_rate"]) is None, metrics


def test_a_cw_that_stops_early_is_flagged():
    assert "fooled only 50.0%" in weak_minimum_norm_attack("cw", 0.5)
    assert "C&W-hc" in weak_minimum_norm_attack("cw-hc", 0.899)
    assert weak_minimum_norm_attack("cw-hc", 0.9) is None
    assert weak_minimum_norm_attack("jsma", 0.5) is None  # JSMA's gamma bounds the pixels it may change
    assert weak_minimum_norm_attack("cw", 0.0) is None and weak_minimum_norm_attack("cw", float("nan")) is None


def test_detector_aware_attack_beats_the_oblivious_one_with_rejection(checkpoints, fmnist_dir, test_batch):
    model, detectors, _ = fitted(checkpoints, fmnist_dir, "rce")
    x, y = test_batch
    batches = [(0, (x, y))]
    clean = clean_outcome(model, detectors, batches, "cpu")
    assert (clean.predicted == y).float().mean() >= 0.5, "the tiny RCE model did not train"
    args = test_detection.build_parser().parse_args(["--checkpoints", "x", "--epsilon", "0.1", "--aware-steps", "20"])
    args.aware_step_size = 0.025
    results = {}
    for attack in build_detection_attacks(["bim", "aware"], args, 10):
        results[attack.name] = attack_metrics(y, clean, attack_outcome(model, detectors, attack, batches, "cpu", 0))
    oblivious, aware = results["bim"]["accuracy_with_rejection"], results["aware"]["accuracy_with_rejection"]
    assert aware["all"] < oblivious["all"] - 0.05, (aware, oblivious)
    assert results["aware"]["max_linf"] <= 0.1 + 1e-6
    assert results["aware"]["adversarial_accepted"]["all"] > results["bim"]["adversarial_accepted"]["all"]


def test_the_detector_aware_attack_targets_every_wrong_class_by_default():
    parse = test_detection.build_parser().parse_args
    args = parse(["--checkpoints", "x", "--epsilon", "0.1"])
    args.aware_step_size = 0.025
    [aware] = build_detection_attacks(["aware"], args, 10)
    assert aware.settings["targets"] == 9 and aware.bounded
    args.aware_targets = 3
    assert build_detection_attacks(["aware"], args, 10)[0].settings["targets"] == 3
    args.aware_targets = 20  # more than there are: every wrong class
    assert build_detection_attacks(["aware"], args, 4)[0].settings["targets"] == 3


def test_aware_objective_is_the_capped_margin_plus_the_detectors_shortfalls():
    kernels = torch.zeros(4, 3)
    density = KernelDensity(kernels, torch.tensor([0, 0, 1, 1]), sigma2=1.0, num_classes=2)
    detectors = Detectors(density, {"confidence": 0.9, "non-me": 0.5, "k-density": -1.0}, {}, None)
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    features = torch.tensor([[2.0, 0.0, 0.0], [0.5, 0.0, 0.0]])  # log KD = -4 and -0.25
    target = torch.tensor([1, 1])
    value = aware_objective(logits, features, target, detectors, kappa=1.0, c=3.0)
    conf0 = torch.softmax(logits[0], 0).max()  # the two-class non-ME is 0: a shortfall of 0.5 for both
    expected0 = -2.0 + 3.0 * ((-4.0 + 1.0) + (0.0 - 0.5) + min(0.0, math.log(conf0) - math.log(0.9)))
    expected1 = 1.0 + 3.0 * (0.0 + (0.0 - 0.5) + 0.0)  # margin 5 capped at kappa 1; KD and confidence above
    assert value.tolist() == pytest.approx([expected0, expected1], rel=1e-5)


def hand_outcome(predicted, accepted, k_density=None) -> Outcome:
    flags = {name: torch.tensor(accepted, dtype=torch.bool) for name in ("confidence", "non-me", "k-density", "all")}
    if k_density is not None:
        flags["k-density"] = torch.tensor(k_density, dtype=torch.bool)
    return Outcome(torch.tensor(predicted), {}, flags)


def test_worst_case_counts_an_example_only_if_it_survives_every_attack():
    labels = torch.tensor([0, 1, 2, 3])
    clean = hand_outcome([0, 1, 2, 0], [1, 1, 0, 1])  # image 2 rejected when clean, image 3 misclassified
    a = hand_outcome([0, 9, 2, 3], [1, 1, 1, 1])  # fools image 1, accepted
    b = hand_outcome([5, 1, 2, 3], [1, 1, 1, 1], k_density=[0, 1, 1, 1])  # fools image 0, which K-density rejects
    alone = {name: worst_case_metrics(labels, clean, {name: adv})["accuracy_with_rejection"]["all"]
             for name, adv in (("a", a), ("b", b))}
    worst = worst_case_metrics(labels, clean, {"a": a, "b": b})
    assert alone == {"a": 0.25, "b": 0.25}  # image 0 survives a, image 1 survives b
    assert worst["accuracy_with_rejection"]["all"] == 0.0  # but no image survives both
    assert worst["accuracy_with_rejection"]["k-density"] == 0.25  # image 0: b's adversarial is rejected
    assert worst["robust_accuracy"] == 0.25  # without rejection only image 2 is right under both
    assert worst["attacks"] == ["a", "b"]


# ----------------------------------------------------------------------------------------------
# test_detection.py


def test_end_to_end_writes_every_output(checkpoints, fmnist_dir, tmp_path):
    out = tmp_path / "out"
    assert test_detection.main(["--checkpoints", str(checkpoints["softmax"].parent), str(checkpoints["rce"]),
                                "--labels", "CE", "RCE", "--data-dir", str(fmnist_dir), "--test-limit", "30",
                                "--kd-kernels", "50", "--bim-steps", "3", "--jsma-gamma", "0.02", "--cw-steps", "5",
                                "--cw-hc-steps", "5", "--cw-search-steps", "1", "--aware-steps", "3",
                                "--aware-targets", "2", "--device", "cpu", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and [m["label"] for m in results["models"]] == ["CE", "RCE"]
    # what reproduce.py's study table reads (utils/evaluators.py): its columns and the number of test images
    assert results["test_images"] == 30 and len(results["columns"]) == 39
    assert results["columns"][-1] == {"key": "worst:rejection:all", "header": "Worst case within epsilon, rej. all three"}
    assert results["columns"][:2] == [{"key": "clean", "header": "Clean"},
                                      {"key": "fgsm:auc:confidence", "header": "FGSM AUC conf. (×10⁻²)"}]
    for model in results["models"]:
        assert set(model["attacks"]) == {"fgsm", "bim", "ilcm", "jsma", "cw", "cw-hc", "aware", "aa"}
        for name, attack in model["attacks"].items():
            assert set(attack["accuracy_with_rejection"]) == {"confidence", "non-me", "k-density", "all"}
            assert (out / f"roc_{model['label']}_{name}.png").stat().st_size > 1000
        assert model["detectors"]["settings"]["kernels_per_class"] == 50
        assert set(model["clean"]["fpr"]) == {"confidence", "non-me", "k-density", "all"}
        # the worst case of the attacks within epsilon, from the per-example records results.json keeps
        labels = torch.tensor(results["test_labels"])
        clean = outcome_from_record(model["clean"]["per_example"])
        assert float((clean.predicted == labels).float().mean()) == pytest.approx(model["clean"]["accuracy"])
        bounded = {n: outcome_from_record(model["attacks"][n]["per_example"], "adv_")
                   for n in ("fgsm", "bim", "ilcm", "aware", "aa")}
        assert model["worst_case"] == worst_case_metrics(labels, clean, bounded)
        # AutoAttack breaks the classifier: the worst case without rejection is at most its robust accuracy
        assert model["attacks"]["aa"]["robust_accuracy"] < model["clean"]["accuracy"]
        assert model["worst_case"]["robust_accuracy"] <= model["attacks"]["aa"]["robust_accuracy"]
        assert model["attacks"]["aa"]["max_linf"] <= 0.1 + 1e-6
        for name in ("fgsm", "bim", "ilcm", "aware", "aa"):
            assert model["worst_case"]["accuracy_with_rejection"]["all"] <= \
                model["attacks"][name]["accuracy_with_rejection"]["all"]
    markdown = (out / "results.md").read_text()
    for fragment in ("ROC AUC", "accuracy (%) with rejection", "| C&W-hc |", "detector-aware PGD", "Git commit",
                     "| worst case (FGSM, BIM, ILCM, detector-aware PGD, AutoAttack) |", "| AutoAttack |",
                     "Command: `test_detection.py", "Wall time"):
        assert fragment in markdown
    # bench/detection_worst_case.py recomputes the same worst case for a results.json written without it
    old = json.loads((out / "results.json").read_text())
    for model in old["models"]:
        del model["worst_case"], model["clean"]["per_example"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    detection_worst_case.main([str(tmp_path / "old"), "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "w.json")])
    [recomputed] = json.loads((tmp_path / "w.json").read_text())["evaluations"].values()
    for model, again in zip(results["models"], recomputed["models"]):
        assert again["detectors"] == "reused" and again["attacks"] == model["worst_case"]["attacks"]
        assert again["accuracy_with_rejection"] == model["worst_case"]["accuracy_with_rejection"]
        assert again["robust_accuracy"] == model["worst_case"]["robust_accuracy"]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 10 and rows[0].startswith("label,checkpoint,head,attack,pairs,auc:confidence")
    assert json.loads((out / "warnings.json").read_text())["warnings"] == results["warnings"]


def test_combining_evaluations_of_the_same_model_gives_the_joint_runs_worst_case(checkpoints, fmnist_dir, tmp_path):
    """bench/detection_worst_case.py --combine: AutoAttack run after the other bounded attacks, joined with them,
    gives the worst case of one run of all of them; evaluations that disagree on the clean outcome are refused."""
    common = ["--checkpoints", str(checkpoints["rce"]), "--labels", "RCE", "--data-dir", str(fmnist_dir),
              "--test-limit", "30", "--kd-kernels", "50", "--bim-steps", "3", "--device", "cpu"]
    for name, attacks in (("first", ["fgsm", "bim"]), ("later", ["aa"]), ("joint", ["fgsm", "bim", "aa"])):
        assert test_detection.main(common + ["--attacks", *attacks, "--out-dir", str(tmp_path / name)]) == 0
    read = lambda name: json.loads((tmp_path / name / "results.json").read_text())  # noqa: E731
    assert "worst_case" not in read("later")["models"][0]  # one bounded attack alone: no worst case
    out = tmp_path / "combined.json"
    assert detection_worst_case.main([str(tmp_path / "first"), str(tmp_path / "later"), "--combine",
                                      "--out", str(out)]) == 0
    [combined] = json.loads(out.read_text())["models"]
    joint = read("joint")["models"][0]["worst_case"]
    assert combined["attacks"] == joint["attacks"] == ["fgsm", "bim", "aa"]
    assert combined["robust_accuracy"] == joint["robust_accuracy"]
    assert combined["accuracy_with_rejection"] == joint["accuracy_with_rejection"]
    assert combined["sources"] == {"fgsm": str(tmp_path / "first"), "bim": str(tmp_path / "first"),
                                   "aa": str(tmp_path / "later")}
    tampered = read("later")
    flags = tampered["models"][0]["clean"]["per_example"]["accepted"]["all"]
    tampered["models"][0]["clean"]["per_example"]["accepted"]["all"] = ("1" if flags[0] == "0" else "0") + flags[1:]
    (tmp_path / "later" / "results.json").write_text(json.dumps(tampered))
    with pytest.raises(UserError, match="clean outcome"):
        detection_worst_case.main([str(tmp_path / "first"), str(tmp_path / "later"), "--combine", "--out", str(out)])


def test_an_interrupted_detection_evaluation_resumes_to_the_uninterrupted_results(checkpoints, fmnist_dir, tmp_path,
                                                                                  monkeypatch):
    import dataclasses
    crafted, stop = [], {}
    real = test_detection.build_detection_attacks

    def counted(names, args, num_classes):
        def wrap(attack):
            def craft(model, detectors, x, y, generator):
                crafted.append(attack.name)
                if stop.get(attack.name) == crafted.count(attack.name):
                    raise KeyboardInterrupt  # ctrl-C, or the session ending, inside that batch
                return attack.craft(model, detectors, x, y, generator)
            return dataclasses.replace(attack, craft=craft)
        return [wrap(attack) for attack in real(names, args, num_classes)]

    monkeypatch.setattr(test_detection, "build_detection_attacks", counted)
    common = ["--checkpoints", str(checkpoints["rce"]), "--labels", "RCE", "--data-dir", str(fmnist_dir),
              "--test-limit", "40", "--batch-size", "10", "--kd-kernels", "50", "--attacks", "fgsm", "aware",
              "--aware-steps", "2", "--aware-targets", "1", "--device", "cpu"]
    assert test_detection.main(common + ["--out-dir", str(tmp_path / "whole")]) == 0
    assert crafted == ["fgsm"] * 4 + ["aware"] * 4 and not (tmp_path / "whole" / "progress").exists()
    # fgsm finished, two batches of aware journalled
    interrupt_then_resume(test_detection.main, common + ["--out-dir", str(tmp_path / "cut")], crafted, stop,
                          {"aware": 3})
    assert crafted == ["aware"] * 2  # only the two batches the journal lacked
    whole, cut = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "cut"))
    strip = lambda attacks: {n: {k: v for k, v in a.items() if k != "seconds"} for n, a in attacks.items()}  # noqa
    assert strip(cut["models"][0]["attacks"]) == strip(whole["models"][0]["attacks"])
    assert cut["complete"] and not (tmp_path / "cut" / "progress").exists()
    # a journal made with other settings (here the detectors' kernels) is not used: everything is attacked anew
    other = common + ["--out-dir", str(tmp_path / "other")]
    interrupt_then_resume(test_detection.main, other + ["--kd-kernels", "40"], crafted, stop, {"fgsm": 2},
                          resumed_argv=other)
    assert crafted == ["fgsm"] * 4 + ["aware"] * 4
    assert strip(json.loads((tmp_path / "other" / "results.json").read_text())["models"][0]["attacks"]) == \
        strip(whole["models"][0]["attacks"])


def test_a_checkpoint_with_an_mmc_head_is_one_clear_error(fmnist_dir, tmp_path):
    mmc = tmp_path / "mmc"
    train_standard.main(["--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--train-limit", "50",
                         "--val-size", "20", "--test-limit", "20", "--epochs", "1", "--loss", "natural", "--head", "mmc",
                         "--feature-dim", "16", "--device", "cpu", "--model-dir", str(mmc)])
    result = run_script("test_detection.py", ["--checkpoints", str(mmc / "best.pt"), "--data-dir", str(fmnist_dir),
                                              "--out-dir", str(tmp_path / "out")])
    assert_one_line_error(result, "softmax or rce head")


@pytest.mark.parametrize("flags, fragment", [(["--fpr", "1.5"], "--fpr"), (["--jsma-gamma", "2"], "(0, 1]"),
                                             (["--checkpoints", "nowhere.pt"], "does not exist")])
def test_bad_input_gives_one_line(flags, fragment, tmp_path):
    args = ["--checkpoints", "nowhere.pt"] if "--checkpoints" not in flags else []
    result = run_script("test_detection.py", args + flags + ["--out-dir", str(tmp_path / "out")])
    assert_one_line_error(result, fragment)
