"""reproduce.py on a multi-GPU node: each running stage gets its own GPUs (CUDA_VISIBLE_DEVICES), and
--gpus-per-stage K starts every stage under torchrun with K processes. Checked without a GPU: the
assignment through an explicit --devices list, torchrun with gloo processes on the CPU."""
import json
import threading
import time

import pytest

from tests.test_reproduce import run_study
from utils import pipeline
from utils.errors import UserError
from utils.pipeline import MARKER, Launch, Task, default_jobs, execute, resolve_launch


def fake_tasks(tmp_path, count, deps=None):
    tasks = []
    for index in range(count):
        run_dir = tmp_path / f"t{index}"
        run_dir.mkdir()
        tasks.append(Task(f"seed0/t{index}", "eval", "test_comparison.py", ["--index", str(index)], run_dir, 0,
                          deps=(deps or {}).get(index, [])))
    return tasks


def recording_call(calls, seconds=0.3):
    lock = threading.Lock()

    def call(command, stdout, stderr, env):
        started = time.perf_counter()
        time.sleep(seconds)
        with lock:
            calls.append({"command": command, "devices": env.get("CUDA_VISIBLE_DEVICES"),
                          "threads": env.get("OMP_NUM_THREADS"), "start": started, "end": time.perf_counter()})
        return 0
    return call


def test_running_stages_never_share_a_gpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline.subprocess, "call", recording_call(calls))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tasks = fake_tasks(tmp_path, 6, deps={5: ["seed0/t0"]})
    launch = Launch(("0", "1", "2", "3", "4"), per_stage=2)  # two shares of 2; device 4 stays idle
    execute(tasks, default_jobs(launch, 1), tmp_path / "logs", launch)
    assert len(calls) == 6
    for call in calls:
        assert call["devices"] in ("0,1", "2,3")
        assert call["command"][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    overlapping = [(a, b) for i, a in enumerate(calls) for b in calls[i + 1:] if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, "two shares: stages must run side by side"
    assert all(a["devices"] != b["devices"] for a, b in overlapping)
    marker = json.loads((tmp_path / "t5" / MARKER).read_text())
    assert marker["processes"] == 2 and marker["visible_devices"] in ("0,1", "2,3")


def test_one_gpu_per_stage_and_the_cpu_case(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline.subprocess, "call", recording_call(calls, 0.2))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "gpus").mkdir()
    execute(fake_tasks(tmp_path / "gpus", 4), 3, tmp_path / "logs", Launch(("5", "6", "7")))
    seen = [c["devices"] for c in calls]
    assert len(seen) == 4 and set(seen) == {"5", "6", "7"}  # the fourth stage reuses a freed GPU
    assert all(c["command"][1] != "-m" for c in calls)  # one process: the script itself
    calls.clear()
    (tmp_path / "cpu").mkdir()
    execute(fake_tasks(tmp_path / "cpu", 2), 2, tmp_path / "logs", Launch())
    assert [c["devices"] for c in calls] == [None, None]  # on the CPU nothing is assigned


def test_devices_default_to_the_visible_ones_and_bad_lists_are_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert resolve_launch("auto", None, 2) == Launch(("3", "5", "6", "7"), 2)
    assert default_jobs(resolve_launch("cuda", None, 2), 1) == 2 and default_jobs(resolve_launch("cuda", None, 1), 1) == 4
    assert resolve_launch("cpu", None, 2) == Launch((), 2) and default_jobs(Launch((), 2), 3) == 3
    for device, devices, per_stage, fragment in (("cuda:1", ["0", "1"], 1, "use --device cuda"),
                                                 ("cuda", ["0", "0"], 1, "twice"),
                                                 ("cuda", ["0"], 2, "needs at least 2 devices")):
        with pytest.raises(UserError, match=fragment):
            resolve_launch(device, devices, per_stage)


def test_a_tiny_study_under_torchrun_with_assigned_devices(fmnist_dir, tmp_path):
    """Every stage really runs as 2 gloo processes and sees the GPUs it was given; the study completes."""
    out = tmp_path / "study"
    result = run_study(["--preset", "demo", "--defenses", "standard-at", "namid", "--seeds", "0", "--epsilons",
                        "--out", str(out), "--data-dir", str(fmnist_dir), "--device", "cpu", "--devices", "7", "9",
                        "--gpus-per-stage", "2", "--set", "train-limit=200", "val-size=100", "test-limit=60",
                        "train.epochs=1", "train.eval-steps=2", "train.warmup-epochs=0", "mi.epochs=1",
                        "eval.pgd-steps=3", "eval.pgd-l2-steps=3", "eval.attacks=pgd", "eval.batch-size=20",
                        "namid.allow-uninformative-estimators=true"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("standard-at", "only-max", "namid"):
        config = json.loads((out / "seed0" / stage / "config.json").read_text())
        assert config["processes"] == 2 and config["machine"]["visible_devices"] == "7,9", stage
    for defense in ("standard-at", "namid"):
        evaluation = json.loads((out / "seed0" / f"eval-{defense}" / "results.json").read_text())
        assert evaluation["processes"] == 2 and evaluation["visible_devices"] == "7,9"
        assert len(evaluation["models"][0]["clean"]["per_example"]) == 60
    assert "| NAMID |" in (out / "results.md").read_text()
