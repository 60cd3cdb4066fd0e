"""A real multi-node Ray cluster on 127.0.0.1 for tests: `ray start --head` plus worker raylets.

    with MultiNodeCluster() as c:                      # head: --num-cpus=0 (nothing scheduled there)
        reward = c.add_node(num_cpus=2, resources={"reward": 2})
        c.add_node(num_cpus=3, resources={"rollout": 1})
        out = c.run_driver("import ray, json; ray.init(); print(json.dumps(...))")

Each node is its own `ray start --block` with its own --temp-dir and ports, in its own session,
and is stopped by its process group (tests/_private_head.stop_group), never with `ray stop`,
which would kill every Ray process on the machine. Drivers run as subprocesses with
RAY_ADDRESS set: a pytest process that already holds the session's local cluster cannot
ray.init() a second one. Custom resources name node roles as the cluster YAMLs do
(cluster/aws.yaml: {reward: 1}, {rollout: 1}, {learner: 8}).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from _private_head import free_port, ray_start, stop_group, wait_started

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Node:
    temp_dir: str
    num_cpus: float
    resources: dict = field(default_factory=dict)
    node_id: str | None = None  # filled by MultiNodeCluster.add_node
    proc: subprocess.Popen | None = None  # its blocking `ray start` (pgid = pid)


class MultiNodeCluster:
    """Head (no CPUs by default, like the cluster YAMLs) + worker nodes with custom resources."""

    def __init__(self, head_cpus: float = 0, name: str = "rdmn", start_timeout_s: float = 120, dashboard: bool = False):
        # Short temp dirs: Ray's socket paths must stay under 108 bytes.
        self.prefix = f"/tmp/{name}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.head_cpus, self.timeout = head_cpus, start_timeout_s
        self.port = free_port()
        # dashboard=True: the head runs the dashboard and its job server (`ray job submit --address=job_address`).
        self.dashboard_port = free_port() if dashboard else None
        self.nodes: list[Node] = []
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                        RAY_ADDRESS=self.address, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray_start(self, args: list[str], node: Node) -> None:
        env = dict(self.env)
        env.pop("RAY_ADDRESS", None)
        common = [f"--temp-dir={node.temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                  f"--runtime-env-agent-port={free_port()}"]
        os.makedirs(node.temp_dir, exist_ok=True)
        log = os.path.join(node.temp_dir, "ray-start.log")
        node.proc = ray_start([*args, *common], env, log)
        wait_started(node.proc, log, self.timeout)

    @property
    def job_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> "MultiNodeCluster":
        head = Node(f"{self.prefix}-h", self.head_cpus)
        self.nodes.append(head)
        dash = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
                if self.dashboard_port else ["--include-dashboard=false"])
        self._ray_start(["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}", *dash,
                         f"--ray-client-server-port={free_port()}"], head)
        return self

    def add_node(self, num_cpus: float, resources: dict | None = None, num_gpus: int = 0) -> Node:
        """Start a worker raylet joined to the head; returns it with its Ray node id."""
        node = Node(f"{self.prefix}-{len(self.nodes)}", num_cpus, dict(resources or {}))
        self.nodes.append(node)
        args = ["--address", self.address, f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
        if node.resources:
            args.append(f"--resources={json.dumps(node.resources)}")
        self._ray_start(args, node)
        node.node_id = self._wait_node(node)
        return node

    def _wait_node(self, node: Node) -> str:
        """The node id of the alive node whose resources match `node` (each test node has a distinct set)."""
        code = ("import json, ray; ray.init(logging_level='ERROR'); "
                "print(json.dumps([{'id': n['NodeID'], 'res': n['Resources']} for n in ray.nodes() if n['Alive']]))")
        deadline = time.time() + self.timeout
        while True:
            for n in self.run_driver(code):
                res = n["res"]
                if res.get("CPU", 0) == node.num_cpus and all(res.get(k) == v for k, v in node.resources.items()) \
                        and n["id"] not in {m.node_id for m in self.nodes}:
                    return n["id"]
            if time.time() > deadline:
                raise RuntimeError(f"node {node} did not join {self.address}")
            time.sleep(1)

    def run_driver(self, code: str, timeout: float = 300, env: dict | None = None):
        """Run `code` as a driver on this cluster (python -c, cwd = repo); its last stdout line, parsed as JSON."""
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def popen(self, args: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
        """Start a driver process (e.g. python -m raydiff.train ...) in its own session, output to log_path."""
        log = open(log_path, "w")
        return subprocess.Popen(args, cwd=REPO, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def shutdown(self) -> None:
        """Stop every node this object started, by process group; all of them are gone afterwards."""
        procs = [n.proc for n in self.nodes if n.proc is not None]
        self.nodes.clear()
        if procs:
            stop_group(*procs)

    def __enter__(self) -> "MultiNodeCluster":
        try:
            return self.start()
        except BaseException:
            self.shutdown()
            raise

    def __exit__(self, *exc) -> None:
        self.shutdown()
