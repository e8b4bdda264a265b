"""Cluster execution through the profile slurm/config.yaml, on a real single-node SLURM cluster.

The cluster (tests/slurm/: munged, slurmctld, slurmd with a stand-in GPU and memory
enforcement) is installed if needed and started once per session, and stopped by its pid files
at the end whatever happened. Every job's SLURM record comes from SLURM itself: the cluster's
job completion log (JobCompType=jobcomp/filetxt) and, inside the job, $SLURM_JOB_ID.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_workflow

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"
PROFILE = REPO / "slurm"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
# Template keys of YTE (the profile's conditionals), not snakemake options.
YTE_KEYS = {"__use_yte__", "__definitions__"}


def run(cmd, timeout, cwd=REPO, env=None):
    """Run `cmd` in its own process group; kill the whole group if it outlives `timeout` s."""
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def submissions(output):
    """(rule or group, wildcards, SLURM job id) of every job the executor plugin submitted.

    The plugin logs each job to `<slurm-logdir>/rule_<rule>/[<wildcards>/]<jobid>.log`
    (`group_<name>/` for a group job).
    """
    found = []
    for job, log in SUBMITTED.findall(output):
        folder = Path(log).parent
        if folder.name.startswith(("rule_", "group_")):
            name, wildcards = folder.name, ""
        else:
            name, wildcards = folder.parent.name, folder.name
        found.append((name.split("_", 1)[1], wildcards, int(job)))
    return found


def log_of(output, job):
    """The SLURM log file of SLURM job `job`, as the plugin reported it."""
    return Path(dict((int(j), log) for j, log in SUBMITTED.findall(output))[job])


def target_jobs(slurm_log):
    """The snakemake jobs ('rule:wildcards') that one SLURM job ran, from its log's header."""
    found = re.search(r"--target-jobs (.*?) --", Path(slurm_log).read_text())
    assert found, f"no --target-jobs in {slurm_log}"
    return found.group(1).split()


def planned(dry_run_output):
    """Rule -> number of jobs, from the 'Job stats' table of a dry run."""
    table = dry_run_output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


def jobcomp(run_dir):
    """SLURM's own record of every finished job: job id -> {field: value}."""
    path = Path(run_dir) / "jobcomp.log"
    records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines()]
    return {int(r["JobId"]): r for r in records if "JobId" in r}


def scontrol_job(job):
    """`scontrol show job` as {field: value} (the test cluster keeps finished jobs for an hour)."""
    shown = run(["scontrol", "show", "job", "--oneliner", job], timeout=30, env=snakemake_env()).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def snakemake_env(**extra):
    """This environment without site SLURM settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SNAKEMAKE_"))}
    env["PATH"] = f"{SNAKEMAKE.parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def snakemake_slurm(workdir, *args, timeout=300, env=None):
    """`snakemake --profile slurm` with the first status check after 2 s instead of 40."""
    cmd = [SNAKEMAKE, "--cores", "2", "--profile", PROFILE, "--slurm-init-seconds-before-status-checks", "2", *args]
    result = run(cmd, timeout, cwd=workdir, env=env or snakemake_env())
    assert result.returncode == 0, f"snakemake failed:\n{result.stdout[-6000:]}"
    return result.stdout


# --- the profile itself (no cluster needed) ---------------------------------------------------


def load_profile(monkeypatch, **environ):
    """The profile as snakemake reads it (YTE-rendered), under the given environment."""
    from snakemake.profiles import ProfileConfigFileParser

    for key in ("SLURM_PARTITION", "SLURM_ACCOUNT", "SLURM_GPU_PARTITION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    with open(PROFILE / "config.yaml") as stream:
        return ProfileConfigFileParser().parse(stream)


def test_profile_keys_are_snakemake_options():
    keys = set(yaml.safe_load((PROFILE / "config.yaml").read_text())) - YTE_KEYS
    keys = {k for k in keys if not k.startswith("?")}  # YTE conditionals, checked below
    options = set(re.findall(r"--([a-z0-9][a-z0-9-]*)", run([SNAKEMAKE, "--help"], timeout=120).stdout))
    unknown = sorted(keys - options)
    assert not unknown, f"slurm/config.yaml keys that snakemake does not know: {unknown}"
    assert {"executor", "retries", "slurm-logdir", "slurm-status-command"} <= keys


def test_profile_reads_site_settings_from_environment(monkeypatch):
    bare = load_profile(monkeypatch)
    assert bare["executor"] == "slurm"
    assert not any(r.startswith(("slurm_partition=", "slurm_account=")) for r in bare["default-resources"])
    assert "set-resources" not in bare

    site = load_profile(monkeypatch, SLURM_PARTITION="short", SLURM_ACCOUNT="lab42", SLURM_GPU_PARTITION="a100q")
    assert {"slurm_partition=short", "slurm_account=lab42"} <= set(site["default-resources"])
    assert set(site["set-resources"]) == {"features:slurm_partition=a100q", "train:slurm_partition=a100q"}


# --- the test cluster -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster; yields its run folder (config, logs, jobcomp.log)."""
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster needs root (its daemons run as root)")
    if not shutil.which("slurmctld"):
        if not shutil.which("apt-get"):
            pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
        installed = run(["bash", SLURM_SCRIPTS / "install.sh"], timeout=600)
        assert installed.returncode == 0, installed.stdout
    run_dir = tmp_path_factory.mktemp("slurm")
    try:
        started = run(["bash", SLURM_SCRIPTS / "start_cluster.sh", run_dir], timeout=120)
        assert started.returncode == 0, f"start_cluster.sh failed:\n{started.stdout}"
        yield run_dir
    finally:
        stopped = run(["bash", SLURM_SCRIPTS / "stop_cluster.sh", run_dir], timeout=120)
        print(stopped.stdout)


TOY_SNAKEFILE = """
localrules: all

rule all:
    input: "train.txt", "hungry.txt"

rule prep:
    output: "prep.txt"
    resources: mem_mb=300, runtime=5
    shell: "echo $SLURM_JOB_ID > {output}"

# Named like the workflow's GPU rule, so the profile's SLURM_GPU_PARTITION applies to it.
rule train:
    input: "prep.txt"
    output: "train.txt"
    resources: mem_mb=300, runtime=5, gpu=1
    shell: "(echo $SLURM_JOB_ID; env | grep -E '^(SLURM_GPUS_ON_NODE|CUDA_VISIBLE_DEVICES)=') > {output}"

# Holds ~630 MB (plus ~200 MB for snakemake in the job step): over 600 MB, under 1200 MB.
rule hungry:
    output: "hungry.txt"
    resources: mem_mb=lambda wc, attempt: 600 * attempt, runtime=5
    shell: "python -c 'import numpy, time; x = numpy.ones(78643200); time.sleep(3)' && echo $SLURM_JOB_ID > {output}"
"""


@pytest.mark.slurm
def test_toy_workflow_on_slurm(slurm_cluster, tmp_path):
    """Every job is a SLURM job; GPU request; resubmission with more memory; no-op; one target."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    env = snakemake_env(SLURM_GPU_PARTITION="gpu")

    out = snakemake_slurm(tmp_path, env=env)
    jobs = submissions(out)
    record = jobcomp(slurm_cluster)
    by_rule = {}
    for rule, _, job in jobs:
        by_rule.setdefault(rule, []).append(job)
    assert sorted(by_rule) == ["hungry", "prep", "train"], out
    assert all(job in record for _, _, job in jobs), "a submitted job is missing from SLURM's records"
    # The output was written inside the SLURM job that the plugin reported.
    for rule in ("prep", "train", "hungry"):
        job = by_rule[rule][-1]
        assert (tmp_path / f"{rule}.txt").read_text().split()[0] == str(job)
        assert record[job]["JobState"] == "COMPLETED"

    # The GPU rule asked for a GPU, got it, and went to the GPU partition; the others did not.
    train, prep = scontrol_job(by_rule["train"][0]), scontrol_job(by_rule["prep"][0])
    assert train["TresPerJob"] == "gres:gpu:1" and train["Partition"] == "gpu"
    assert "CUDA_VISIBLE_DEVICES=0" in (tmp_path / "train.txt").read_text()
    assert "gpu" not in prep.get("TresPerJob", "") and prep["Partition"] == "debug"

    # Killed by SLURM for memory at 600 MB, resubmitted with attempt 2 at 1200 MB.
    first, second = by_rule["hungry"]
    assert (record[first]["JobState"], record[second]["JobState"]) == ("FAILED", "COMPLETED")
    assert "mem=600M" in record[first]["Tres"] and "mem=1200M" in record[second]["Tres"]
    failed_log = tmp_path / "logs" / "slurm" / "rule_hungry" / f"{first}.log"
    assert "exceeded memory limit" in failed_log.read_text()

    # Up to date: nothing is submitted.
    again = snakemake_slurm(tmp_path, env=env)
    assert submissions(again) == [] and "Nothing to be done" in again

    # Rerunning one target submits that target's job only (not its input's, not the others').
    prep_mtime = (tmp_path / "prep.txt").stat().st_mtime
    rerun = snakemake_slurm(tmp_path, "--forcerun", "train.txt", env=env)
    assert [rule for rule, _, _ in submissions(rerun)] == ["train"]
    assert (tmp_path / "prep.txt").stat().st_mtime == prep_mtime


# --- the real workflow on the tiny configuration --------------------------------------------

GPU_RULES = {"features", "train"}
DATA_RULES = {"simulate", "ingest", "select_genes", "tile", "features"}


@pytest.fixture
def workflow_copy(tmp_path):
    """The workflow's files in a fresh folder (its .snakemake/, logs and results stay there),
    with tests/configs/tiny.yaml as its config.yaml.

    The cluster run uses the copy's own config.yaml, as a user's checkout would.
    """
    return copy_workflow(tmp_path / "repo", config="tests/configs/tiny.yaml")


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_workflow_on_slurm(slurm_cluster, workflow_copy):
    """`snakemake --profile slurm` on tests/configs/tiny.yaml: every job is a SLURM job, GPU rules
    get a GPU, a second run submits nothing, forcing one fold resubmits that fold's jobs only."""
    tiny = yaml.safe_load((workflow_copy / "config.yaml").read_text())
    env = snakemake_env()

    dry = run([SNAKEMAKE, "-n", "--cores", "2"], timeout=120, cwd=workflow_copy, env=env)
    assert dry.returncode == 0, dry.stdout[-4000:]
    plan = planned(dry.stdout)

    out = snakemake_slurm(workflow_copy, "--slurm-keep-successful-logs", timeout=1500, env=env)
    jobs, record = submissions(out), jobcomp(slurm_cluster)
    assert jobs and all(job in record for _, _, job in jobs), "a submitted job is missing from SLURM's records"

    # Every planned job ran inside a completed SLURM job; only rules without work ran locally.
    ran = {}
    for _, _, job in jobs:
        if record[job]["JobState"] == "COMPLETED":
            for target in target_jobs(log_of(out, job)):
                rule = target.split(":", 1)[0]
                ran[rule] = ran.get(rule, 0) + 1
    local = set(re.findall(r"^localrule (\w+):", out, re.M))
    assert local <= {"all"}, f"rules run outside SLURM: {local}"
    assert ran == {rule: n for rule, n in plan.items() if rule not in local}

    # The GPU rules asked for a GPU and got one; the others did not.
    for name, _, job in jobs:
        gres = scontrol_job(job).get("TresPerJob", "")
        if name in GPU_RULES:
            assert gres == "gres:gpu:1", f"{name} (SLURM job {job}) has no GPU: {gres!r}"
        else:
            assert "gpu" not in gres, f"{name} (SLURM job {job}) holds a GPU"

    # Up to date: nothing is submitted.
    again = snakemake_slurm(workflow_copy, env=env)
    assert submissions(again) == [] and "Nothing to be done" in again

    # Forcing one fold's training resubmits that fold's jobs only.
    samples = list(tiny["samples"])
    fold, other = f"test-{samples[0]}", f"test-{samples[1]}"
    results = workflow_copy / tiny["results"]
    # targets relative to the workflow folder, as rule outputs are
    weights = [Path(tiny["results"]) / "models" / model / fold / "best.safetensors" for model in tiny["models"]]
    untouched = {p: p.stat().st_mtime for p in (results / "models").glob(f"*/{other}/best.safetensors")}
    assert untouched, f"no trained model for fold {other}"
    rerun = submissions(snakemake_slurm(workflow_copy, "--forcerun", *map(str, weights), env=env))
    assert {(name, wc) for name, wc, _ in rerun if name == "train"} == {
        ("train", f"{m}_{fold}") for m in tiny["models"]
    }
    assert not [j for j in rerun if other in j[1] or j[0] in DATA_RULES], f"jobs outside fold {fold}: {rerun}"
    assert all(p.stat().st_mtime == t for p, t in untouched.items())
