"""One SGLang engine as a child process of a Ray Serve replica: `python -m tq_serve` on a free loopback port.

The engine is started exactly as a user starts the single server (same CLI, same validation, same SGLang launch),
with the deployment's settings forwarded as flags, plus a per-engine API key: the engine listens on 127.0.0.1 only,
and the key keeps other local users from bypassing the ingress's own --api-key. The key travels as TQ_API_KEY, in
the environment, which other users cannot read (they can read command lines).

Lifetime: `stop()` terminates the engine and then kills whatever is left of its process tree (SGLang's scheduler
and detokenizer). When the replica dies without calling it (Ray force-kills replicas that fail their health check
or do not stop in time, and `ray.shutdown` kills every worker), two things take the engine down: the kernel sends it
SIGKILL when the thread that started it exits (PR_SET_PDEATHSIG; that thread only waits for the engine, so it exits
with the process), and Ray kills the worker's process group, which the engine and its children stay in. SGLang's
children also die with their parent, but they arm that only after their imports, so a replica killed while its
engine starts needs Ray's sweep.
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 15.0


def free_loopback_port(low: int = 10000, high: int = 21999, attempts: int = 64) -> int:
    """A free port below the kernel's ephemeral range: the engine binds it only minutes later, and a port from
    bind(0) would by then be handed to some other socket (SGLang's own, among others). SGLang keeps its internal
    ports in 22000-29999 for the same reason; this range stays clear of those."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    for port in random.sample(range(low, min(high, ephemeral_low - 1) + 1), attempts):
        try:
            socket.create_server(("127.0.0.1", port)).close()
            return port
        except OSError:
            continue
    raise EngineError(f"no free port in {low}-{high} for an engine")


def _die_with_parent_thread() -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGKILL when the forking thread ends."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_environment(api_key: str) -> dict[str, str]:
    """The replica's environment without TQ_* variables but the key: the flags carry every setting, and a
    TQ_REPLICAS=2 left in the environment would make the engine deploy replicas itself."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("TQ_")}
    return environ | {"TQ_API_KEY": api_key}


class EngineError(RuntimeError):
    """The engine did not start, or is gone."""


class EngineProcess:
    """`TQ_API_KEY=<secret> python -m tq_serve <flags> --host 127.0.0.1 --port <free>`, started and watched."""

    def __init__(self, flags: list[str]):
        self.port = free_loopback_port()
        self.api_key = secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "tq_serve", *flags, "--host", "127.0.0.1", "--port", str(self.port)]
        self._proc: subprocess.Popen | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.port}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise EngineError(f"cannot start {self.command[:3]}: {self._start_error}") from self._start_error

    def _run(self) -> None:
        try:
            # stdout/stderr are inherited: Ray writes them to the replica's log and echoes them to the driver.
            self._proc = subprocess.Popen(
                self.command,
                env=_child_environment(self.api_key),
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent_thread,
            )
        except OSError as err:
            self._start_error = err
            return
        finally:
            self._started.set()
        self._proc.wait()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exit_code(self) -> int | None:
        """None while the engine runs."""
        return self._proc.poll()

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /health until the engine answers 200; raise when it exits first or the time is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exit_code() is not None:
                raise EngineError(f"engine on port {self.port} exited with code {self.exit_code()} while starting")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise EngineError(f"engine on port {self.port} not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM to the engine, SIGKILL to what is left of its process tree after a grace period. Safe to call
        twice; after the engine has exited its children are no longer findable, and Ray's sweep has them."""
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            tree = [psutil.Process(self._proc.pid), *psutil.Process(self._proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        self._proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_S)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
