"""Label MI I(Y; Y^) (utils/label_mi.py), stage 4's label-MI column and pgd-label-mi attack, and the synthetic
feature-compression benchmark's closed forms (bench/feature_compression.py)."""
import dataclasses
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import test_comparison
from tests.conftest import REPO
from tests.test_sharded_eval import assert_same_results, evaluate_in_one_process, evaluate_in_two_processes
from utils import evaluation
from utils.attacks import PGDConfig, pgd_attack
from utils.data import dataset_info, load_splits
from utils.evaluation import build_attacks, clean_predictions, run_attack, sharded_loader, table_columns
from utils.label_mi import confusion_matrix, hard_label_mi, label_mi, label_mi_bits, soft_confusion

CPU = torch.device("cpu")
LN2 = math.log(2)


def entropy_bits(counts):
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c)


def one_hot(classes, num_classes):
    return F.one_hot(torch.as_tensor(classes), num_classes).double()


# ----------------------------------------------------------------------------------------------
# utils/label_mi.py

def test_a_constant_prediction_carries_no_label_information():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    assert label_mi(one_hot([1] * 6, 3), y).item() == pytest.approx(0.0, abs=1e-12)
    soft = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).expand(6, 3)  # the same distribution everywhere
    assert label_mi(soft, y).item() == pytest.approx(0.0, abs=1e-12)
    assert hard_label_mi(torch.ones(6, dtype=torch.long), y, 3) == pytest.approx(0.0, abs=1e-12)


def test_correct_and_permuted_one_hot_predictions_give_h_y():
    """The MI view's difference from accuracy: relabelling the predicted classes keeps I(Y; Y^) = H(Y)."""
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    h_y = entropy_bits([3, 1, 2, 4])
    permuted = (y + 1) % 4  # every prediction wrong
    assert (permuted == y).sum() == 0
    for predictions in (y, permuted):
        assert label_mi_bits(one_hot(predictions, 4), y).item() == pytest.approx(h_y, abs=1e-12)
        assert hard_label_mi(predictions, y, 4) == pytest.approx(h_y, abs=1e-12)
    # merging two predicted classes loses exactly the information that told them apart
    merged = torch.where(y == 3, torch.tensor(2), y)
    assert hard_label_mi(merged, y) == pytest.approx(h_y - 0.6 * entropy_bits([2, 4]), abs=1e-12)


def test_soft_confusion_and_label_mi_by_hand():
    y = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0], [0.2, 0.8, 0.0]], dtype=torch.float64)
    confusion = soft_confusion(probs, y, 3)
    expected = torch.tensor([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # class 2: absent
    assert torch.allclose(confusion, expected)
    # joint P(y, y^) = 0.5 * rows: [[.40, .10], [.15, .35]]; P(y^) = [.55, .45]
    by_hand = (0.40 * math.log(0.40 / (0.5 * 0.55)) + 0.10 * math.log(0.10 / (0.5 * 0.45))
               + 0.15 * math.log(0.15 / (0.5 * 0.55)) + 0.35 * math.log(0.35 / (0.5 * 0.45)))
    assert label_mi(probs, y).item() == pytest.approx(by_hand, abs=1e-12)
    assert label_mi_bits(probs, y).item() == pytest.approx(by_hand / LN2, abs=1e-12)


def test_hard_label_mi_from_a_confusion_matrix_by_hand():
    # counts: class 0 -> [3, 1, 0], class 1 -> [0, 2, 0], class 2 -> [1, 0, 1]; n = 8
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 1, 0, 2])
    assert confusion_matrix(predictions, y, 3).tolist() == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    p_y, p_hat = [4 / 8, 2 / 8, 2 / 8], [4 / 8, 3 / 8, 1 / 8]
    cells = {(0, 0): 3, (0, 1): 1, (1, 1): 2, (2, 0): 1, (2, 2): 1}
    by_hand = sum(c / 8 * math.log2(c / 8 / (p_y[i] * p_hat[j])) for (i, j), c in cells.items())
    assert hard_label_mi(predictions, y, 3) == pytest.approx(by_hand, abs=1e-12)
    assert hard_label_mi(predictions, y, 7) == pytest.approx(by_hand, abs=1e-12)  # unseen classes add nothing
    assert hard_label_mi(predictions, y) == pytest.approx(by_hand, abs=1e-12)
    assert math.isnan(hard_label_mi(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3))


def test_gradient_flows_and_is_finite_at_zero_probabilities():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 1, 2, 2, 2])  # class 3 absent
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    value = label_mi(F.softmax(logits, dim=1), y)
    grad, = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.autograd.gradcheck(lambda p: label_mi(p, y), (F.softmax(logits, 1).detach().requires_grad_(True),))
    # exact zeros (one-hot probabilities, an absent class): a finite value and gradient, no NaN
    probs = one_hot([0, 1, 1, 2, 2, 0], 4).requires_grad_(True)
    value = label_mi(probs, y)
    grad, = torch.autograd.grad(value, probs)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert value.item() == pytest.approx(hard_label_mi([0, 1, 1, 2, 2, 0], y) * LN2, abs=1e-12)
    # a step down the gradient lowers the label MI
    step = logits.detach() - 0.1 * torch.autograd.grad(label_mi(F.softmax(logits, 1), y), logits)[0]
    assert label_mi(F.softmax(step, 1), y) < label_mi(F.softmax(logits, 1), y)


# ----------------------------------------------------------------------------------------------
# The pgd-label-mi attack

CLASSES, SIZE = 4, 4
INFO = dataclasses.replace(dataset_info("fashion-mnist"), num_classes=CLASSES, image_size=SIZE)


def blobs(count, seed):
    """4 classes of 4x4 images: a fixed pattern per class near 0.5 plus Gaussian noise 0.08, in [0, 1]."""
    centres = 0.5 + 0.25 * (torch.rand(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(123)) - 0.5)
    y = torch.arange(count) % CLASSES
    return (centres[y] + 0.08 * torch.randn(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
            ).clamp(0, 1), y


@pytest.fixture(scope="module")
def blob_model():
    """A tiny MLP trained on 400 blobs (about 97 % accuracy on held-out blobs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    x, y = blobs(400, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def settings(*extra):
    args = test_comparison.build_parser().parse_args(["--checkpoints", "unused.pt", "--epsilon", "0.1", *extra])
    return test_comparison.resolve_settings(args, INFO)


def test_the_label_mi_attack_is_registered_with_its_settings():
    args = settings("--batch-size", "64")
    assert args.label_mi_steps == 40 and args.label_mi_step_size == pytest.approx(0.1 / 4)
    attack = build_attacks(["pgd-label-mi"], args, CLASSES)[0]
    assert (attack.name, attack.column, attack.threat, attack.bound) == ("pgd-label-mi", "PGD-40 (label MI)", "linf", 0.1)
    assert attack.settings["batch_size"] == 64 and attack.settings["steps"] == 40
    assert attack.settings["step_size"] == pytest.approx(0.025) and attack.settings["random_start"] == "uniform"
    assert "pgd-label-mi" in evaluation.WORST_CASE_GROUPS["linf"] and "pgd-label-mi" not in evaluation.WHITE_BOX_ATTACKS
    names = ["pgd", "pgd-label-mi", "pgd-l2"]
    attacks = {a.name: a for a in build_attacks(names, args, CLASSES)}
    assert [key for key, _ in table_columns(names, attacks)] == ["clean", "pgd", "pgd-label-mi", "worst_linf", "pgd-l2",
                                                                 "worst_l2"]
    other = build_attacks(["pgd-label-mi"], settings("--label-mi-steps", "7", "--label-mi-step-size", "0.01"), 4)[0]
    assert other.column == "PGD-7 (label MI)" and other.settings["step_size"] == 0.01


def test_the_label_mi_attack_lowers_label_mi_more_than_ce_pgd(blob_model):
    """CE-PGD sends each example to a wrong class, but consistently (classes map to classes), so its predictions
    still say much about the labels; minimising the batch's label MI makes them nearly independent of the
    labels (while leaving more examples correct: it does not target accuracy). 200 held-out blobs, 2 batches."""
    x, y = blobs(200, 100)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    args = settings("--batch-size", "100", "--pgd-steps", "20", "--label-mi-steps", "20")
    attacks = {a.name: a for a in build_attacks(["pgd", "pgd-label-mi"], args, CLASSES)}
    clean = clean_predictions(blob_model, loader, CPU, False)
    results = {name: run_attack(blob_model, attack, loader, CPU, False, 0, name) for name, attack in attacks.items()}
    assert clean.accuracy > 0.9 and clean.label_mi_bits > 1.5  # H(Y) = 2 bits
    ce, lmi = results["pgd"], results["pgd-label-mi"]
    assert ce.accuracy < 0.05 and ce.label_mi_bits > 0.4  # measured: 0.5 %, 0.53 bits
    assert lmi.label_mi_bits < 0.5 * ce.label_mi_bits  # measured: 0.15 bits
    for result in (ce, lmi):
        assert result.budget.violating_batches == 0 and not result.side_effects
    # the same attack directly through utils.attacks.pgd_attack (loss "label-mi") on the first batch
    generator = torch.Generator().manual_seed(1)
    x_adv = pgd_attack(blob_model, x[:100], y[:100], PGDConfig("linf", 0.1, 0.025, 20, loss="label-mi"), generator)
    with torch.no_grad():
        before = label_mi(F.softmax(blob_model(x[:100]), 1), y[:100])
        after = label_mi(F.softmax(blob_model(x_adv), 1), y[:100])
    assert after < 0.3 * before and (x_adv - x[:100]).abs().max() <= 0.1 + 1e-6


def test_a_batch_of_the_label_mi_attack_gets_the_same_adversarials_whichever_process_attacks_it(blob_model):
    x, y = blobs(10, 7)
    dataset = TensorDataset(x.repeat(5, 1, 1, 1), y.repeat(5))
    attack = build_attacks(["pgd-label-mi"], settings("--label-mi-steps", "3"), CLASSES)[0]

    def adversarials(rank, world_size):
        crafted = []
        recording = dataclasses.replace(attack, craft=lambda *a: crafted.append(attack.craft(*a).x_adv) or
                                        evaluation.AttackOutput(crafted[-1]))
        loader = sharded_loader(dataset, 10, rank=rank, world_size=world_size)
        run_attack(blob_model, recording, loader, CPU, False, 3, desc="pgd-label-mi")
        return dict(zip(loader.batch_indices, crafted))

    whole, shared_out = adversarials(0, 1), {**adversarials(0, 2), **adversarials(1, 2)}
    assert sorted(whole) == sorted(shared_out) == [0, 1, 2, 3, 4]
    assert all(torch.equal(whole[b], shared_out[b]) for b in whole)


# ----------------------------------------------------------------------------------------------
# Stage 4's label-MI column

def plug_in_bits(predictions, labels):
    """I(Y; Y^) in bits from per-example predictions and labels, by counting (written independently)."""
    n = len(labels)
    joint, p_y, p_hat = {}, {}, {}
    for p, t in zip(predictions, labels):
        joint[(t, p)] = joint.get((t, p), 0) + 1
        p_y[t] = p_y.get(t, 0) + 1
        p_hat[p] = p_hat.get(p, 0) + 1
    return sum(c / n * math.log2(c * n / (p_y[t] * p_hat[p])) for (t, p), c in joint.items())


def test_stage4_label_mi_column_is_the_plug_in_of_the_per_example_predictions(fmnist_dir, tmp_path, monkeypatch):
    """A random linear model (errors spread over many classes) on 30 Fashion-MNIST test images in batches of 8:
    per row and attack (clean, pgd, pgd-label-mi, transfer), results.json's label MI equals the plug-in I(Y; Y^)
    computed here from its per-example predictions and the true labels, and results.md has the table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    spec = {"stage": "test", "config": {}, "epoch": 0, "model_spec": {"dataset": "fashion-mnist", "arch": "tiny"}}
    monkeypatch.setattr(test_comparison, "load_models", lambda paths, device, channels_last=None: [(model, spec) for _ in paths])
    out = tmp_path / "out"
    argv = ["--checkpoints", "m.pt", "--labels", "linear", "--surrogate", "m.pt", "--data-dir", str(fmnist_dir),
            "--test-limit", "30", "--batch-size", "8", "--device", "cpu", "--out-dir", str(out),
            "--attacks", "pgd", "pgd-label-mi", "transfer", "--pgd-steps", "2", "--label-mi-steps", "2"]
    assert test_comparison.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    splits = load_splits("fashion-mnist", fmnist_dir, val_size=0, train_limit=1, test_limit=30, seed=0)
    true_labels = [int(splits.test[i][1]) for i in range(len(splits.test))]
    assert results["test_labels"] == true_labels
    record = results["models"][0]
    entries = {"clean": record["clean"], **record["attacks"]}
    assert set(entries) == {"clean", "pgd", "pgd-label-mi", "transfer"}
    for name, entry in entries.items():
        predictions = entry["predictions"]
        assert len(predictions) == 30
        assert entry["per_example"] == "".join("1" if p == t else "0" for p, t in zip(predictions, true_labels))
        assert entry["label_mi_bits"] == pytest.approx(plug_in_bits(predictions, true_labels), abs=1e-9), name
    assert len(set(record["clean"]["predictions"])) > 3  # the errors fall into several classes
    assert results["attacks"]["pgd-label-mi"]["settings"]["batch_size"] == 8
    markdown = (out / "results.md").read_text().splitlines()
    header = "| " + " | ".join(["Defense"] + [column["header"] for column in results["columns"]]) + " |"
    assert [column["key"] for column in results["columns"]] == ["clean", "pgd", "pgd-label-mi", "worst_linf", "transfer"]
    assert markdown.count(header) == 2  # the accuracy table, then the label-MI table
    row = markdown[markdown.index("## Label MI I(Y; Y^) (bits)") + 4]
    assert row == "| linear | " + " | ".join([f"{entries[n]['label_mi_bits']:.3f}" for n in ("clean", "pgd",
                                                                                              "pgd-label-mi")]
                                             + ["-", f"{entries['transfer']['label_mi_bits']:.3f}"]) + " |"


def test_the_label_mi_column_is_the_same_in_one_and_two_processes(tiny_target, fmnist_dir, tmp_path):
    """3 batches (2 on rank 0, 1 on rank 1): predictions, label MI and the label-MI table as in one process."""
    args = ["--checkpoints", str(tiny_target), "--test-limit", "30", "--batch-size", "10",
            "--attacks", "pgd", "pgd-label-mi", "--pgd-steps", "2", "--label-mi-steps", "2"]
    evaluate_in_one_process(fmnist_dir, tmp_path / "single", *args)
    evaluate_in_two_processes(fmnist_dir, tmp_path / "sharded", *args)
    single = assert_same_results(tmp_path / "single", tmp_path / "sharded")  # models, results.md, results.csv
    sharded = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert sharded["test_labels"] == single["test_labels"] and len(single["test_labels"]) == 30
    for entry in [single["models"][0]["clean"], *single["models"][0]["attacks"].values()]:
        assert len(entry["predictions"]) == 30
        assert entry["label_mi_bits"] == pytest.approx(plug_in_bits(entry["predictions"], single["test_labels"]))


# ----------------------------------------------------------------------------------------------
# bench/feature_compression.py

@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("feature_compression", REPO / "bench" / "feature_compression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimal_k_copy_accuracy_under_the_worst_l2_attack_matches_monte_carlo(bench):
    assert bench.optimal_accuracy(4, 1.0) == pytest.approx(0.9772, abs=1e-4)
    assert bench.compressed_accuracy(1.0) == pytest.approx(0.5)
    assert bench.optimal_accuracy(16, 2.0) == pytest.approx(1.0, abs=1e-4)
    assert bench.compressed_accuracy(2.0) == pytest.approx(0.0228, abs=1e-4)
    for k in (1, 4, 16, 64):
        for epsilon in (0.5, 1.0, 2.0, math.sqrt(k)):
            monte_carlo = bench.monte_carlo_optimal_accuracy(k, epsilon, 100_000, seed=k)
            assert monte_carlo == pytest.approx(bench.optimal_accuracy(k, epsilon), abs=0.01), (k, epsilon)


def test_the_bench_measures_the_optimal_classifiers_radius_exactly(bench):
    """PGD bisection on sign(mean(Y)) finds its exact flip radius |sum(Y)| / sqrt(k)."""
    y, labels = bench.sample(50, 16, 0.5, torch.Generator().manual_seed(0))
    radius = bench.flip_radius(bench.OptimalClassifier(), y, labels, steps=10, bisections=12)
    assert torch.allclose(radius, y.sum(dim=1).abs() / 4, atol=1e-2)


def test_the_label_mi_attack_is_judged_on_the_label_mi_not_the_accuracy():
    """The sanity check "accuracy above clean: the attack is failing" does not apply to an attack on the label
    MI; its own check is its label MI against the clean one."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    clean_predicted = torch.tensor([0, 0, 1, 1, 3, 3, 2, 0])  # accuracy 0.5, 1.656 bits
    clean = evaluation.AttackResult(clean_predicted == labels, 0.0, predicted=clean_predicted, labels=labels)
    attacks = {a.name: a for a in build_attacks(["pgd-label-mi"], settings(), CLASSES)}

    def warnings_for(predicted):
        result = evaluation.AttackResult(predicted == labels, 0.0, predicted=predicted, labels=labels)
        return evaluation.sanity_warnings("m", clean, {"pgd-label-mi": result}, attacks)

    assert warnings_for(torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])) == []  # accuracy 0.75 but 1.5 bits
    assert warnings_for(torch.tensor([1, 1, 0, 0, 3, 3, 2, 2])) == [  # accuracy 0 but a permutation: 2 bits
        "m: PGD-40 (label MI) label MI 2.000 bits is above the clean label MI 1.656 bits: the attack is failing"]
