"""Two torchrun "nodes" on this machine: ``--nnodes 2`` with a c10d rendezvous on 127.0.0.1.

Each node is its own ``torch.distributed.run`` agent with one process, so the job has two
ranks that meet only through the rendezvous, as on two machines (one of the agents hosts the
rendezvous store; the other connects to it). The tests compare what such a job writes with a
one-process run.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_nodes(program: list[str], *, timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """Run ``program`` (a script and its arguments, or ``-m module ...``) on two nodes of one
    process each; returns each node's completed process. Gloo on the CPU, one torch thread
    per process (this machine's cores are shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"ssld-test-{port}",
               "--local_addr", "127.0.0.1", "--max_restarts", "0", *program]
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(command, node.returncode, out, err))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    return done
