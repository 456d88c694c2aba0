"""A Ray cluster of several nodes on this machine, started the way a real one is.

A head and worker nodes, each its own ``ray start`` (raylet, object store, workers,
temporary folder) on 127.0.0.1, each with a custom resource named after it (``head``, ``w1``, ``w2`` ...) so that
placement can be asserted. Every node runs in its own pid namespace (``unshare -p``): killing
the namespace's first process ends the node's raylet and every worker on it at once, as a
machine that dies would, and nothing a node started outlives the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.pipelines.http_client import free_port, free_ports

RAY = str(Path(sys.executable).with_name("ray"))


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every node and driver of the cluster: other nodes may join
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``), the same auth mode everywhere."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           # a dead node is declared dead after ~3 s instead of ~30 s
           "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "5",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return {**env, **(extra or {})}


def isolated() -> bool:
    """Whether a node can get its own pid namespace here (root, or user namespaces)."""
    return subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True).returncode == 0


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """The node dies at once: its namespace's first process is killed, and with it every
        process of the node (raylet, object store, workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@dataclass
class LocalCluster:
    root: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)  # the Jobs API (``ray job submit``)
    nodes: dict[str, Node] = field(default_factory=dict)
    # each node's own temporary folder (sessions, logs, sockets), short: socket paths are limited to 107 bytes
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ray-nodes-", dir="/tmp")))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def jobs_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], worker: bool = False) -> Node:
        """A node with resources ``{name: 1}``, and ``{worker: 100}`` on every worker node (so
        that work can be placed on worker nodes, whichever)."""
        log = self.root / f"{name}.log"
        resources = {name: 1, **({"worker": 100} if worker else {})}
        manager, objects, agent, agent_grpc, metrics, runtime_env = free_ports(6)
        cmd = ["unshare", "-p", "-f", "--mount-proc", "--kill-child", RAY, "start", "--block",
               "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--resources={json.dumps(resources)}",
               f"--node-manager-port={manager}", f"--object-manager-port={objects}",
               f"--object-store-memory={256 * 2**20}", f"--temp-dir={self.temp / name}",
               # each node's agent ports its own: on one machine the defaults collide (with each other and with
               # any other Ray here), and an agent whose HTTP port is taken stays up without it, so the Jobs
               # API answers "No available agent" for as long as the node lives
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", *args]
        with open(log, "wb") as out:
            process = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, process, log)
        self.nodes[name] = node
        return node

    def start_head(self, cpus: float) -> None:
        self._start("head", ["--head", f"--port={self.port}", f"--num-cpus={cpus:g}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={free_port()}"])
        self.wait_for(["head"])

    def add_worker(self, name: str, cpus: float) -> None:
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus:g}"], worker=True)
        self.wait_for([*self.alive(), name])

    def alive(self) -> list[str]:
        """Names of the nodes the cluster sees alive (by their custom resource)."""
        return sorted(self.node_names().values())

    def node_names(self) -> dict[str, str]:
        """Ray node id -> name, of the nodes alive."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps({n['NodeID']: sorted(n['Resources']) for n in ray.nodes() if n['Alive']}))"
                % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode:
            return {}
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        return {node_id: name for node_id, resources in nodes.items() for name in resources if name in self.nodes}

    def actor_nodes(self, class_name: str) -> list[str]:
        """Names of the nodes where live actors whose class name contains ``class_name`` run."""
        code = ("import json, ray; from ray._private import state; "
                "ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([a['Address']['NodeID'] for a in state.actors().values() "
                "if %r in a['ActorClassName'] and a['State'] == 'ALIVE']))" % (self.address, class_name))
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode:
            return []
        names = self.node_names()
        return sorted(names.get(n, n) for n in json.loads(out.stdout.strip().splitlines()[-1]))

    def revive(self, cpus: dict[str, float]) -> None:
        """Start again the worker nodes of ``cpus`` (name -> CPUs) that are not alive."""
        alive = self.alive()
        for name, n in cpus.items():
            if name not in alive:
                self.nodes.pop(name, None)
                self.add_worker(name, n)

    def wait_for(self, names: list[str], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.name in names and node.process.poll() is not None:
                    raise RuntimeError(f"node {node.name} exited: {node.log.read_text()[-2000:]}")
            if sorted(names) == self.alive():
                return
            time.sleep(1.0)
        raise TimeoutError(f"nodes {names} not alive after {timeout:.0f} s; alive: {self.alive()}")

    def kill(self, name: str) -> None:
        self.nodes[name].kill()

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


def start_cluster(root: Path, workers: dict[str, float], head_cpus: float = 1,
                  env: dict[str, str] | None = None) -> LocalCluster:
    """A head with ``head_cpus`` CPUs and one worker node per ``workers`` entry (name -> CPUs)."""
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root, cluster_env(env))
    try:
        cluster.start_head(head_cpus)
        for name, cpus in workers.items():
            cluster.add_worker(name, cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


if __name__ == "__main__":  # by hand: start a cluster, print its address, stop on Ctrl-C
    c = start_cluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cluster"), {"w1": 1, "w2": 1})
    print(c.address, c.alive(), flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)
