"""Assertions and runners shared by the stage-script tests."""
import csv
import hashlib
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

# what reproduce.py hands write_study about the command that made the table, for the tests that call it directly
INVOCATION = {"command": "reproduce.py --preset test", "seconds": 1.0, "machine": "test"}


def read_metrics(model_dir):
    with open(model_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_script(script, args, timeout=300):
    """Run a stage script in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, fragment):
    """Bad input: non-zero exit, exactly one line on stderr containing `fragment`, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


def assert_resume_is_bit_identical(main, args_for, tmp_path, weights_key="model", first_leg=()):
    """2 epochs straight vs 1 epoch + --resume + 1 epoch: identical weights and metrics (but the timings).

    args_for(model_dir, *extra) builds a script's arguments; first_leg adds flags to the 1-epoch run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(args_for(straight, "--epochs", "2"))
    main(args_for(resumed, "--epochs", "1", *first_leg))
    main(args_for(resumed, "--epochs", "2", "--resume"))
    a = torch.load(straight / "last.pt", weights_only=True)[weights_key]
    b = torch.load(resumed / "last.pt", weights_only=True)[weights_key]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop_time(read_metrics(straight)) == drop_time(read_metrics(resumed))


def record_local_inputs(estimators):
    """The input each estimator's local encoder receives, by estimator name."""
    seen = {"natural": [], "adversarial": []}
    for name in seen:
        estimators[name].local.register_forward_hook(lambda m, inputs, output, name=name: seen[name].append(inputs[0]))
    return seen


def record_estimator_precision(estimators):
    """(module, output dtype, whether CPU autocast was on) for every forward of every estimator module."""
    seen = []
    for module in estimators.modules():
        module.register_forward_hook(
            lambda m, i, o: seen.append((type(m).__name__, o.dtype, torch.is_autocast_enabled("cpu"))))
    return seen


def assert_all_float32_without_autocast(seen):
    assert seen and all(dtype == torch.float32 and not autocast for _, dtype, autocast in seen), set(seen)


def interrupt_then_resume(main, argv, calls: list, stop: dict, interruption: dict, resumed_argv=None):
    """main(argv) interrupted as `interruption` tells the test's wrapper (put into stop, which raises
    KeyboardInterrupt there), then main(resumed_argv or argv, plus --resume) to completion; calls, cleared before
    each run, then holds what the resumed run computed."""
    calls.clear()
    stop.update(interruption)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    calls.clear()
    stop.clear()
    assert main(list(resumed_argv or argv) + ["--resume"]) == 0
