"""Launchers: SLURM's environment -> torchrun arguments (mmpt.launch), the sbatch script's preemption and requeue
(run by bash with stand-ins for srun/scontrol/torchrun: there is no SLURM here), DeepSpeed's runner's environment
(mmpt.distributed), accelerate's DeepSpeed plugin checked against the run config (mmpt.train.accelerate_plugin),
and one real 2-process training each through DeepSpeed's runner and
`accelerate launch` (gloo on CPU)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmpt import launch
from mmpt.config import load_config
from mmpt.distributed import adopt_launcher_env
from mmpt.train.accelerate_plugin import accelerate_disagreements, warn_accelerate_disagreements
from mmpt.train.runlog import read_metrics
from tests.conftest import BIN, ROOT, run

LAUNCHERS = ROOT / "launchers"


# ---- SLURM's environment ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, hosts", [
    ("node001", ["node001"]),
    ("node[001-004,010],gpu7", ["node001", "node002", "node003", "node004", "node010", "gpu7"]),
    ("gpu7,node[8-11]", ["gpu7", "node8", "node9", "node10", "node11"]),
    ("rack[1-2]-n[09-10]", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]),
    ("a[1,3],b-[01-02].ib", ["a1", "a3", "b-01.ib", "b-02.ib"]),
])
def test_expand_hostlist(spec, hosts):
    assert launch.expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[1-2", "node1-2]", "node[a-b]", "node[5-3]"])
def test_expand_hostlist_refuses_malformed(spec):
    with pytest.raises(launch.LaunchError):
        launch.expand_hostlist(spec)


@pytest.mark.parametrize("env, n", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0"}, 4),
    ({"SLURM_GPUS_PER_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:h100:2,gpu:a100:2"}, 4),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "GPU-6f2a,GPU-77b1"}, 2),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 1),
    ({"CUDA_VISIBLE_DEVICES": ""}, 1),
    ({}, 1),  # a CPU allocation
    ({"NPROC": "2", "SLURM_GPUS_ON_NODE": "8"}, 2),  # NPROC wins
])
def test_gpus_per_node(env, n):
    assert launch.gpus_per_node(env) == n


def test_slurm_torchrun_args():
    env = {"SLURM_JOB_NODELIST": "node[001-004,010],gpu7", "SLURM_JOB_NUM_NODES": "6", "SLURM_JOB_ID": "123457",
           "SLURM_GPUS_PER_NODE": "h100:8"}
    assert launch.slurm_torchrun_args(env) == [
        "--nnodes=6", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29857", "--rdzv-id=123457"]
    assert launch.slurm_torchrun_args({**env, "RDZV_PORT": "29400"})[3] == "--rdzv-endpoint=node001:29400"
    with pytest.raises(launch.LaunchError, match="names 6 nodes"):
        launch.slurm_torchrun_args({**env, "SLURM_JOB_NUM_NODES": "5"})
    with pytest.raises(launch.LaunchError, match="SLURM_JOB_NODELIST"):
        launch.slurm_torchrun_args({"SLURM_JOB_ID": "1"})


def test_cli_slurm_args_and_hostnames():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("NPROC", "RDZV_PORT")}
    env.update(SLURM_NODELIST="gpu[07-08]", SLURM_NNODES="2", SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="2")
    proc = subprocess.run([sys.executable, "-m", "mmpt.launch", "slurm-args"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
                                   "--rdzv-endpoint=gpu07:29477", "--rdzv-id=77"]
    proc = subprocess.run([sys.executable, "-m", "mmpt.launch", "hostnames", "n[1-3]"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.stdout.split() == ["n1", "n2", "n3"]
    env.pop("SLURM_NODELIST")
    proc = subprocess.run([sys.executable, "-m", "mmpt.launch", "slurm-args"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST is not set" in proc.stderr


def test_signal_workers_runs_without_deepspeed_and_finds_no_stranger():
    """The sbatch trap's command: it must not start DeepSpeed (its import probes accelerators and may build ops)
    and, outside a job, finds no torchrun of ours to signal."""
    code = ("import sys, mmpt.launch; sys.argv = ['x', 'signal-workers', '--job', 'no-such-job']; "
            "rc = mmpt.launch.main(); print('deepspeed' in sys.modules, rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "no torchrun workers found of job no-such-job" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("False")


def test_out_dir_of_a_command_line():
    assert launch.out_dir(["train", "--config", "demo"]) == "runs/demo-train"
    assert launch.out_dir(["train", "--config", "demo", "train.steps=3", "train.out_dir=/scratch/x"]) == "/scratch/x"
    assert launch.out_dir(["eval", "zeroshot", "--model", "runs/demo"]) is None


@pytest.mark.parametrize("cmdline, yes", [
    (["/venv/bin/python3", "/venv/bin/torchrun", "--nnodes=2", "-m", "mmpt.cli"], True),
    (["python", "-u", "-m", "torch.distributed.run", "--nproc-per-node=2"], True),
    (["/opt/bin/torchrun", "--standalone"], True),
    (["srun", "torchrun", "--nnodes=2"], False),  # the step that starts it: signalling srun is not the point
    (["bash", "-c", "exec /venv/bin/torchrun -m mmpt.cli"], False),
    (["/venv/bin/python3", "-u", "-m", "mmpt.cli", "train"], False),  # a worker
])
def test_which_processes_are_torchrun(cmdline, yes):
    assert launch._is_torchrun(cmdline) is yes


# ---- other launchers' environments ------------------------------------------------------------------------

def test_adopt_launcher_env_and_local_rank():
    env = {"LOCAL_SIZE": "4"}  # DeepSpeed's runner
    adopt_launcher_env(env)
    assert env["LOCAL_WORLD_SIZE"] == "4"
    env = {"LOCAL_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}  # torchrun's own value stays
    adopt_launcher_env(env)
    assert env["LOCAL_WORLD_SIZE"] == "2"
    assert launch.strip_local_rank(["--local_rank=1", "train", "--local_rank", "0", "--config", "demo"]) == [
        "train", "--config", "demo"]


def test_accelerate_plugin_checked_against_the_run_config(capsys):
    cfg = load_config("demo")  # deepspeed.zero_stage=2, fp32, accumulate 1, grad_clip 1.0
    base = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no",
            "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_multinode_launcher"}  # launchers/accelerate_deepspeed.yaml
    assert accelerate_disagreements(cfg, base) == []
    agree = {**base, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
             "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none"}
    assert accelerate_disagreements(cfg, agree) == []
    differ = {**base, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
              "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_MIXED_PRECISION": "bf16"}
    found = warn_accelerate_disagreements(cfg, 0, differ)
    assert len(found) == 4
    err = capsys.readouterr().err
    assert err.count("warning") == 1  # one warning naming both sides of each disagreement
    assert "ACCELERATE_DEEPSPEED_ZERO_STAGE=3 vs deepspeed.zero_stage=2" in err
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 vs train.accumulate=1" in err
    assert "ACCELERATE_MIXED_PRECISION=bf16 vs deepspeed.bf16=False" in err
    warn_accelerate_disagreements(cfg, 1, differ)
    assert capsys.readouterr().err == ""  # rank 0 only
    # The run config's own DeepSpeed keys count: deepspeed.extra is merged into the engine's JSON.
    offload = load_config("demo", ["deepspeed.extra={zero_optimization: {offload_optimizer: {device: cpu}}}"])
    same = {**base, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}
    assert accelerate_disagreements(offload, same) == []
    assert accelerate_disagreements(cfg, {**differ, "ACCELERATE_USE_DEEPSPEED": "false"}) == []
    # accelerate's default "no" precision is only a disagreement when its config file chose it.
    bf16 = load_config("demo", ["deepspeed.bf16=true"])
    assert accelerate_disagreements(bf16, base) == []
    chosen = {**base, "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,mixed_precision"}
    assert accelerate_disagreements(bf16, chosen) == ["ACCELERATE_MIXED_PRECISION=no vs deepspeed.bf16=True "
                                                             "(run precision bf16)"]


# ---- the scripts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["torchrun.sh", "torchrun_multinode.sh", "deepspeed.sh", "accelerate.sh",
                                  "slurm.sbatch"])
def test_launcher_scripts_parse_and_show_their_command(name):
    path = LAUNCHERS / name
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(path, os.X_OK)
    header = path.read_text().split("\nset -euo pipefail")[0]
    assert f"launchers/{name} train --config" in header  # its exact command, in the header comment
    if name == "slurm.sbatch":
        directives = [line for line in header.splitlines() if line.startswith("#SBATCH")]
        assert "#SBATCH --signal=B:USR1@180" in directives and "#SBATCH --requeue" in directives
        assert not any("gpus" in line for line in directives)  # GPUs per node come from the submission


STUBS = {
    "srun": """
        #!/usr/bin/env bash
        echo "srun $*" >> "$FAKE_LOG"
        while [[ $# -gt 0 && $1 == -* ]]; do shift; done
        exec "$@"
        """,
    "scontrol": """
        #!/usr/bin/env bash
        echo "scontrol $*" >> "$FAKE_LOG"
        """,
    # torchrun's role: start the worker with subprocess and wait; it does not handle SIGUSR1 (the real one neither)
    "torchrun": f"""
        #!{sys.executable}
        import os, subprocess, sys
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write("torchrun " + " ".join(sys.argv[1:]) + "\\n")
        worker = os.path.join(os.path.dirname(__file__), "worker.py")
        rc = subprocess.Popen([sys.executable, worker, *sys.argv[1:]]).wait()
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write(f"torchrun exit {{rc}}\\n")
        sys.exit(rc)
        """,
    # the training loop's role: SIGUSR1 -> checkpoint (here: nothing) -> RUN/preempted -> exit 0
    "worker.py": """
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        out = [a.split("=", 1)[1] for a in sys.argv if a.startswith("train.out_dir=")][-1]
        open(os.environ["FAKE_READY"], "w").close()
        if os.environ.get("FAKE_MODE") == "finish":
            sys.exit(int(os.environ["FAKE_RC"]))
        for _ in range(600):
            if got:
                os.makedirs(out, exist_ok=True)
                open(os.path.join(out, "preempted"), "w").write("7\\n")
                open(os.environ["FAKE_LOG"], "a").write("worker got SIGUSR1\\n")
                sys.exit(0)
            time.sleep(0.05)
        sys.exit(3)
        """,
}


def _sbatch(tmp_path, args, extra_env, preempt):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(textwrap.dedent(text).lstrip())
        (stubs / name).chmod(0o755)
    log, ready = tmp_path / "log", tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("NPROC", "RUN_DIR")}
    job = str(random.randint(10**6, 10**7))  # the forwarding signals only torchrun processes of this job id
    env.update(PATH=f"{stubs}:{BIN}:{env.get('PATH', '')}", FAKE_LOG=str(log), FAKE_READY=str(ready),
               SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
               **extra_env)
    batch = subprocess.Popen(["bash", str(LAUNCHERS / "slurm.sbatch"), *args], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not ready.exists() and batch.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if preempt:
            time.sleep(0.2)
            batch.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 does
        out, _ = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            batch.kill()
    return batch.returncode, out, log.read_text().splitlines(), job


def test_sbatch_forwards_usr1_to_workers_and_requeues(tmp_path):
    run_dir = tmp_path / "run"
    rc, out, log, job = _sbatch(tmp_path, ["train", "--config", "demo", "train.steps=9"], {"RUN_DIR": str(run_dir)},
                                preempt=True)
    assert rc == 0, out
    torchrun = next(line for line in log if line.startswith("torchrun --"))
    assert torchrun.split() == ["torchrun", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
                                f"--rdzv-endpoint=localhost:{29400 + int(job) % 1000}", f"--rdzv-id={job}",
                                "--max-restarts=3", "-m", "mmpt.cli", "train", "--config", "demo", "train.steps=9",
                                f"train.out_dir={run_dir}"]
    assert "worker got SIGUSR1" in log and "torchrun exit 0" in log, (log, out)  # torchrun itself survived
    assert any(line.startswith("srun --overlap") and "signal-workers" in line for line in log)
    assert log[-1] == f"scontrol requeue {job}", (log, out)
    assert not (run_dir / "preempted").exists()
    assert "requeueing job" in out


def test_sbatch_finished_run_is_not_requeued(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted").write_text("3\n")  # stale, from an earlier attempt
    rc, out, log, _ = _sbatch(tmp_path, ["train", "--config", "demo", f"train.out_dir={run_dir}"],
                              {"FAKE_MODE": "finish", "FAKE_RC": "0", "MAX_RESTARTS": "0"}, preempt=False)
    assert rc == 0, out
    assert "--max-restarts=0" in next(line for line in log if line.startswith("torchrun --"))
    assert not any(line.startswith("scontrol") for line in log) and not (run_dir / "preempted").exists()
    assert f"run dir {run_dir}" in out
    failed = tmp_path / "failed"
    failed.mkdir()
    rc, out, log, _ = _sbatch(failed, ["train", "--config", "demo", f"train.out_dir={run_dir}"],
                              {"FAKE_MODE": "finish", "FAKE_RC": "5"}, preempt=False)
    assert rc == 5 and not any(line.startswith("scontrol") for line in log), out  # the exit status is srun's


# ---- real 2-process runs on CPU (gloo) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """128 real digits as image-text shards (2 shards), written by the demo builder's own sample function."""
    out = tmp_path_factory.mktemp("digits")
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, "data_pipelines")
        import demo_digits as dd
        from sklearn.datasets import load_digits
        from mmpt.data.shards import write_shards
        d = load_digits()
        write_shards(dd.samples(d.images, d.target, list(range(128)), 0), "{out}/train", "digits-train", 64)
        open("{out}/classes.json", "w").write(json.dumps({{"classnames": dd.WORDS, "templates": dd.PROMPTS}}))
    """)
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    return out


def _train(launcher: str, digits: Path, out_dir: Path) -> subprocess.CompletedProcess:
    tiny = ["train.steps=4", "train.log_every=2", "model.width=32", "model.depth=2", "model.heads=2",
            "model.embed_dim=32", "model.modalities=[image, text]", "data.batch_size=8", "eval.every=0",
            f"data.sources=[{{name: digits, shards: {digits}/train, modalities: [image, text]}}]",
            f"data.val={digits}/train", f"data.classes={digits}/classes.json", f"train.out_dir={out_dir}"]
    env = {"NPROC": "2", "MASTER_PORT": str(random.randint(20000, 40000)), "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu"}
    proc = run([str(LAUNCHERS / launcher), "train", "--config", "demo", *tiny], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    text = proc.stdout + proc.stderr
    assert "over 2 of 2 ranks" in text  # the contrastive line: world size 2
    assert "done: 4 steps, 64 samples" in text  # 4 steps x 8 rows x 2 ranks
    assert [m["step"] for m in read_metrics(out_dir) if "loss" in m] == [2, 4]
    return proc


@pytest.mark.slow
def test_deepspeed_runner_trains_on_two_processes(digits, tmp_path):
    proc = _train("deepspeed.sh", digits, tmp_path / "run")
    assert "--no_local_rank" in proc.stdout + proc.stderr and "dist_world_size=2" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_accelerate_launch_trains_on_two_processes(digits, tmp_path):
    proc = _train("accelerate.sh", digits, tmp_path / "run")
    assert "warning: accelerate's DeepSpeed plugin disagrees" not in proc.stdout + proc.stderr
