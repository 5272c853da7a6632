"""The command line that runs a dataflow as users run it, with a recovery directory
(created on first use), alone or as a Bytewax cluster; tests, the demo and the
benchmarks start dataflows through it (:func:`run_command` is the same run as a
``python -m bytewax.run`` command line); :class:`AgentStack` starts the agent
runtime with its tool workers. The container image runs a dataflow with it::

    python -m dataflows.launch event_counts                  # recovery in var/recovery/event_counts
    python -m dataflows.launch event_counts --processes 2    # a cluster of 2 processes on this machine
    python -m dataflows.launch event_counts --process-id 0 --addresses "a:2101;b:2101"   # on host a

Under the launcher every process of a cluster names the first failure of any of them
(:mod:`operators.failures`) and exits 1; ``--processes`` exits with the status of the
first process to fail. docs/deploy.md says where recovery and state directories live.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from importlib import import_module
from pathlib import Path

from patternflow import default_brokers, free_port, wall_ms

__all__ = [
    "LONG_RUNNING",
    "AgentStack",
    "ensure_recovery",
    "exited",
    "main",
    "run_cluster",
    "run_command",
    "run_process",
]

PROG = "python -m dataflows.launch"
_LAUNCH = [sys.executable, "-m", "dataflows.launch"]
CLUSTER_STOP_S = 30.0  # how long the other processes of a cluster get to stop once one has failed

ROOT = Path(__file__).resolve().parent.parent
# The dataflows that run until stopped (dataflows.batch_inference runs one job and exits).
LONG_RUNNING = (
    "event_counts",
    "online_inference",
    "async_jobs",
    "telemetry_anomalies",
    "fraud_detection",
    "rag",
    "agent",
    "agent_tools",
)


def run_command(flow: str, recovery: Path, *, snapshot_s: int = 1, workers: int = 1) -> list[str]:
    """``bytewax.run`` for ``flow`` (e.g. ``"dataflows.event_counts:build()"``), snapshotting every ``snapshot_s``."""
    ensure_recovery(recovery)
    run = [sys.executable, "-m", "bytewax.run", flow, "-r", str(recovery)]
    return [*run, "-s", str(snapshot_s), "-b", "0", "-w", str(workers)]


def exited(process: subprocess.Popen[bytes]) -> str | None:
    """Why a dataflow process is no longer running, or ``None`` while it runs."""
    return None if process.poll() is None else f"it exited with code {process.returncode}; see its output above"


class AgentStack:
    """``dataflows.agent`` and ``dataflows.agent_tools`` on topics ``<prefix>.*``, with their
    recovery, state and journal under ``workdir``; ``settings`` are extra environment variables."""

    def __init__(self, brokers: str, workdir: Path, llm_url: str, prefix: str = "agent", **settings: str) -> None:
        self.workdir = workdir
        base = free_port(block=16)  # each flow's metrics on the port plus the process id, up to 8 processes
        self.metrics_port = base
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": brokers,
            "AGENT_LLM_URL": llm_url,
            "AGENT_LLM_MODEL": "scripted",
            "AGENT_TOPIC_PREFIX": prefix,
            "AGENT_TOOLS_TOPIC_PREFIX": prefix,
            "AGENT_STATE_DIR": str(workdir / "agent-state"),
            "AGENT_TOOLS_JOURNAL_DIR": str(workdir / "tools-journal"),
            "AGENT_METRICS_PORT": str(self.metrics_port),
            "AGENT_TOOLS_METRICS_PORT": str(base + 8),
            **settings,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *flows: str, processes: int = 1, env: dict[str, str] | None = None) -> AgentStack:
        """Start ``flows`` (``"agent"``, ``"agent_tools"``; both by default), each as ``processes``
        processes (a cluster, through the launcher, when more than one), with ``env`` over the
        stack's settings (a principal's client-security profile); logs in ``<workdir>/<flow>.log``."""
        for flow in flows or ("agent", "agent_tools"):
            recovery = self.workdir / f"{flow}-recovery"
            cmd = run_command(f"dataflows.{flow}:build()", recovery)
            if processes > 1:
                cmd = [*_LAUNCH, flow, "--recovery", str(recovery), "--snapshot-s", "1", "--processes", str(processes)]
            with (self.workdir / f"{flow}.log").open("ab") as log:
                self.procs[flow] = subprocess.Popen(
                    cmd, env={**self.env, **(env or {})}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                )
        return self

    def kill(self, *flows: str) -> None:
        """kill -9 ``flows`` (every dataflow of the stack by default)."""
        for flow, proc in self.procs.items():
            if proc.poll() is None and (not flows or flow in flows):
                proc.send_signal(signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def check(self) -> None:
        """Raise if a dataflow of the stack has exited, with the end of its log."""
        for flow, proc in self.procs.items():
            why = exited(proc)
            if why:
                log = (self.workdir / f"{flow}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"dataflows.{flow} is not running: {why}\n{log}")

    def __enter__(self) -> AgentStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_recovery(recovery: Path, *, partitions: int = 1) -> None:
    """Create the recovery store at ``recovery`` unless it exists (``partitions=0``: an empty
    directory, for a process of a cluster whose recovery partitions live on another process's host)."""
    if recovery.exists():
        return
    recovery.mkdir(parents=True)
    if partitions:
        subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), str(partitions)], check=True)


def run_process(
    dataflow: str,
    recovery: Path,
    *,
    snapshot_s: int = 5,
    workers: int = 1,
    process_id: int | None = None,
    addresses: list[str] | None = None,
) -> int:
    """Run ``dataflows.<dataflow>`` in this process (one process of a cluster when ``addresses`` are given)
    and return its exit status: 0 when it ended, 1 when it failed, having logged the first cause."""
    from bytewax._bytewax import cli_main
    from bytewax.recovery import RecoveryConfig

    from operators.failures import Failure, FailureBoard, cluster_key, failures_topic, guard

    ensure_recovery(recovery, partitions=0 if process_id else 1)
    # As bytewax.run's flags would: each process's metrics port, and the recovery its metrics publish.
    os.environ["BYTEWAX_RECOVERY_DIRECTORY"] = str(recovery)
    if process_id is not None:
        os.environ["BYTEWAX_PROCESS_ID"] = str(process_id)
    started_ms = wall_ms()
    flow = import_module(f"dataflows.{dataflow}").build()
    board = None
    if addresses:
        board = FailureBoard(default_brokers(), cluster_key(flow.flow_id, addresses), topic=failures_topic())
    if board is not None:
        board.ensure()
    first: list[Failure] = []
    lock = threading.Lock()

    def failed(step_id: str, exc: BaseException) -> None:
        with lock:
            if first:
                return
            first.append(Failure.of(process_id or 0, step_id, exc))
        print(f"{PROG}: {first[0]}\n{first[0].traceback}", file=sys.stderr, flush=True)
        if board is not None:  # before the exception goes on and the cluster's connections drop
            board.publish(first[0])

    try:
        cli_main(
            guard(flow, failed),
            workers_per_process=workers,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=timedelta(seconds=snapshot_s),
            recovery_config=RecoveryConfig(str(recovery), timedelta(0)),
        )
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # Bytewax's PanicException is a BaseException
        cause = first[0] if first else board.first(started_ms) if board is not None else None
        if cause is None:
            print(
                f"{PROG}: {dataflow} stopped ({type(exc).__name__}: {exc}); no process of the cluster reported "
                "a cause: one was killed, or lost its host or the network",
                file=sys.stderr,
            )
        else:
            peers = "" if first else f"\n{cause.traceback}"  # this process's own was logged when it was raised
            print(f"{PROG}: {dataflow} stopped; the first cause: {cause}{peers}", file=sys.stderr)
        return 1
    return 0


def run_cluster(dataflow: str, recovery: Path, *, processes: int, snapshot_s: int = 5, workers: int = 1) -> int:
    """Run ``dataflows.<dataflow>`` as ``processes`` processes on this machine (sharing its recovery and
    state directories), their output prefixed with ``[<process id>]``; the status of the first to fail,
    or 0 when all ended."""
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    ensure_recovery(recovery)
    flags = ["--recovery", str(recovery), "--snapshot-s", str(snapshot_s), "--workers", str(workers)]
    procs = [
        subprocess.Popen(
            [*_LAUNCH, dataflow, *flags, "--process-id", str(i), "--addresses", addresses],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches them once, forwarded, not also from the terminal
        )
        for i in range(processes)
    ]
    relays = [threading.Thread(target=_relay, args=(proc, f"[{i}] "), daemon=True) for i, proc in enumerate(procs)]
    for relay in relays:
        relay.start()

    def forward(signum: int, _: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    failed: tuple[int, int] | None = None  # (process id, status) of the first to fail
    while any(p.poll() is None for p in procs) and failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        time.sleep(0.1)
    # The others stop once their peer's connections drop; give them time to say why.
    deadline = time.monotonic() + CLUSTER_STOP_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for relay in relays:
        relay.join(timeout=5)
    failed = failed or next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    if failed is None:
        return 0
    print(f"{PROG}: process {failed[0]} of {dataflow} exited first with status {failed[1]}", file=sys.stderr)
    return failed[1] if failed[1] > 0 else 1


def _die_with_parent() -> None:
    """A process of a cluster gets SIGKILL when its launcher dies, even by kill -9 (Linux), rather
    than running on, orphaned, beside the next launcher's processes."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _relay(proc: subprocess.Popen[bytes], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.buffer.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a dataflow with recovery, alone or as a cluster; settings from the environment.",
    )
    parser.add_argument("dataflow", choices=LONG_RUNNING)
    parser.add_argument("--recovery", type=Path, help="the recovery directory (var/recovery/DATAFLOW)")
    parser.add_argument("--snapshot-s", type=int, default=5, help="seconds between snapshots (5)")
    parser.add_argument("--workers", type=int, default=1, help="worker threads per process (1)")
    parser.add_argument("--processes", type=int, default=1, help="processes on this machine, as one cluster (1)")
    parser.add_argument("--process-id", type=int, help="this process's id in a cluster across hosts (0 to N-1)")
    parser.add_argument("--addresses", help='every process\'s host:port, by process id, ";"-separated, on every host')
    args = parser.parse_args(argv)
    if (args.process_id is None) != (args.addresses is None):
        parser.error("--process-id and --addresses go together")
    if args.addresses is not None and args.processes != 1:
        parser.error("--processes is for one machine; with --addresses, start one launcher per process")
    if args.processes < 1 or args.workers < 1:
        parser.error("--processes and --workers must be at least 1")
    recovery = args.recovery or Path("var/recovery") / args.dataflow
    common = {"snapshot_s": args.snapshot_s, "workers": args.workers}
    if args.processes > 1:
        sys.exit(run_cluster(args.dataflow, recovery, processes=args.processes, **common))
    addresses = args.addresses.split(";") if args.addresses is not None else None
    sys.exit(run_process(args.dataflow, recovery, process_id=args.process_id, addresses=addresses, **common))


if __name__ == "__main__":
    main()
