"""reproduce.py --launcher slurm: every stage of the study as its own SLURM batch job, submitted with sbatch
after the jobs of the stages it reads, then a final job that writes the table; reproduce.py returns at once.

Every job runs reproduce.py itself, with the study's own arguments:
    reproduce.py <study arguments> --launcher local --only-stage seed0/namid    that stage, through
        pipeline.run_stage_here: skipped when done, resumed from last.pt when interrupted
    reproduce.py <study arguments> --launcher local --only-stage results        the table, from the finished stages
so a stage is skipped and resumed exactly as in a local run, and submitting the same command again after a
failure redoes only what is missing. Jobs of an earlier submission of the same study that are still queued
or running are found with squeue (by the tag in their --comment) and depended on instead of submitted twice.
"""
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.pipeline import ROOT, Launch, run_stage_here, task_state

RESULTS = "results"   # --only-stage's name for the final job: the table, from the finished stages
TAG = "reproduce.py"  # every job's --comment: "reproduce.py <stage> <digest of its command> <study folder>"
# reproduce.py's flags that say how to run the study, not what it is (True: takes a value); a job runs without them
CLUSTER_FLAGS = {"--launcher": True, "--slurm-args": True, "--cpus-per-stage": True, "--wait": False,
                 "--only-stage": True, "--dry-run": False}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}
POLL_SECONDS = 5


@dataclass(frozen=True)
class Resources:
    """What a stage job asks for besides one task on one node: GPUs when the study runs on CUDA,
    --cpus-per-task when given (else the cluster's default), and the site's own sbatch flags."""
    gpus: int = 0
    cpus: int = None
    site: tuple = ()

    def options(self, stage: bool = True) -> list:
        """sbatch options; the final job, which only writes the table, asks for no GPU and no extra cores."""
        options = ["--nodes=1", "--ntasks=1"]
        if stage and self.cpus:
            options.append(f"--cpus-per-task={self.cpus}")
        if stage and self.gpus:
            options.append(f"--gres=gpu:{self.gpus}")
        return options + list(self.site)  # last, so that the site's --gres=gpu:a100:1 or --time wins


@dataclass
class Job:
    stage: str                 # a task's name, or RESULTS
    digest: str                # of the command it runs: equal digests, same job
    command: list
    log: Path
    after_ok: list = field(default_factory=list)   # the Jobs it needs to succeed (ids known once submitted)
    after_any: list = field(default_factory=list)  # ids of jobs it only waits for
    id: str = None
    reused: bool = False       # queued by an earlier submission of the same study


def study_arguments(argv: list) -> list:
    """reproduce.py's arguments without the cluster flags: the study itself, which every job runs alike."""
    kept, tokens = [], iter(argv)
    for token in tokens:
        flag = token.split("=", 1)[0]
        if flag not in CLUSTER_FLAGS:
            kept.append(token)
        elif CLUSTER_FLAGS[flag] and "=" not in token:
            next(tokens, None)
    return kept


def cluster_resources(args) -> Resources:
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--launcher slurm: say where the stages run, --device cuda (each stage job asks for "
                        f"--gpus-per-stage GPUs) or --device cpu, not --device {args.device}")
    if args.devices is not None:
        raise UserError("--devices picks GPUs of this machine; on SLURM each job gets its own from the scheduler "
                        "(leave --devices out)")
    if args.only_stage is not None:
        raise UserError("--only-stage runs one stage here, now; it does not go with --launcher slurm")
    try:
        site = shlex.split(args.slurm_args)
    except ValueError as error:
        raise UserError(f"--slurm-args {args.slurm_args!r}: {error}") from None
    return Resources(args.gpus_per_stage if args.device == "cuda" else 0, args.cpus_per_stage, tuple(site))


def command_digest(*parts) -> str:
    """Identifies what a job runs: its command line, read in the folder it runs in."""
    return hashlib.sha256(json.dumps([os.getcwd(), *parts]).encode()).hexdigest()[:16]


def job_command(argv: list, stage: str) -> list:
    # --launcher local last: it wins over an abbreviated --launch slurm left in the study's arguments
    return [sys.executable, str(ROOT / "reproduce.py"), *argv, "--launcher", "local", "--only-stage", stage]


def log_path(folder: Path, stage: str) -> Path:
    return folder / "logs" / (stage.replace("/", "_") + ".slurm.log")


def slurm_output(command: list) -> str:
    """A SLURM command's output; its complaint, in one line, when it fails."""
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise UserError(f"{command[0]}: {error.strerror}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        complaint = lines[-1] if lines else f"exit status {result.returncode}"
        raise UserError(f"{command[0]}: {complaint.removeprefix(f'{command[0]}: ').removeprefix('error: ')}")
    return result.stdout


def require_commands(*names):
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise UserError(f"--launcher slurm: {missing[0]} is not on PATH; submit from a login node of the cluster, "
                        f"where SLURM's commands ({', '.join(names)}) are installed")


def queued_jobs(folder: Path) -> dict:
    """This user's jobs of the study in `folder` that are still queued or running: {stage: [(job id, digest)]}."""
    jobs = {}
    for line in slurm_output(["squeue", "--me", "--noheader", "--format=%i|%T|%k"]).splitlines():
        job_id, state, comment = (line.split("|", 2) + ["", ""])[:3]
        words = comment.strip().split(" ", 3)
        # a completing job has ended: depending on it would hang on its outcome, which its stage's files tell
        if state != "COMPLETING" and len(words) == 4 and words[0] == TAG and words[3] == str(folder):
            jobs.setdefault(words[1], []).append((job_id.strip(), words[2]))
    return jobs


def reuse_or_refuse(job: Job, queued: list):
    """Depend on the earlier submission's job for the same stage; refuse when it runs another command, which
    would write into the same folder."""
    other = [job_id for job_id, digest in queued if digest != job.digest]
    if other:
        raise UserError(f"{job.stage} is already queued as job {other[0]} with other settings; wait for it to end "
                        f"or scancel {other[0]}, then submit again")
    if queued:
        job.id, job.reused = queued[0][0], True


def plan_jobs(tasks: list, folder: Path, argv: list, per_stage: int, queued: dict) -> list:
    """The jobs to have: one per stage that is not done (or whose inputs are being redone: it decides when it
    runs), each after its dependencies' jobs, then the final one after all of them."""
    by_name, jobs = {}, []
    for task in tasks:
        if task_state(task) == "done" and not any(dep in by_name for dep in task.deps):
            continue
        job = Job(task.name, command_digest(task.script, task.argv, per_stage), job_command(argv, task.name),
                  log_path(folder, task.name), after_ok=[by_name[dep] for dep in task.deps if dep in by_name])
        reuse_or_refuse(job, queued.get(task.name, []))
        by_name[task.name] = job
        jobs.append(job)
    final = Job(RESULTS, command_digest(argv), job_command(argv, RESULTS), log_path(folder, RESULTS), after_ok=jobs)
    earlier = queued.get(RESULTS, [])
    if earlier and all(job.reused for job in jobs) and all(digest == final.digest for _, digest in earlier):
        final.id, final.reused = earlier[0][0], True
    else:  # an earlier submission's final job still to run goes first, so that the last table written is this one's
        final.after_any = [job_id for job_id, _ in earlier]
    return jobs + [final]


def sbatch_command(job: Job, folder: Path, resources: Resources) -> list:
    options = [f"--job-name={folder.name}:{job.stage}", f"--comment={TAG} {job.stage} {job.digest} {folder}",
               f"--output={job.log}", "--open-mode=append", f"--chdir={os.getcwd()}",
               *resources.options(stage=job.stage != RESULTS)]
    dependency = [f"afterok:{':'.join(dep.id for dep in job.after_ok)}"] if job.after_ok else []
    dependency += [f"afterany:{':'.join(job.after_any)}"] if job.after_any else []
    if dependency:  # a failed dependency cancels the job, instead of leaving it pending for ever
        options += [f"--dependency={','.join(dependency)}", "--kill-on-invalid-dep=yes"]
    return ["sbatch", "--parsable", *options, f"--wrap={shlex.join(job.command)}"]


def submit(job: Job, folder: Path, resources: Resources, submitted: list) -> str:
    try:
        output = slurm_output(sbatch_command(job, folder, resources))
    except UserError as error:
        kept = f"; submitted before it: job {' '.join(submitted)} (submitting again reuses them)" if submitted else ""
        raise UserError(f"sbatch refused {job.stage}: {str(error).removeprefix('sbatch: ')}{kept}") from None
    job_id = output.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch answered {output.strip()!r} for {job.stage}, not a job id")
    return job_id


def describe_jobs(jobs: list, folder: Path, skipped: int) -> str:
    width = max(len(job.stage) for job in jobs)
    lines = [f"submitted the study in {folder} to SLURM ({skipped} stage(s) done already, no job):"]
    for job in jobs:
        after = [dep.id for dep in job.after_ok] + job.after_any
        lines.append(f"  job {job.id}  {job.stage:<{width}}" + (f"  after {' '.join(after)}" if after else "")
                     + ("  (queued by an earlier submission)" if job.reused else ""))
    final = jobs[-1]
    lines += [f"follow them: squeue --jobs={','.join(job.id for job in jobs)}",
              f"logs: {folder}/logs/<stage>.slurm.log (the job), <stage>.log (the stage script)",
              f"the table: {folder}/results.md once job {final.id} has ended; after a failure, submit the same "
              f"command again: finished stages are skipped, an interrupted training resumes"]
    return "\n".join(lines)


def job_state(job_id: str):
    """(state, reason) of a job the controller still remembers, else None."""
    try:
        output = slurm_output(["scontrol", "show", "job", "--oneliner", job_id])
    except UserError:
        return None
    fields = dict(item.split("=", 1) for item in output.split() if "=" in item)
    return fields.get("JobState"), fields.get("Reason")


def wait_for_results(jobs: list, folder: Path, submitted_at: float) -> int:
    final = jobs[-1]
    try:
        while (state := job_state(final.id)) is not None and state[0] not in ENDED:
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print("reproduce.py: stopped waiting; the jobs go on (squeue --me)", file=sys.stderr)
        sys.exit(130)
    if state is None:  # the controller has forgotten the job: the table tells
        results = folder / "results.json"
        finished = results.is_file() and results.stat().st_mtime >= submitted_at
    else:
        finished = state[0] == "COMPLETED"
    if finished:
        print(f"job {final.id} has written the table: {folder}/results.md")
        return 0
    for job in jobs[:-1]:
        stage_state = job_state(job.id)
        if stage_state and stage_state[0] != "COMPLETED" and stage_state[1] != "DependencyNeverSatisfied":
            raise UserError(f"{job.stage} (job {job.id}) ended {stage_state[0]}; its log: {job.log}. Submit the same "
                            f"command again to redo what is missing")
    ended = f"ended {state[0]}" if state else "ended without writing the table"
    raise UserError(f"the final job {final.id} {ended}; its log: {final.log}")


def submit_study(tasks: list, out: Path, argv: list, args) -> int:
    """--launcher slurm: submit the jobs the study still needs, print them, and return (or wait: --wait)."""
    resources = cluster_resources(args)
    folder, argv = out.resolve(), study_arguments(argv)
    if args.dry_run:
        for job in plan_jobs(tasks, folder, argv, args.gpus_per_stage, queued={}):
            job.id = f"<{job.stage}>"
            print(shlex.join(sbatch_command(job, folder, resources)))
        return 0
    require_commands("sbatch", "squeue", "scontrol")
    jobs = plan_jobs(tasks, folder, argv, args.gpus_per_stage, queued_jobs(folder))
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    submitted_at, submitted = time.time(), []
    for job in jobs:
        if not job.reused:
            job.id = submit(job, folder, resources, submitted)
            submitted.append(job.id)
    print(describe_jobs(jobs, folder, skipped=len(tasks) - len(jobs) + 1))
    return wait_for_results(jobs, folder, submitted_at) if args.wait else 0


# ----------------------------------------------------------------------------------------------
# Inside a job


def find_task(tasks: list, name: str):
    for task in tasks:
        if task.name == name:
            return task
    raise UserError(f"--only-stage {name!r}: no such stage in this study (its stages: "
                    f"{', '.join(task.name for task in tasks)}; or {RESULTS})")


def share_allocated_cores(per_stage: int):
    """A job's stage processes share the cores SLURM gave it (unless OMP_NUM_THREADS says otherwise)."""
    cores = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cores.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, int(cores) // per_stage))


def run_only_stage(tasks: list, name: str, log_dir: Path, per_stage: int) -> int:
    """--only-stage STAGE: that stage, here and now, on the GPUs this process sees (a job's own)."""
    task = find_task(tasks, name)
    by_name = {other.name: other for other in tasks}
    unfinished = [dep for dep in task.deps if task_state(by_name[dep]) != "done"]
    if unfinished:
        raise UserError(f"--only-stage {name}: it reads {', '.join(unfinished)}, which is not finished")
    share_allocated_cores(per_stage)
    job = os.environ.get("SLURM_JOB_ID")
    where = f" in SLURM job {job} on {platform.node()}" if job else ""
    state = task_state(task)
    doing = {"done": "complete, skipped", "resume": f"resuming {task.script}", "fresh": f"running {task.script}"}
    print(f"{name}: {doing[state]}{where}", file=sys.stderr, flush=True)
    seconds = run_stage_here(task, log_dir, Launch(per_stage=per_stage))
    if seconds is not None:
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr)
    return 0


def require_finished_stages(tasks: list):
    """--only-stage results: the final job writes the table only; it never runs a stage in its place."""
    unfinished = [task.name for task in tasks if task_state(task) != "done"]
    if unfinished:
        raise UserError(f"--only-stage {RESULTS}: {', '.join(unfinished)} not finished (a job failed or was "
                        f"cancelled?); submit the same command again to redo what is missing")
