"""reproduce.py --launcher slurm: the jobs submitted (with stand-ins for sbatch, squeue and scontrol), the refusals,
and a tiny study end to end on a real one-node SLURM cluster started here from Debian's packages (slurmctld,
slurmd, slurm-client, munge). That test skips only when they are absent and REQUIRE_SLURM is not set (CI sets it)."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import reproduce
from tests.conftest import REPO
from tests.helpers import assert_one_line_error
from utils.errors import UserError
from utils.pipeline import MARKER, build_plan, input_hashes, resolve_config
from utils.slurm import command_digest, log_path, study_arguments

STAGES = ["seed0/standard-at", "seed0/only-max", "seed0/namid", "seed0/eval-standard-at", "seed0/eval-namid"]
# what each job must wait for: the stages it reads (the demo's NAMID reads the only-max estimators)
NEEDS = {"seed0/standard-at": [], "seed0/only-max": ["seed0/standard-at"], "seed0/namid": ["seed0/only-max"],
         "seed0/eval-standard-at": ["seed0/standard-at"], "seed0/eval-namid": ["seed0/namid"], "results": STAGES}


def run_reproduce(args, env=None, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "reproduce.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def listed_jobs(stdout: str) -> dict:
    """{stage: job id} from what reproduce.py prints after submitting."""
    return {stage: job_id for job_id, stage in re.findall(r"^\s+job (\d+)\s+(\S+)", stdout, re.MULTILINE)}


# ----------------------------------------------------------------------------------------------
# The submitted jobs, with stand-ins for SLURM's commands (no cluster needed)

FAKE_SBATCH = """#!{python}
import json, os, sys
folder = os.environ["FAKE_SLURM"]
if os.path.exists(folder + "/refuse"):
    print("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
          file=sys.stderr)
    sys.exit(1)
with open(folder + "/sbatch.jsonl", "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
print(sum(1 for _ in open(folder + "/sbatch.jsonl")) + 100)
"""
FAKE_SQUEUE = """#!{python}
import os
path = os.environ["FAKE_SLURM"] + "/squeue.txt"
print(open(path).read() if os.path.exists(path) else "", end="")
"""
FAKE_SCONTROL = """#!{python}
import json, os, sys
states = json.load(open(os.environ["FAKE_SLURM"] + "/states.json"))
if sys.argv[-1] not in states:
    sys.exit(print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr) or 1)
print(f"JobId={{sys.argv[-1]}} JobName=x JobState={{states[sys.argv[-1]][0]}} Reason={{states[sys.argv[-1]][1]}}")
"""


class FakeSlurm:
    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "states.json").write_text("{}")

    def sbatch_calls(self) -> list:
        """One {option: value} per sbatch call, in order; the wrapped command under "wrap", split."""
        path = self.folder / "sbatch.jsonl"
        calls = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            options = dict(arg[2:].split("=", 1) if "=" in arg else (arg[2:], True) for arg in json.loads(line))
            options["wrap"] = shlex.split(options["wrap"])
            calls.append(options)
        return calls

    def by_stage(self) -> dict:
        return {call["job-name"].split(":", 1)[1]: call for call in self.sbatch_calls()}

    def queue(self, *lines):
        (self.folder / "squeue.txt").write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    folder = tmp_path / "fake-slurm"
    (folder / "bin").mkdir(parents=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scontrol", FAKE_SCONTROL)):
        path = folder / "bin" / name
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    return FakeSlurm(folder)


def demo_args(out, *extra):
    return ["--preset", "demo", "--defenses", "standard-at", "namid", "--seeds", "0", "--epsilons", "0.1",
            "--out", str(out), "--device", "cpu", "--launcher", "slurm", *extra]


def demo_tasks(out) -> dict:
    """The plan demo_args(out) makes, by stage."""
    runner = {"seeds": [0], "defenses": ["standard-at", "namid"], "jobs": None, "curve_steps": None,
              "epsilons": ["0.1"], "namid_estimators": None}
    return {task.name: task for task in build_plan(resolve_config("demo", [], runner), out, "cpu", "data")}


def mark_done(task):
    """A completion record as run_task writes it, for the inputs as they are now."""
    task.run_dir.mkdir(parents=True, exist_ok=True)
    (task.run_dir / MARKER).write_text(json.dumps({"argv": task.argv, "inputs": input_hashes(task)}))


def test_each_stage_is_a_job_after_the_jobs_of_the_stages_it_reads(fake_slurm, tmp_path, capsys):
    out = tmp_path / "study"
    argv = demo_args(out, "--device", "cuda", "--gpus-per-stage", "2", "--cpus-per-stage", "3",
                     "--slurm-args", "--partition=gpu --time=0:10:00")
    assert reproduce.main(argv) == 0
    jobs = fake_slurm.by_stage()
    stages = [*STAGES, "seed0/curve-eps0.1", "results"]
    assert list(jobs) == stages
    ids = {stage: str(101 + index) for index, stage in enumerate(stages)}
    needs = {**NEEDS, "seed0/curve-eps0.1": ["seed0/standard-at", "seed0/namid"], "results": stages[:-1]}
    study = study_arguments(argv)
    assert "--launcher" not in study and "--slurm-args" not in study and "--cpus-per-stage" not in study
    for stage, call in jobs.items():
        after = ":".join(ids[need] for need in needs[stage])
        assert call.get("dependency") == (f"afterok:{after}" if after else None), stage
        assert call.get("kill-on-invalid-dep") == ("yes" if after else None) and call["parsable"] is True
        # the job runs the same study, here only its stage (or the table), never submitting again
        assert call["wrap"] == [sys.executable, str(REPO / "reproduce.py"), *study, "--launcher", "local",
                                "--only-stage", stage]
        assert call["output"] == str(out / "logs" / f"{stage.replace('/', '_')}.slurm.log")
        assert call["job-name"] == f"study:{stage}" and call["chdir"] == os.getcwd()
        assert call["nodes"] == "1" and call["ntasks"] == "1"
        assert call["partition"] == "gpu" and call["time"] == "0:10:00"
        is_stage = stage != "results"
        assert (call.get("gres"), call.get("cpus-per-task")) == (("gpu:2", "3") if is_stage else (None, None))
    printed = capsys.readouterr().out
    assert listed_jobs(printed) == ids and f"squeue --jobs={','.join(ids.values())}" in printed


def test_on_the_cpu_a_job_asks_for_no_gpu(fake_slurm, tmp_path):
    assert reproduce.main(demo_args(tmp_path / "study")) == 0
    calls = fake_slurm.sbatch_calls()
    assert calls and all("gres" not in call and "cpus-per-task" not in call for call in calls)


def test_dry_run_prints_the_sbatch_commands_and_submits_nothing(fake_slurm, tmp_path, capsys):
    assert reproduce.main(demo_args(tmp_path / "study", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and all(line.startswith("sbatch --parsable ") for line in lines)
    assert "--dependency=afterok:<seed0/standard-at>:<seed0/namid>" in lines[5] and "--dry-run" not in lines[5]
    assert fake_slurm.sbatch_calls() == [] and not (tmp_path / "study").exists()


def test_finished_stages_get_no_job_and_are_no_dependency(fake_slurm, tmp_path, capsys):
    out = tmp_path / "study"
    tasks = demo_tasks(out)
    mark_done(tasks["seed0/standard-at"])
    (out / "seed0" / "standard-at" / "best.pt").write_bytes(b"weights")
    mark_done(tasks["seed0/only-max"])  # records the hash of that best.pt
    assert reproduce.main(demo_args(out)) == 0
    jobs = fake_slurm.by_stage()
    assert list(jobs) == ["seed0/namid", "seed0/eval-standard-at", "seed0/eval-namid", "seed0/curve-eps0.1", "results"]
    assert "dependency" not in jobs["seed0/namid"] and "dependency" not in jobs["seed0/eval-standard-at"]
    assert jobs["seed0/eval-namid"]["dependency"] == "afterok:101"
    assert jobs["results"]["dependency"] == "afterok:101:102:103:104"
    assert "2 stage(s) done already" in capsys.readouterr().out


def test_a_stage_whose_inputs_are_redone_gets_a_job_even_if_its_record_matches_today(fake_slurm, tmp_path):
    out = tmp_path / "study"
    tasks = demo_tasks(out)
    (out / "seed0" / "standard-at").mkdir(parents=True)
    (out / "seed0" / "standard-at" / "best.pt").write_bytes(b"weights")
    mark_done(tasks["seed0/only-max"])  # but Standard AT is not done: it will rewrite that best.pt
    assert reproduce.main(demo_args(out)) == 0
    jobs = fake_slurm.by_stage()
    assert jobs["seed0/only-max"]["dependency"] == "afterok:101" and list(jobs)[0] == "seed0/standard-at"


def queued_line(job_id, state, stage, out, digest=None):
    if digest is None:
        task = demo_tasks(out)[stage]
        digest = command_digest(task.script, task.argv, 1)
    return f"{job_id}|{state}|reproduce.py {stage} {digest} {out}"


def test_a_resubmission_depends_on_the_jobs_still_queued_instead_of_submitting_them_again(fake_slurm, tmp_path,
                                                                                         capsys):
    out = tmp_path / "study"
    fake_slurm.queue(queued_line(55, "RUNNING", "seed0/standard-at", out),
                     queued_line(56, "COMPLETING", "seed0/only-max", out),  # has ended: no dependency on it
                     queued_line(57, "PENDING", "seed0/standard-at", tmp_path / "other-study"),
                     "58|PENDING|(null)")
    assert reproduce.main(demo_args(out)) == 0
    jobs = fake_slurm.by_stage()
    assert "seed0/standard-at" not in jobs
    assert jobs["seed0/only-max"]["dependency"] == "afterok:55"
    assert jobs["seed0/eval-standard-at"]["dependency"] == "afterok:55"
    assert jobs["results"]["dependency"].startswith("afterok:55:101:")
    printed = capsys.readouterr().out
    assert re.search(r"job 55\s+seed0/standard-at\s+\(queued by an earlier submission\)", printed)


def test_a_resubmission_while_every_job_is_queued_submits_nothing(fake_slurm, tmp_path, capsys):
    out = tmp_path / "study"
    assert reproduce.main(demo_args(out)) == 0
    first = listed_jobs(capsys.readouterr().out)
    results = command_digest(study_arguments(demo_args(out)))
    fake_slurm.queue(*[queued_line(job_id, "PENDING", stage, out, results if stage == "results" else None)
                       for stage, job_id in first.items()])
    assert reproduce.main(demo_args(out, "--slurm-args=--hold")) == 0  # another site flag: the same jobs
    assert len(fake_slurm.sbatch_calls()) == len(first)
    assert listed_jobs(capsys.readouterr().out) == first


def test_a_new_final_job_waits_for_the_earlier_one(fake_slurm, tmp_path):
    out = tmp_path / "study"
    fake_slurm.queue(queued_line(70, "PENDING", "results", out, digest="0" * 16))
    assert reproduce.main(demo_args(out)) == 0
    assert fake_slurm.by_stage()["results"]["dependency"].endswith(",afterany:70")


def test_a_stage_queued_with_other_settings_is_refused_before_anything_is_submitted(fake_slurm, tmp_path):
    out = tmp_path / "study"
    fake_slurm.queue(queued_line(61, "PENDING", "seed0/namid", out, digest="0123456789abcdef"))
    with pytest.raises(UserError, match="seed0/namid is already queued as job 61 with other settings"):
        reproduce.main(demo_args(out))
    assert fake_slurm.sbatch_calls() == []


def test_wait_names_the_stage_that_failed(fake_slurm, tmp_path, monkeypatch):
    out = tmp_path / "study"
    (fake_slurm.folder / "states.json").write_text(json.dumps({
        "101": ["COMPLETED", "None"], "102": ["FAILED", "NonZeroExitCode"],
        **{str(i): ["CANCELLED", "DependencyNeverSatisfied"] for i in range(103, 108)}}))
    with pytest.raises(UserError, match=r"seed0/only-max \(job 102\) ended FAILED; its log: .*seed0_only-max"):
        reproduce.main(demo_args(out, "--wait"))


def test_study_arguments_drop_only_the_cluster_flags():
    argv = ["--preset", "demo", "--launcher=slurm", "--wait", "--slurm-args", "--time=1:00 --qos=x", "--set",
            "lr=0.1", "--cpus-per-stage", "4", "--only-stage=results", "--dry-run", "--seeds", "1"]
    assert study_arguments(argv) == ["--preset", "demo", "--set", "lr=0.1", "--seeds", "1"]


@pytest.mark.parametrize("extra, path, fragment", [
    ([], "empty", "--launcher slurm: sbatch is not on PATH"),
    (["--device", "auto"], "fake", "say where the stages run, --device cuda"),
    (["--devices", "0", "1"], "fake", "--devices picks GPUs of this machine"),
    (["--slurm-args=--comment='x"], "fake", "No closing quotation"),
    ([], "refusing", "sbatch refused seed0/standard-at: Batch job submission failed: Invalid account"),
])
def test_bad_cluster_input_is_one_line_on_stderr(extra, path, fragment, fake_slurm, tmp_path):
    if path == "refusing":
        (fake_slurm.folder / "refuse").touch()
    search = str(tmp_path / "empty-bin") if path == "empty" else os.environ["PATH"]
    (tmp_path / "empty-bin").mkdir()
    result = run_reproduce(demo_args(tmp_path / "study", *extra), env={"PATH": search}, timeout=300)
    assert_one_line_error(result, fragment)


def test_an_unknown_only_stage_is_one_line_on_stderr(tmp_path):
    result = run_reproduce(["--preset", "demo", "--out", str(tmp_path / "study"), "--only-stage", "seed0/nope"],
                           timeout=300)
    assert_one_line_error(result, "--only-stage 'seed0/nope': no such stage in this study")


def test_only_stage_refuses_a_stage_whose_inputs_are_not_finished(tmp_path):
    result = run_reproduce(["--preset", "demo", "--out", str(tmp_path / "study"), "--only-stage", "seed0/namid"],
                           timeout=300)
    assert_one_line_error(result, "--only-stage seed0/namid: it reads seed0/only-max, which is not finished")


# ----------------------------------------------------------------------------------------------
# A tiny study on a real one-node cluster

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCluster:
    """munged, slurmctld and slurmd in the foreground, everything (key, state, logs, socket) in one temporary
    folder, jobs run as root on this machine with all its CPUs."""

    def __init__(self):
        # short: a unix socket path has at most 107 characters
        self.folder = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.folder.chmod(0o755)
        self.conf = self.folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH}
        self.daemons = []

    def command(self, *args, check=True) -> str:
        result = subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def start(self):
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = self.folder / "munge.socket"
        self.launch("munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                    f"--pid-file={self.folder / 'munged.pid'}", f"--log-file={self.folder / 'munged.log'}",
                    f"--seed-file={self.folder / 'munged.seed'}")
        self.wait_for(lambda: socket_path.exists(), "munged's socket")
        host = socket.gethostname().split(".")[0]
        (self.folder / "state").mkdir()
        (self.folder / "spool").mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=namidtest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={self.folder / 'state'}", f"SlurmdSpoolDir={self.folder / 'spool'}",
            f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}", f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.folder / 'slurmctld.log'}", f"SlurmdLogFile={self.folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "ReturnToService=2", "MailProg=/bin/true",
            "MinJobAge=3600",  # finished jobs stay visible to scontrol for the test's checks
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self.launch("slurmctld", "-D", "-f", str(self.conf))
        self.launch("slurmd", "-D", "-f", str(self.conf), "-N", host)
        self.wait_for(lambda: self.command("sinfo", "--noheader", "--format=%T", check=False).strip() == "idle",
                      "the node to be idle", timeout=90)

    def launch(self, name, *args):
        log = open(self.folder / f"{name}.out", "w")
        self.daemons.append(subprocess.Popen([shutil.which(name, path=SEARCH_PATH), *args], stdout=log,
                                             stderr=subprocess.STDOUT, env=self.env))

    def wait_for(self, ready, what, timeout=30, interval=0.5):
        deadline = time.time() + timeout
        while not ready():
            dead = [daemon.args[0] for daemon in self.daemons if daemon.poll() is not None]
            if dead or time.time() > deadline:
                raise AssertionError(f"SLURM test cluster: no {what} ({', '.join(dead) or 'timeout'}):\n" + self.logs())
            time.sleep(interval)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
                         for path in sorted(self.folder.glob("*.out")) + sorted(self.folder.glob("*.log")))

    def queue(self) -> list:
        return self.command("squeue", "--noheader", "--format=%i %j %T").splitlines()

    def wait_until_idle(self, timeout=900):
        self.wait_for(lambda: not self.queue(), "end of the queued jobs", timeout=timeout)

    def job(self, job_id) -> dict:
        """scontrol's fields of a job."""
        return dict(item.split("=", 1) for item in self.command("scontrol", "show", "job", "--oneliner",
                                                                str(job_id)).split() if "=" in item)

    def stop(self):
        try:
            if self.daemons and self.daemons[-1].poll() is None:
                self.command("scancel", "--me", check=False)
                self.wait_for(lambda: not self.queue(), "end of the cancelled jobs", timeout=30)
        except AssertionError:
            pass
        finally:
            for daemon in reversed(self.daemons):
                daemon.send_signal(signal.SIGTERM)
            for daemon in reversed(self.daemons):
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=SEARCH_PATH) is None]
    reason = (f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurmctld slurmd slurm-client "
              f"munge)" if missing else None if os.geteuid() == 0 else "the test cluster's daemons run as root")
    if reason:
        if os.environ.get("REQUIRE_SLURM"):
            pytest.fail(f"REQUIRE_SLURM is set, but {reason}")
        pytest.skip(reason)
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def cluster_study_args(out, data_dir, *extra):
    return ["--preset", "demo", "--defenses", "standard-at", "namid", "--seeds", "0", "--epsilons", "--out", str(out),
            "--data-dir", str(data_dir), "--device", "cpu", "--launcher", "slurm", "--cpus-per-stage", "1",
            "--set", "train-limit=200", "val-size=50", "test-limit=50", "standard.epochs=1", "namid.epochs=3",
            "train.eval-steps=3", "train.warmup-epochs=0", "mi.epochs=1", "eval.attacks=pgd", "eval.pgd-steps=3",
            "namid.allow-uninformative-estimators=true", *extra]  # NAMID's job is cancelled after its first epoch


def submit(cluster, args) -> dict:
    """Run reproduce.py --launcher slurm; the jobs it lists, {stage: id}."""
    result = run_reproduce(args, env=cluster.env)
    assert result.returncode == 0, result.stderr[-3000:] + cluster.logs()
    return listed_jobs(result.stdout)


def assert_dependencies(cluster, out, jobs: dict, needs: dict):
    """As the scheduler holds them: each job afterok on the jobs, of this submission, of the stages it needs."""
    for stage, job_id in jobs.items():
        fields = cluster.job(job_id)
        held = {after for group in re.findall(r"afterok:([\d:]+)", fields["Dependency"]) for after in group.split(":")}
        assert held == {jobs[need] for need in needs[stage] if need in jobs}, (stage, fields["Dependency"])
        assert fields["JobName"].endswith(f":{stage}") and fields["StdOut"] == str(log_path(out, stage))
        assert fields["NumNodes"] in ("1", "1-1") and fields["NumTasks"] == "1"
        assert fields.get("KillOInInvalidDependent") == ("Yes" if held else None)


def slurm_log(out, stage) -> str:
    return log_path(out, stage).read_text()


def stage_files(out) -> dict:
    return {path: path.stat().st_mtime_ns for path in (out / "seed0").rglob("*") if path.suffix in (".pt", ".json")}


def assert_table_is_the_evaluations(out):
    results = json.loads((out / "results.json").read_text())
    for defense in ("standard-at", "namid"):
        evaluation = json.loads((out / "seed0" / f"eval-{defense}" / "results.json").read_text())
        assert results["cells"][defense]["pgd"]["mean"] == evaluation["models"][0]["attacks"]["pgd"]["accuracy"]
    assert "| Standard AT |" in (out / "results.md").read_text()


def test_a_tiny_study_runs_as_slurm_jobs_and_a_resubmission_redoes_only_what_is_missing(slurm_cluster, fmnist_dir,
                                                                                     tmp_path):
    cluster, out = slurm_cluster, tmp_path / "tiny"
    args = cluster_study_args(out, fmnist_dir)

    # 1. Every stage a job, held so that the dependencies can be read before any job has run; then NAMID's
    #    job is cancelled after its first epoch: the jobs after it are cancelled by the scheduler.
    first = submit(cluster, [*args, "--slurm-args=--hold"])
    assert list(first) == [*STAGES, "results"]
    submitted = json.loads((out / "config.json").read_text())  # the study, as its submission resolved it
    assert submitted["command"] == shlex.join(["reproduce.py", *args, "--slurm-args=--hold"])
    assert_dependencies(cluster, out, first, NEEDS)
    cluster.command("scontrol", "release", ",".join(first.values()))
    last = out / "seed0" / "namid" / "last.pt"
    cluster.wait_for(last.exists, "NAMID's first epoch", timeout=900, interval=0.05)
    cluster.command("scancel", first["seed0/namid"])
    cluster.wait_until_idle()
    states = {stage: cluster.job(job_id)["JobState"] for stage, job_id in first.items()}
    assert states == {"seed0/standard-at": "COMPLETED", "seed0/only-max": "COMPLETED", "seed0/namid": "CANCELLED",
                      "seed0/eval-standard-at": "COMPLETED", "seed0/eval-namid": "CANCELLED", "results": "CANCELLED"}
    assert not (out / "seed0" / "namid" / MARKER).exists() and not (out / "results.json").exists()

    # 2. The same command: jobs only for what is missing; the interrupted training resumes in its job.
    second = submit(cluster, [*args, "--slurm-args=--hold"])
    assert list(second) == ["seed0/namid", "seed0/eval-namid", "results"]
    assert_dependencies(cluster, out, second, NEEDS)
    cluster.command("scontrol", "release", ",".join(second.values()))
    cluster.wait_until_idle()
    assert {cluster.job(job_id)["JobState"] for job_id in second.values()} == {"COMPLETED"}, cluster.logs()
    assert json.loads((out / "seed0" / "namid" / MARKER).read_text())["resumed"] is True
    assert f"seed0/namid: resuming train_MIAT.py in SLURM job {second['seed0/namid']}" in slurm_log(out, "seed0/namid")
    for jobs in (first, second):  # each stage ran in its own job
        for stage, job_id in jobs.items():
            if stage != "results" and cluster.job(job_id)["JobState"] == "COMPLETED":
                assert re.search(rf"^{re.escape(stage)}: (running|resuming) \S+ in SLURM job {job_id} ",
                                 slurm_log(out, stage), re.MULTILINE), stage
    assert_table_is_the_evaluations(out)
    assert "seed0/namid: complete, skipped" in slurm_log(out, "results")  # the final job ran no stage
    assert json.loads((out / "config.json").read_text()) == submitted  # and left the study's config alone

    # 3. Everything done: only the final job, which rewrites the table and touches no stage.
    before = stage_files(out)
    third = run_reproduce([*args, "--wait"], env=cluster.env)
    assert third.returncode == 0, third.stderr[-3000:] + cluster.logs()
    assert list(listed_jobs(third.stdout)) == ["results"] and "has written the table" in third.stdout
    assert re.search(r"^\s+job \d+\s+results$", third.stdout, re.MULTILINE)  # after no job
    assert stage_files(out) == before

    # 4. One evaluation's completion record deleted: that evaluation alone is redone.
    (out / "seed0" / "eval-namid" / MARKER).unlink()
    fourth = run_reproduce([*args, "--wait"], env=cluster.env)
    assert fourth.returncode == 0, fourth.stderr[-3000:] + cluster.logs()
    assert list(listed_jobs(fourth.stdout)) == ["seed0/eval-namid", "results"]
    changed = {path.relative_to(out).parts[1] for path, mtime in stage_files(out).items() if before.get(path) != mtime}
    assert changed == {"eval-namid"}
    assert_table_is_the_evaluations(out)

    # 5. Submitted again while its jobs are still queued: the same jobs, none twice; with other settings: refused.
    (out / "seed0" / "eval-namid" / MARKER).unlink()
    queued = submit(cluster, [*args, "--slurm-args=--hold"])
    assert submit(cluster, args) == queued and len(cluster.queue()) == 2
    refused = run_reproduce([*args, "--set", "eval.pgd-steps=4"], env=cluster.env)
    assert_one_line_error(refused, f"seed0/eval-namid is already queued as job {queued['seed0/eval-namid']} with "
                                   f"other settings")
    assert len(cluster.queue()) == 2
