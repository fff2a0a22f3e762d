"""Mixup inference (defenses/mixup_inference.py): the predictor's rule, its partner pool, mixup and IAT training,
and test_mixup_inference.py end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses.mixup_inference as mixup_inference
import test_mixup_inference
import train_standard
from defenses.mixup_inference import (MixupInference, MixupInferenceConfig, PartnerPool, make_mixup_step, mix_batch,
                                      pool_from_splits, soft_cross_entropy)
from tests.helpers import interrupt_then_resume, assert_one_line_error, read_metrics, run_script
from utils.attacks import PGDConfig, pgd_attack
from utils.data import load_splits
from utils.training import load_model

NUM_CLASSES = 4



def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES)).eval()


def tiny_pool(per_class=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(NUM_CLASSES * per_class, 1, 6, 6, generator=generator)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    return PartnerPool(images, labels, NUM_CLASSES, "given", indices=range(len(labels)))


def tiny_inputs(n=16, seed=2):
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# The predictor


@pytest.mark.parametrize("mode", ["pl", "ol", "combined"])
def test_lambda_one_is_the_base_model(mode):
    model, x = tiny_model(), tiny_inputs()
    config = MixupInferenceConfig(mode=mode, lam=1.0, combined_pl_lambda=1.0, combined_ol_lambda=1.0, partners=7)
    out = MixupInference(model, tiny_pool(), config)(x)
    torch.testing.assert_close(out, F.log_softmax(model(x), dim=1), atol=1e-5, rtol=1e-5)


def test_output_is_log_of_the_averaged_softmax_of_the_mixed_inputs():
    model, pool, x = tiny_model(), tiny_pool(), tiny_inputs(4)
    wrapper = MixupInference(model, pool, MixupInferenceConfig(mode="ol", partners=3, lam=0.7))
    out = wrapper(x)
    rows = wrapper.last_draws["ol"][1]
    for i in range(len(x)):
        probs = torch.stack([F.softmax(model(0.7 * x[i:i + 1] + 0.3 * pool.images[r:r + 1]), dim=1)[0] for r in rows[i]])
        torch.testing.assert_close(out[i], probs.mean(0).log(), atol=1e-5, rtol=1e-5)


def test_ol_never_draws_the_predicted_class_and_draws_every_other():
    model, pool, x = tiny_model(), tiny_pool(), tiny_inputs(32)
    wrapper = MixupInference(model, pool, MixupInferenceConfig(mode="ol", partners=30))
    predicted = model(x).argmax(1)
    seen = torch.zeros(len(x), NUM_CLASSES, dtype=torch.bool)
    for _ in range(20):
        wrapper(x)
        classes, rows = wrapper.last_draws["ol"]
        assert torch.equal(pool.labels[rows], classes), "a drawn image is not of its drawn class"
        assert (classes != predicted[:, None]).all()
        seen |= F.one_hot(classes, NUM_CLASSES).any(dim=1).bool()
    assert torch.equal(seen, ~F.one_hot(predicted, NUM_CLASSES).bool()), "some other class was never drawn"


def test_pl_only_draws_the_predicted_class():
    model, pool, x = tiny_model(), tiny_pool(), tiny_inputs(32)
    wrapper = MixupInference(model, pool, MixupInferenceConfig(mode="pl"))
    wrapper(x)
    classes, rows = wrapper.last_draws["pl"]
    predicted = model(x).argmax(1)
    assert classes.shape == (32, 10) and (pool.labels[rows] == predicted[:, None]).all()
    assert len(set(rows.flatten().tolist())) > NUM_CLASSES, "partners are drawn among the class's images"


def test_fixed_seed_gives_identical_predictions_another_seed_other_draws():
    model, pool, x = tiny_model(), tiny_pool(), tiny_inputs()
    config = MixupInferenceConfig(mode="combined")
    first = MixupInference(model, pool, config, seed=5)
    second = MixupInference(model, pool, config, seed=5)
    assert torch.equal(first(x), second(x)) and torch.equal(first(x), second(x))
    assert torch.equal(first.last_draws["ol"][1], second.last_draws["ol"][1])
    other = MixupInference(model, pool, config, seed=6)
    other(x)
    assert not torch.equal(first.last_draws["ol"][1], other.last_draws["ol"][1])
    assert torch.equal(first.reseed(5)(x), MixupInference(model, pool, config, seed=5)(x)), "reseed restarts the stream"


def test_combined_takes_pl_below_the_gap_threshold_and_ol_above():
    model, pool, x = tiny_model(), tiny_pool(), tiny_inputs(32)
    base_conf = F.softmax(model(x), 1).amax(1)
    for threshold in (0.0, 0.05, 0.2, 2.0):
        wrapper = MixupInference(model, pool, MixupInferenceConfig(mode="combined", threshold=threshold), seed=3)
        out = wrapper(x)
        # The same draws as PL (5, 0.5) and OL (15, 0.4) alone: the combined mode draws PL first, then OL.
        pl = MixupInference(model, pool, MixupInferenceConfig(mode="pl", partners=5, lam=0.5), seed=3)
        pl_out = pl(x)
        ol = MixupInference(model, pool, MixupInferenceConfig(mode="ol", partners=15, lam=0.4), seed=3)
        ol.generator.set_state(pl.generator.get_state())
        ol_out = ol(x)
        use_pl = (base_conf - pl_out.exp().amax(1)) < threshold
        assert torch.equal(wrapper.last_used_pl, use_pl)
        torch.testing.assert_close(out, torch.where(use_pl[:, None], pl_out, ol_out))
        if threshold == 2.0:
            assert use_pl.all()


def test_gradients_flow_through_lambda_x_and_not_into_the_draws():
    model, pool = tiny_model(), tiny_pool()
    x = tiny_inputs(4).requires_grad_(True)
    wrapper = MixupInference(model, pool, MixupInferenceConfig(mode="ol", partners=4, lam=0.5))
    out = wrapper(x)
    grad, = torch.autograd.grad(out[torch.arange(4), 0].sum(), x)
    assert grad.abs().sum() > 0 and pool.images.grad is None and not pool.images.requires_grad


def test_bad_settings_are_refused():
    for bad in (dict(lam=0.0), dict(lam=1.5), dict(combined_ol_lambda=-0.1), dict(mode="test"), dict(partners=0)):
        with pytest.raises(ValueError):
            MixupInferenceConfig(**bad)
    with pytest.raises(ValueError, match="no image of class"):
        PartnerPool(torch.zeros(3, 1, 6, 6), torch.tensor([0, 1, 1]), NUM_CLASSES)


# ----------------------------------------------------------------------------------------------
# The pool: held-out training-file images, never the test set


def test_pool_is_the_validation_split_never_the_test_set(fmnist_dir):
    splits = load_splits("fashion-mnist", fmnist_dir, val_size=100, train_limit=200, test_limit=50, seed=0, augment=False)
    pool = pool_from_splits(splits, "val")
    assert sorted(pool.indices) == sorted(splits.val.indices) and len(pool) == 100
    assert not set(pool.indices) & set(splits.train.indices), "validation images are never trained on"
    position = pool.indices.index(splits.val.indices[0])
    torch.testing.assert_close(pool.images[position], splits.val[0][0])
    assert sorted(pool_from_splits(splits, "train").indices) == sorted(splits.train.indices)
    assert len(pool_from_splits(splits, "val", limit=40)) == 40
    with pytest.raises(ValueError, match="held out from the test set"):
        pool_from_splits(splits, "test")
    splits.val = splits.test  # a pool that is really the test split is refused whatever it is called
    with pytest.raises(ValueError, match="never the test set"):
        pool_from_splits(splits, "val")


# ----------------------------------------------------------------------------------------------
# Training: mixup and IAT


def test_mixup_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.3, -0.5], [0.2, 0.1, 0.0, 1.5]])
    x = torch.arange(3.0).view(3, 1, 1, 1) * torch.ones(3, 1, 2, 2)
    y = torch.tensor([0, 2, 3])
    lam = torch.tensor([0.3, 0.9, 0.5])
    first, second = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    mixed, targets = mix_batch(x, y, NUM_CLASSES, lam, first, second)
    for i in range(3):
        assert torch.allclose(mixed[i], lam[i] * x[first[i]] + (1 - lam[i]) * x[second[i]])
    expected = 0.0
    for i in range(3):
        log_p = [v - math.log(sum(math.exp(u) for u in logits[i].tolist())) for v in logits[i].tolist()]
        expected += -(lam[i].item() * log_p[y[first[i]]] + (1 - lam[i].item()) * log_p[y[second[i]]])
    assert math.isclose(soft_cross_entropy(logits, targets).item(), expected / 3, rel_tol=1e-6)


def test_mixup_lambda_follows_beta_alpha():
    generator = torch.Generator().manual_seed(0)
    lam, first, second = mixup_inference.draw_mixup(20000, 1.0, generator)
    assert abs(lam.mean().item() - 0.5) < 0.01 and abs(lam.var().item() - 1 / 12) < 0.005  # Beta(1, 1) = U(0, 1)
    lam, _, _ = mixup_inference.draw_mixup(20000, 0.2, generator)
    assert abs(lam.var().item() - 0.25 * 1 / (2 * 0.2 + 1)) < 0.01  # Beta(a, a): variance 1 / (4 (2a + 1))
    assert sorted(first.tolist()) == list(range(20000)) == sorted(second.tolist())


def test_iat_attacks_the_predicted_labels_not_the_true_ones(monkeypatch):
    model, x = tiny_model(), tiny_inputs(8)
    predicted = model(x).argmax(1)
    y = (predicted + 1) % NUM_CLASSES  # every true label differs from the prediction
    seen = []

    def recording_pgd(model, x, labels, config, generator=None, target=None):
        seen.append((labels.clone(), config))
        return pgd_attack(model, x, labels, config, generator)
    monkeypatch.setattr(mixup_inference, "pgd_attack", recording_pgd)
    attack = PGDConfig("linf", 0.1, 0.025, 2)
    step = make_mixup_step(model, "iat", NUM_CLASSES, lambda index: attack, torch.Generator().manual_seed(0),
                           adv_ratio=0.5)
    loss, logits_nat, logits_adv, extras = step(x, y, 0)
    assert torch.equal(seen[0][0], predicted) and seen[0][1] is attack
    assert torch.isclose(loss, 0.5 * extras["train_adv_mix_loss"] + 0.5 * extras["train_clean_mix_loss"])
    assert logits_adv.shape == (8, NUM_CLASSES) and loss.requires_grad
    seen.clear()
    step = make_mixup_step(model, "iat", NUM_CLASSES, lambda index: None, torch.Generator().manual_seed(0))
    step(x, y, 0)
    assert not seen, "a warm-up batch (no attack) is plain mixup"


# ----------------------------------------------------------------------------------------------
# The worst-case column: per repeat, correct clean and under every attack of that repeat


def test_worst_case_counts_an_example_only_if_no_attack_of_its_repeat_fooled_it():
    t = lambda *bits: torch.tensor(bits, dtype=torch.bool)  # noqa: E731
    correct = {"clean": [t(1, 1, 1, 1, 0), t(1, 1, 1, 1, 0)],
               "oblivious": [t(0, 1, 1, 1, 0), t(0, 1, 1, 1, 0)],   # fails on example 0 in both repeats
               "eot-pgd": [t(1, 0, 1, 1, 1), t(1, 1, 0, 1, 1)]}      # on example 1, then on example 2
    assert test_mixup_inference.worst_case(correct) == [0.4, 0.4]   # each repeat: examples 2, 3 / 1, 3 correct
    # below every attack's own accuracy (0.6 each), and not the pooled 0.2 (example 3 alone over both repeats)
    assert test_mixup_inference.worst_case({"clean": [t(1, 0)]}) == [0.5]


def test_evaluate_rows_takes_the_worst_case_per_repeat(monkeypatch):
    """Hand-made attacks that fool different examples: the worst case per repeat is below every attack, and
    the wrapper's repeats each have their own (the EOT attack fools example 1 in repeat 0, example 2 in 1)."""
    script = test_mixup_inference
    n = 8
    y = torch.arange(n) % NUM_CLASSES
    x = F.one_hot(y, NUM_CLASSES).float().view(n, 1, 1, NUM_CLASSES)  # the model's logits are its input
    model = nn.Flatten().eval()

    def fooling(examples):
        def craft(predictor, images, labels, generator):
            adversarial = images.clone()
            for i in examples():
                adversarial[i] = F.one_hot((labels[i] + 1) % NUM_CLASSES, NUM_CLASSES).float().view(1, 1, -1)
            return adversarial
        return craft
    eot_calls = []

    def eot_examples():
        eot_calls.append(len(eot_calls))
        return [eot_calls[-1]]  # example 0 on the base model, then 1 and 2 in the wrapper's two repeats
    monkeypatch.setattr(script, "oblivious_craft", lambda base, config: fooling(lambda: [3]))
    monkeypatch.setattr(script, "eot_pgd_craft", lambda *settings: fooling(eot_examples))
    monkeypatch.setattr(script, "aa_rand_craft", lambda *settings: fooling(lambda: [5]))
    args = script.build_parser().parse_args(["--checkpoints", "unused", "--modes", "ol", "--repeats", "2",
                                             "--mixup-lambda", "1", "--partners", "2"])
    args.epsilon, args.pgd_step_size, args.eot_step_size = 1.0, 0.25, 0.25
    pool = PartnerPool(torch.eye(NUM_CLASSES).view(NUM_CLASSES, 1, 1, NUM_CLASSES), torch.arange(NUM_CLASSES),
                       NUM_CLASSES)
    rows = script.evaluate_rows(model, pool, args, [(x, y)], torch.device("cpu"), [], "hand-made")
    base, wrapper = rows[0]["metrics"], rows[1]["metrics"]
    assert base["clean"]["values"] == [1.0] and base["oblivious"]["values"] == [7 / 8] == base["aa-rand"]["values"]
    assert base["eot-pgd"]["values"] == [7 / 8] and base["worst"]["values"] == [5 / 8]
    assert wrapper["eot-pgd"]["values"] == [7 / 8, 7 / 8] and wrapper["oblivious"]["values"] == [7 / 8, 7 / 8]
    assert wrapper["worst"]["values"] == [5 / 8, 5 / 8], "per repeat, not pooled over repeats (4 / 8)"
    assert wrapper["worst"]["std"] == 0.0 and wrapper["worst"]["repeats"] == 2
    assert eot_calls == [0, 1, 2]
    columns = [key for key, _ in script.column_headers(args)]
    assert columns[-1] == "worst" and set(columns) == set(base)


# ----------------------------------------------------------------------------------------------
# Stage scripts end to end, on a tiny mixup-trained SmallCNN

TINY_RUN = ["--dataset", "fashion-mnist", "--train-limit", "400", "--val-size", "100", "--test-limit", "50",
            "--batch-size", "50", "--num-steps", "2", "--eval-steps", "2", "--warmup-epochs", "0",
            "--eps-ramp-epochs", "0", "--lr", "0.05", "--device", "cpu"]


@pytest.fixture(scope="module")
def mixup_run(fmnist_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("mixup") / "run"
    train_standard.main(TINY_RUN + ["--data-dir", str(fmnist_dir), "--model-dir", str(model_dir), "--loss", "mixup",
                                    "--train-limit", "1000", "--epochs", "2"])
    return model_dir


def test_train_standard_mixup_selects_on_clean_accuracy(mixup_run):
    config = json.loads((mixup_run / "config.json").read_text())
    assert config["args"]["loss"] == "mixup" and config["args"]["mixup_alpha"] == 1.0 and config["train_attack"] is None
    rows = read_metrics(mixup_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r[key]) <= 1 for r in rows for key in ("train_clean_acc", "val_clean_acc", "test_pgd_acc"))
    assert float(rows[-1]["val_clean_acc"]) > 0.3, "mixup training learns"
    best = torch.load(mixup_run / "best.pt", weights_only=True)
    assert best["epoch"] == int(max(rows, key=lambda r: float(r["val_clean_acc"]))["epoch"])


def test_train_standard_iat_end_to_end(fmnist_dir, tmp_path):
    model_dir = tmp_path / "iat"
    train_standard.main(TINY_RUN + ["--data-dir", str(fmnist_dir), "--model-dir", str(model_dir), "--loss", "iat",
                                    "--epochs", "1", "--iat-adv-ratio", "0.7"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["train_attack"]["random_start"] == "uniform" and config["train_attack"]["num_steps"] == 2
    row = read_metrics(model_dir)[0]
    assert {"train_adv_mix_loss", "train_clean_mix_loss", "train_adv_acc", "val_pgd_acc"} <= set(row)
    assert math.isclose(float(row["train_loss"]), 0.7 * float(row["train_adv_mix_loss"])
                        + 0.3 * float(row["train_clean_mix_loss"]), rel_tol=1e-4)
    assert (model_dir / "best.pt").is_file()
    assert torch.load(model_dir / "last.pt", weights_only=True)["best"]["key"] == "val_pgd_acc"


def test_eot_pgd_is_at_least_as_strong_as_the_oblivious_attack(mixup_run, fmnist_dir):
    model, checkpoint = load_model(mixup_run / "best.pt", "cpu")
    model.eval()
    splits = load_splits("fashion-mnist", fmnist_dir, val_size=100, train_limit=1000, test_limit=40, seed=0, augment=False)
    pool = pool_from_splits(splits, "val")
    images, labels = zip(*[splits.test[i] for i in range(len(splits.test))])
    x, y = torch.stack(images), torch.tensor(labels)
    wrapper = MixupInference(model, pool, MixupInferenceConfig(mode="ol", partners=6, lam=0.7), seed=0).eval()
    attack = PGDConfig("linf", 0.1, 0.025, 10)
    oblivious = pgd_attack(model, x, y, attack, torch.Generator().manual_seed(0))
    craft = test_mixup_inference.eot_pgd_craft(0.1, 0.025, 10, 3)
    torch.manual_seed(0)
    eot = craft(wrapper, x, y, None)
    assert (eot - x).abs().max() <= 0.1 + 1e-6 and 0 <= eot.min() and eot.max() <= 1

    def accuracy(images):
        with torch.no_grad():
            return sum((wrapper.reseed(seed)(images).argmax(1) == y).float().mean().item() for seed in range(3)) / 3
    clean, under_oblivious, under_eot = accuracy(x), accuracy(oblivious), accuracy(eot)
    assert under_eot < clean and under_eot <= under_oblivious, (clean, under_oblivious, under_eot)


def test_test_mixup_inference_end_to_end(mixup_run, fmnist_dir, tmp_path):
    out_dir = tmp_path / "eval"
    argv = ["--checkpoints", str(mixup_run), "--data-dir", str(fmnist_dir), "--modes", "ol", "combined",
            "--test-limit", "20", "--batch-size", "10", "--repeats", "2", "--partners", "3", "--combined-ol-partners",
            "3", "--combined-pl-partners", "2", "--pgd-steps", "2", "--eot-steps", "2", "--eot-samples", "2",
            "--aa-iterations", "2", "--aa-eot-iter", "2", "--device", "cpu", "--out-dir", str(out_dir)]
    assert test_mixup_inference.main(argv) == 0
    assert {"results.json", "results.csv", "results.md", "warnings.json"} <= {p.name for p in out_dir.iterdir()}
    results = json.loads((out_dir / "results.json").read_text())
    assert results["complete"] and results["command"].startswith("test_mixup_inference.py") and results["git_commit"]
    assert results["wall_seconds"] > 0 and results["repeats"] == 2 and results["test_images"] == 20
    assert results["settings"]["eot-pgd"]["samples"] == 2 and results["settings"]["aa-rand"]["eot_iter"] == 2
    assert len(results["settings"]["seeds"]["partners"]) == 2
    record = results["models"][0]
    assert record["label"] == "mixup" and [row["label"] for row in record["rows"]] == [
        "base model", "mixup inference (ol)", "mixup inference (combined)"]
    val = load_splits("fashion-mnist", fmnist_dir, val_size=100, train_limit=400, test_limit=1, seed=0).val
    assert record["pool"]["source"] == "val" and sorted(record["pool"]["indices"]) == sorted(val.indices)
    for row in record["rows"]:
        assert set(row["metrics"]) == {"clean", "oblivious", "eot-pgd", "aa-rand", "worst"}
        for summary in row["metrics"].values():
            assert len(summary["values"]) == (1 if row["mode"] is None else 2)
            assert all(0 <= v <= 1 for v in summary["values"]) and summary["std"] >= 0
        assert row["metrics"]["oblivious"]["mean"] <= row["metrics"]["clean"]["mean"] + 0.2
        worst = row["metrics"]["worst"]["values"]
        assert all(w <= min(row["metrics"][k]["values"][r] for k in ("clean", "oblivious", "eot-pgd", "aa-rand"))
                   for r, w in enumerate(worst))
    assert [c["key"] for c in results["columns"]] == ["clean", "oblivious", "eot-pgd", "aa-rand", "worst"]
    assert record["channels_last"] is True  # SmallCNN on the CPU: test_comparison.py's default
    base = record["rows"][0]["metrics"]
    assert base["oblivious"]["mean"] <= base["clean"]["mean"]
    markdown = (out_dir / "results.md").read_text()
    assert "±" in markdown and "| mixup | mixup inference (ol) |" in markdown and "never the test set" in markdown
    csv_lines = (out_dir / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("model,row,mode,repeats,clean_mean,clean_std")
    # The same command again: identical numbers (every draw is seeded).
    again = tmp_path / "again"
    test_mixup_inference.main(argv[:-1] + [str(again)])
    rows_again = json.loads((again / "results.json").read_text())["models"][0]["rows"]
    assert [r["metrics"] for r in rows_again] == [r["metrics"] for r in record["rows"]]


def test_an_interrupted_mixup_inference_evaluation_resumes_to_the_uninterrupted_results(mixup_run, fmnist_dir,
                                                                                         tmp_path, monkeypatch):
    script, calls, stop = test_mixup_inference, [], {}
    real = script.evaluate_once

    def counted(*args, **kwargs):
        calls.append(kwargs["desc"])
        if stop.get("at") == len(calls):
            raise KeyboardInterrupt  # ctrl-C, or the session ending, inside that pass
        return real(*args, **kwargs)
    monkeypatch.setattr(script, "evaluate_once", counted)
    argv = ["--checkpoints", str(mixup_run), "--data-dir", str(fmnist_dir), "--modes", "ol", "--attacks", "oblivious",
            "eot-pgd", "--test-limit", "20", "--batch-size", "10", "--repeats", "2", "--partners", "3",
            "--pgd-steps", "2", "--eot-steps", "2", "--eot-samples", "2", "--device", "cpu"]
    assert script.main(argv + ["--out-dir", str(tmp_path / "whole")]) == 0
    assert len(calls) == 3 + 3 * 2 and not (tmp_path / "whole" / "progress").exists()  # base: 3 passes; OL: 3 x 2
    # the base row and OL's two clean passes done; the first oblivious pass through OL interrupted
    interrupt_then_resume(script.main, argv + ["--out-dir", str(tmp_path / "cut")], calls, stop, {"at": 6})
    assert len(calls) == 4 and all("mixup inference (ol)" in desc for desc in calls)
    whole, cut = (json.loads((tmp_path / name / "results.json").read_text())["models"][0]["rows"]
                  for name in ("whole", "cut"))
    assert [(r["metrics"], r["budget"]) for r in cut] == [(r["metrics"], r["budget"]) for r in whole]
    assert not (tmp_path / "cut" / "progress").exists()
    # other settings (here EOT's samples): the journal is not used, every pass is evaluated anew
    other = argv + ["--out-dir", str(tmp_path / "other")]
    interrupt_then_resume(script.main, other + ["--eot-samples", "1"], calls, stop, {"at": 5}, resumed_argv=other)
    assert len(calls) == 9


def test_bad_input_is_one_line(mixup_run, fmnist_dir, tmp_path):
    result = run_script("train_standard.py", TINY_RUN + ["--data-dir", str(fmnist_dir), "--loss", "mixup", "--head",
                                                         "mmc", "--model-dir", str(tmp_path / "x")])
    assert_one_line_error(result, "softmax head only")
    common = ["--checkpoints", str(mixup_run), "--data-dir", str(fmnist_dir), "--out-dir", str(tmp_path / "o")]
    assert_one_line_error(run_script("test_mixup_inference.py", common + ["--mixup-lambda", "1.5"]), "(0, 1]")
    assert_one_line_error(run_script("test_mixup_inference.py", common + ["--combined-ol-lambda", "0"]), "(0, 1]")
    assert_one_line_error(run_script("test_mixup_inference.py", common + ["--pool", "test"]), "invalid choice")


def test_a_checkpoint_without_validation_images_needs_another_pool(mixup_run, fmnist_dir, tmp_path):
    checkpoint = torch.load(mixup_run / "best.pt", weights_only=True)
    checkpoint["config"]["val_size"] = 0
    path = tmp_path / "no_val.pt"
    torch.save(checkpoint, path)
    from utils.errors import UserError
    with pytest.raises(UserError, match="--pool train"):
        test_mixup_inference.main(["--checkpoints", str(path), "--data-dir", str(fmnist_dir),
                                   "--out-dir", str(tmp_path / "o")])
