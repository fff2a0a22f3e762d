"""train_standard.py end to end: outputs, resume equality, kill-and-resume, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_standard
from tests.conftest import REPO
from tests.helpers import assert_one_line_error, assert_resume_is_bit_identical, digest, read_metrics, run_script
from utils.training import NonFiniteLoss

SCRIPT = "train_standard.py"

SMALL_RUN = ["--dataset", "fashion-mnist", "--train-limit", "300", "--val-size", "100", "--test-limit", "100",
             "--batch-size", "50", "--num-steps", "2", "--eval-steps", "2", "--warmup-epochs", "0",
             "--eps-ramp-epochs", "0", "--lr", "0.05", "--device", "cpu"]
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc",
                  "test_clean_acc", "test_pgd_acc", "seconds"]


def small_args(fmnist_dir, model_dir, *extra):
    return SMALL_RUN + ["--data-dir", str(fmnist_dir), "--model-dir", str(model_dir), *extra]


def test_end_to_end_writes_every_output(fmnist_dir, tmp_path):
    model_dir = tmp_path / "run"
    assert train_standard.main(small_args(fmnist_dir, model_dir, "--epochs", "2", "--loss", "trades")) == 0
    assert sorted(p.name for p in model_dir.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.csv"]

    config = json.loads((model_dir / "config.json").read_text())
    assert config["stage"] == "standard" and config["args"]["loss"] == "trades" and config["args"]["epochs"] == 2
    assert config["args"]["arch"] == "small-cnn" and config["args"]["epsilon"] == pytest.approx(0.1)
    assert config["args"]["step_size"] == pytest.approx(0.025)
    assert "torch" in config["versions"] and config["git_commit"] and config["command"].startswith("train_standard.py")
    assert config["train_attack"]["loss"] == "kl"

    rows = read_metrics(model_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == METRIC_COLUMNS
    for row in rows:
        for key in METRIC_COLUMNS[3:9]:
            assert 0.0 <= float(row[key]) <= 1.0, (key, row[key])
        for key in METRIC_COLUMNS[5:9]:  # 100 validation and 100 test images, each counted once
            assert float(row[key]) * 100 == pytest.approx(round(float(row[key]) * 100), abs=1e-6), (key, row[key])
        assert float(row["test_pgd_acc"]) <= float(row["test_clean_acc"])
        assert float(row["seconds"]) > 0

    last = torch.load(model_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["history"]) == 2 and last["model_spec"]["arch"] == "small-cnn"
    assert set(last) >= {"model", "optimizer", "scheduler", "rng", "best", "config"}
    best = torch.load(model_dir / "best.pt", weights_only=True)
    best_epoch = max(rows, key=lambda r: float(r["val_pgd_acc"]))["epoch"]
    assert best["epoch"] == int(best_epoch) == last["best"]["epoch"]
    assert "optimizer" not in best


def test_resume_is_bit_identical(fmnist_dir, tmp_path):
    assert_resume_is_bit_identical(train_standard.main, lambda d, *extra: small_args(fmnist_dir, d, *extra), tmp_path)


def test_at_attack_loss_cw_trains_softmax_at_on_the_cw_margin(fmnist_dir, tmp_path, monkeypatch):
    """--at-attack-loss cw: the training PGD ascends the CW margin (recorded in config.json), the validation
    PGD stays cross-entropy; without the flag a softmax model's training attack is cross-entropy."""
    import utils.attacks
    ascended = []
    original = utils.attacks.attack_objective

    def spy(logits, y, loss, *rest, **kwargs):
        ascended.append(loss)
        return original(logits, y, loss, *rest, **kwargs)

    monkeypatch.setattr(utils.attacks, "attack_objective", spy)
    extra = ["--epochs", "1", "--train-limit", "100", "--batch-size", "50"]
    assert train_standard.main(small_args(fmnist_dir, tmp_path / "cw", *extra, "--at-attack-loss", "cw")) == 0
    assert json.loads((tmp_path / "cw" / "config.json").read_text())["train_attack"]["loss"] == "cw"
    # 2 training batches of 2 PGD steps on the CW margin; the validation and test PGD on cross-entropy
    assert ascended.count("cw") == 4 and set(ascended) == {"cw", "ce"}
    ascended.clear()
    assert train_standard.main(small_args(fmnist_dir, tmp_path / "ce", *extra)) == 0
    assert json.loads((tmp_path / "ce" / "config.json").read_text())["train_attack"]["loss"] == "ce"
    assert set(ascended) == {"ce"}


def test_sigkill_then_resume_finishes_the_run(fmnist_dir, tmp_path):
    model_dir = tmp_path / "killed"
    args = small_args(fmnist_dir, model_dir, "--epochs", "3")
    process = subprocess.Popen([sys.executable, str(REPO / "train_standard.py"), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (model_dir / "metrics.csv").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere inside epoch 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (model_dir / "last.pt").exists(), "no checkpoint was written before the kill"
    assert torch.load(model_dir / "last.pt", weights_only=True)["epoch"] >= 1
    result = run_script(SCRIPT, args + ["--resume"])
    assert result.returncode == 0, result.stderr
    assert [int(r["epoch"]) for r in read_metrics(model_dir)] == [1, 2, 3]
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"
    [resume] = json.loads((model_dir / "config.json").read_text())["resumes"]  # provenance of the continuation
    assert 1 <= resume["after_epoch"] <= 2 and set(resume) == {"after_epoch", "time", "host", "git_commit"}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fmnist_dir, tmp_path, monkeypatch):
    model_dir = tmp_path / "nan"
    train_standard.main(small_args(fmnist_dir, model_dir, "--epochs", "1"))
    before = digest(model_dir / "last.pt")
    import utils.training as training
    nan_loss = lambda objective, head, outputs_nat, outputs_adv, y, beta: outputs_adv.sum() * float("nan")
    monkeypatch.setattr(training, "training_loss", nan_loss)
    with pytest.raises(NonFiniteLoss, match="loss became nan at epoch 2, batch 1"):
        train_standard.main(small_args(fmnist_dir, model_dir, "--epochs", "2", "--resume"))
    assert digest(model_dir / "last.pt") == before
    assert len(read_metrics(model_dir)) == 1


@pytest.mark.parametrize("flags,fragment", [
    (["--epsilon", "0"], "--epsilon: must be > 0"),
    (["--epsilon=-8/255"], "--epsilon: must be > 0"),
    (["--epsilon", "eight"], "is not a number"),
    (["--num-steps", "0"], "--num-steps: must be >= 1"),
    (["--dataset", "imagenet-1k"], "invalid choice: 'imagenet-1k'"),
    (["--arch", "resnet1000"], "invalid choice: 'resnet1000'"),
    (["--device", "cuda:7"], "device 'cuda:7'"),
    (["--loss", "mart", "--at-attack-loss", "cw"], "--loss mart has its own"),
    (["--head", "mmc", "--at-attack-loss", "ce"], "saturated cross-entropy"),
])
def test_bad_flags_give_one_line(fmnist_dir, tmp_path, flags, fragment):
    assert_one_line_error(run_script(SCRIPT, small_args(fmnist_dir, tmp_path / "bad", *flags)), fragment)
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_missing_dataset_gives_one_line(tmp_path):
    result = run_script(SCRIPT, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--model-dir",
                         str(tmp_path / "run"), "--device", "cpu"], timeout=600)
    assert_one_line_error(result, str(tmp_path / "nowhere"))
    assert not (tmp_path / "run").exists(), "a run that failed before training left its folder behind"


def test_unwritable_model_dir(fmnist_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_one_line_error(run_script(SCRIPT, small_args(fmnist_dir, blocker / "run", "--epochs", "1")), "cannot write to model directory")


def test_bad_checkpoints_are_reported_and_never_damaged(fmnist_dir, tmp_path):
    model_dir = tmp_path / "run"
    assert_one_line_error(run_script(SCRIPT, small_args(fmnist_dir, model_dir, "--epochs", "1", "--resume")), "no ")
    assert run_script(SCRIPT, small_args(fmnist_dir, model_dir, "--epochs", "1")).returncode == 0
    good = digest(model_dir / "last.pt")

    # a second fresh run into the same folder must not overwrite it
    assert_one_line_error(run_script(SCRIPT, small_args(fmnist_dir, model_dir, "--epochs", "1")), "already holds a run")
    # resuming with another architecture
    assert_one_line_error(run_script(SCRIPT, small_args(fmnist_dir, model_dir, "--epochs", "2", "--resume", "--arch", "resnet18")),
                          "--arch small-cnn")
    assert digest(model_dir / "last.pt") == good

    # a checkpoint whose weights are of another architecture
    other = tmp_path / "other"
    checkpoint = torch.load(model_dir / "last.pt", weights_only=True)
    checkpoint["model"] = {"net.fc.weight": torch.zeros(10, 512)}
    other.mkdir()
    torch.save(checkpoint, other / "last.pt")
    assert_one_line_error(run_script(SCRIPT, small_args(fmnist_dir, other, "--epochs", "2", "--resume")), "does not fit")

    # a truncated (corrupt) checkpoint
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes((model_dir / "last.pt").read_bytes()[:1000])
    before = digest(corrupt / "last.pt")
    assert_one_line_error(run_script(SCRIPT, small_args(fmnist_dir, corrupt, "--epochs", "2", "--resume")), "cannot read checkpoint")
    assert digest(corrupt / "last.pt") == before
    assert digest(model_dir / "last.pt") == good


def test_finished_run_resumes_to_nothing(fmnist_dir, tmp_path):
    model_dir = tmp_path / "done"
    train_standard.main(small_args(fmnist_dir, model_dir, "--epochs", "1"))
    before = digest(model_dir / "last.pt")
    assert train_standard.main(small_args(fmnist_dir, model_dir, "--epochs", "1", "--resume")) == 0
    assert digest(model_dir / "last.pt") == before


def test_cifar10_code_path_with_a_resnet_under_l2(fake_cifar10, tmp_path):
    """The colour-data path (augmentation, ResNet, L2 budget defaults) on synthetic CIFAR-10 files."""
    model_dir = tmp_path / "cifar"
    train_standard.main(["--dataset", "cifar10", "--data-dir", str(fake_cifar10), "--arch", "resnet18", "--width", "8",
                         "--norm", "l2", "--val-size", "20", "--epochs", "1", "--batch-size", "16", "--num-steps", "1",
                         "--eval-steps", "1", "--device", "cpu", "--model-dir", str(model_dir), "--tensorboard"])
    config = json.loads((model_dir / "config.json").read_text())["args"]
    assert config["epsilon"] == pytest.approx(0.5) and config["batch_size"] == 16 and config["milestones"] == [1]
    spec = torch.load(model_dir / "best.pt", weights_only=True)["model_spec"]
    assert (spec["arch"], spec["in_channels"], spec["image_size"], spec["num_classes"], spec["width"]) == ("resnet18", 3, 32, 10, 8)
    assert len(read_metrics(model_dir)) == 1
    assert any(p.name.startswith("events.out.tfevents") for p in (model_dir / "tensorboard").iterdir())


def test_atomic_writes_give_files_the_usual_permissions(tmp_path):
    from utils.checkpoint import atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_grad_clip_bounds_every_step_gradient(fmnist_dir, tmp_path, monkeypatch):
    norms = []
    original = torch.optim.SGD.step
    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    train_standard.main(small_args(fmnist_dir, tmp_path / "clip", "--epochs", "1", "--grad-clip", "0.05"))
    assert norms and max(norms) <= 0.05 * (1 + 1e-4)
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["args"]["grad_clip"] == 0.05
