"""Multi-node training launched for real: two "nodes" on one machine, each its own launcher, together one world.

Every test starts two separate launchers (`align train ... --num-machines 2 --machine-rank 0|1 --main-process-ip
127.0.0.1 --main-process-port P`, or recipes/launch.slurm under stand-ins for `srun`/`scontrol`), each starting ONE
training process. What that proves:

* the launcher arguments: align's multi-node flags reach `accelerate launch`, which hands torchrun the right
  `--nnodes/--node_rank/--nproc_per_node` (`--num-processes` counts the processes of ALL machines), and with
  ZeRO-3 accelerate really uses torchrun (`deepspeed_multinode_launcher: standard`), not DeepSpeed's ssh launcher;
* the rendezvous across two launchers at MASTER_ADDR:MASTER_PORT, and machine_rank handling: each node's line
  "node R of 2: 1 process(es) here, global ranks R-R of 2" comes from its own launcher;
* gradient synchronization across "nodes" (DDP, ZeRO-3): the loss trajectory equals the single-process batch-4 one
  and both ranks end with identical parameters (sync_check.json, as in tests/test_distributed.py);
* the Slurm script's command line: quoting (a recipe path with a space), extra flags passed through, the per-node
  rank from SLURM_PROCID, the config's own rendezvous;
* failure detection: when one node dies mid-training, the survivor exits non-zero within seconds with one clear
  line (align.distributed.exit_on_lost_rank). Not covered: a node lost before the process group is formed (the
  survivor waits in torchrun's rendezvous, 600 s, or in gloo's init, 30 min on CPU where transformers drops
  `ddp_timeout`), too slow for CI.

What only a real cluster can show: network latency and bandwidth, NCCL and InfiniBand/RoCE, GPU topology and
affinity, different hosts' filesystems (here both "nodes" share /tmp, the model and the output dir), clock skew,
firewalls, a node that vanishes without closing its sockets (power loss, partition: detected only when a collective
times out, `ddp_timeout`), and Slurm itself (cgroups, --kill-on-bad-exit, srun's signal handling).

Note on killing a "node": torchrun starts its workers in sessions of their own, so SIGKILL to a launcher's process
group leaves its training process running (it even finishes the run with the other node). A dead machine takes
every process with it: the kill test SIGKILLs node 1's whole process tree.
"""

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_distributed import STEPS, assert_ranks_identical, kill_tree, losses, write_recipe

from align.cli import main as align_main


REPO = Path(__file__).resolve().parents[1]
distributed = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_env() -> dict[str, str]:
    env = {**os.environ, "ALIGN_VERIFY_SYNC": "1", "OMP_NUM_THREADS": "1"}
    for name in ("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "NODE_RANK", "MACHINE_RANK", "SLURM_NODEID"):
        env.pop(name, None)  # the flags below say everything; a CI runner's scheduler variables must not leak in
    return env


def start_node(rank: int, config: str, recipe: Path, port: int, logs: Path) -> subprocess.Popen:
    """One "machine": `align train` as it would be typed on node `rank` of 2, one process on this node."""
    command = [
        *(sys.executable, "-m", "align.cli", "train", "sft", "--config", str(recipe)),
        *("--accelerate-config", config, "--num-processes", "2", "--num-machines", "2"),
        *("--machine-rank", str(rank), "--main-process-ip", "127.0.0.1", "--main-process-port", str(port)),
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=node_env(),
        stdout=(logs / f"node{rank}.out").open("w"),
        stderr=(logs / f"node{rank}.err").open("w"),
        start_new_session=True,
    )


def wait_all(nodes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Every node's exit status (None: still running at the deadline, then killed)."""
    deadline = time.time() + timeout
    try:
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=max(deadline - time.time(), 1))
        return [node.poll() for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node.pid)  # nothing is left behind, whatever happened


def node_logs(logs: Path) -> str:
    return "\n".join(f"--- {path.name}:\n{path.read_text()[-3000:]}" for path in sorted(logs.glob("node*")))


def one_process_per_node(text: str, rank: int) -> bool:
    return f"node {rank} of 2: 1 process(es) here, global ranks {rank}-{rank} of 2" in text


@pytest.fixture(scope="module")
def single_process_losses(tiny_model_dir, tmp_path_factory) -> list[float]:
    """The reference trajectory: one process, batch 4 (= 2 nodes x 1 process x 2)."""
    out = tmp_path_factory.mktemp("single")
    recipe = write_recipe(out / "recipe.yaml", tiny_model_dir, out / "run", {"per_device_train_batch_size": 4})
    assert align_main(["train", "sft", "--config", str(recipe)]) == 0
    return losses(out / "run")


@distributed
@pytest.mark.parametrize("config", ["cpu_ddp", "cpu_multi_node_zero3"])
def test_two_nodes_match_one_process(config, tiny_model_dir, tmp_path, single_process_losses):
    """Two launchers (machine_rank 0 and 1) rendezvous into one world of 2 and train like one process of batch 4."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run", {})
    port = free_port()
    nodes = [start_node(rank, config, recipe, port, tmp_path) for rank in (0, 1)]
    assert wait_all(nodes, timeout=300) == [0, 0], node_logs(tmp_path)
    for rank in (0, 1):
        assert one_process_per_node((tmp_path / f"node{rank}.err").read_text(), rank), node_logs(tmp_path)
    distributed_losses = losses(tmp_path / "run")
    assert len(distributed_losses) == STEPS
    assert distributed_losses == pytest.approx(single_process_losses, rel=1e-6, abs=1e-5)
    assert_ranks_identical(tmp_path / "run")


SRUN = '''#!{python}
"""srun stand-in for one host: runs the command once per "node" (SLURM_NNODES of them) with SLURM_PROCID/
SLURM_NODEID set, waits for all, exits non-zero if any failed; --kill-on-bad-exit=1 kills the others' process
trees when one fails (as Slurm does). Its arguments are logged to srun.args (one JSON list per call)."""
import json, os, subprocess, sys, time
import psutil

args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
kill_on_bad_exit = False
while args and args[0].startswith("-"):
    option = args.pop(0)
    if option in ("-K", "--kill-on-bad-exit") or option.startswith("--kill-on-bad-exit="):
        kill_on_bad_exit = option.partition("=")[2] in ("", "1")
nodes = int(os.environ["SLURM_NNODES"])
tasks = [
    subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_NODEID": str(i), "SLURM_LOCALID": "0"}})
    for i in range(nodes)
]
codes = {{}}
while len(codes) < nodes:
    for i, task in enumerate(tasks):
        if i not in codes and task.poll() is not None:
            codes[i] = task.returncode
            if task.returncode and kill_on_bad_exit:
                for other in tasks:
                    try:
                        root = psutil.Process(other.pid)
                        for process in [root, *root.children(recursive=True)]:
                            process.kill()
                    except psutil.NoSuchProcess:
                        pass
    time.sleep(0.1)
sys.exit(1 if any(codes.values()) else 0)
'''

SCONTROL = """#!/bin/bash
# scontrol stand-in: `scontrol show hostnames LIST` names every "node" 127.0.0.1 (one line per node).
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: unsupported: $*" >&2; exit 1; }
for _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done
"""


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@distributed
def test_slurm_script_command_line(tiny_model_dir, tmp_path, single_process_losses):
    """recipes/launch.slurm itself, with the Slurm variables set by hand and stand-ins for srun/scontrol first on
    PATH: 2 "nodes" x 1 process, DDP on CPU. The recipe path holds a space, and the extra flags after it must reach
    every rank intact: `--use_cpu true` (the recipe says false: without the flag every rank would train alone and
    the world check fails) and `--max_steps 3` (the recipe says 5)."""
    job = tmp_path / "slurm job"
    job.mkdir()
    recipe = write_recipe(job / "recipe.yaml", tiny_model_dir, job / "run", {"use_cpu": False, "max_steps": 5})
    shims = tmp_path / "bin"
    shims.mkdir()
    write_executable(shims / "srun", SRUN.format(python=sys.executable, log=str(tmp_path / "srun.args")))
    write_executable(shims / "scontrol", SCONTROL)
    env = {
        **node_env(),
        "PATH": os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "GPUS_PER_NODE": "1",
        "ACCELERATE_CONFIG": str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "MASTER_PORT": str(free_port()),
    }
    command = ["bash", str(REPO / "recipes" / "launch.slurm"), "sft", str(recipe), "--use_cpu", "true"]
    command += ["--max_steps", str(STEPS)]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, output[-6000:]
    (srun_args,) = map(json.loads, (tmp_path / "srun.args").read_text().splitlines())
    assert srun_args[0] == "--kill-on-bad-exit=1"
    assert one_process_per_node(output, 0) and one_process_per_node(output, 1), output[-6000:]
    distributed_losses = losses(job / "run")
    assert len(distributed_losses) == STEPS
    assert distributed_losses == pytest.approx(single_process_losses, rel=1e-6, abs=1e-5)
    assert_ranks_identical(job / "run")


LOST_CONTACT = "lost contact with another rank"


@distributed
def test_survivor_exits_when_a_node_dies(tiny_model_dir, tmp_path):
    """SIGKILL node 1's whole process tree once training is under way: node 0 must not hang, but exit non-zero
    within seconds, saying in one line what happened and what to do."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run", {"max_steps": 500})
    port = free_port()
    nodes = [start_node(rank, "cpu_ddp", recipe, port, tmp_path) for rank in (0, 1)]
    try:
        deadline = time.time() + 240
        # Two logged steps on rank 0 (`{'loss': ...}` lines): both nodes are in the training loop, exchanging
        # gradients.
        while (tmp_path / "node0.out").read_text().count("'loss'") < 2:
            assert all(node.poll() is None for node in nodes), node_logs(tmp_path)
            assert time.time() < deadline, node_logs(tmp_path)
            time.sleep(0.1)
        survivors = [nodes[0].pid, *(p.pid for p in psutil.Process(nodes[0].pid).children(recursive=True))]
        killed = time.time()
        kill_tree(nodes[1].pid)
        code = nodes[0].wait(timeout=120)
        elapsed = time.time() - killed
    finally:
        for node in nodes:
            kill_tree(node.pid)
    stderr = (tmp_path / "node0.err").read_text()
    assert code != 0, node_logs(tmp_path)
    assert stderr.count(LOST_CONTACT) == 1, node_logs(tmp_path)
    (line,) = (line for line in stderr.splitlines() if LOST_CONTACT in line)
    assert line.startswith("align train: rank 0 of 2 lost contact with another rank (")
    assert "rerun the same command on every node" in line
    assert "GLHF" not in stderr  # gloo's traceback is replaced by the line
    assert (tmp_path / "node0.out").read_text().count("'loss'") < 500
    # the survivor's worker and torchrun agent are gone too, not left waiting on the dead peer
    assert not [pid for pid in survivors if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    print(f"node 0 exited with status {code} {elapsed:.1f} s after node 1 was killed: {line}")


def test_num_processes_must_count_all_machines():
    """`--num-processes` is accelerate's count over ALL machines; one that the machines do not divide would start
    num_processes // num_machines per machine (0 with fewer processes than machines): refused, in one line."""
    from align.errors import InputError
    from align.training import launch_command

    with pytest.raises(InputError, match="counts the processes of ALL machines"):
        launch_command("sft", ["--config", "r.yaml"], "cpu_ddp", num_processes=1, num_machines=2)
    command, env = launch_command("sft", ["--config", "r.yaml"], "cpu_ddp", num_processes=4, num_machines=2)
    assert command[command.index("--num_processes") + 1] == "4" and env["ALIGN_EXPECTED_PROCESSES"] == "4"


def test_lost_rank_errors_are_recognized(monkeypatch):
    from align.distributed import is_lost_rank_error, lost_rank_message

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:44171: "
        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not is_lost_rank_error(gloo)  # a single process has no peer to lose
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert is_lost_rank_error(gloo)
    assert not is_lost_rank_error(RuntimeError("CUDA out of memory"))
    assert not is_lost_rank_error(ValueError("Connection reset by peer"))
    assert lost_rank_message(gloo).startswith(
        "align train: rank 1 of 2 lost contact with another rank (Read error [127.0.0.1]:44171: Connection reset by "
        "peer): a node died"
    )
