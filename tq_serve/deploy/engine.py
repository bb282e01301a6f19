"""One SGLang engine as a child process of a Ray Serve replica: `python -m tq_serve` on a free loopback port.

The engine is started exactly as a user starts the single server (same CLI, same validation, same SGLang launch),
with the deployment's settings forwarded as flags, plus a per-engine API key: the engine listens on 127.0.0.1 only,
and the key keeps other local users from bypassing the ingress's own --api-key.

Lifetime: the child runs in its own session, so `stop()` can signal its whole process group (SGLang's scheduler and
detokenizer too), and it gets SIGKILL from the kernel when the thread that started it exits (PR_SET_PDEATHSIG). That
thread only waits for the child, so the signal fires exactly when the replica's process dies without running its
`__del__` (Ray force-kills replicas that fail health checks, and `ray.shutdown` kills every worker).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 15.0


def free_loopback_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def _die_with_parent_thread() -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGKILL when the forking thread ends."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_environment() -> dict[str, str]:
    """The replica's environment without TQ_* variables: the flags carry every setting, and a TQ_REPLICAS=2 left in
    the environment would make the engine deploy replicas itself."""
    return {key: value for key, value in os.environ.items() if not key.startswith("TQ_")}


class EngineError(RuntimeError):
    """The engine did not start, or is gone."""


class EngineProcess:
    """`python -m tq_serve <flags> --host 127.0.0.1 --port <free> --api-key <secret>`, started and watched."""

    def __init__(self, flags: list[str]):
        self.port = free_loopback_port()
        self.api_key = secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "tq_serve",
            *flags,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--api-key",
            self.api_key,
        ]
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
                env=_child_environment(),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
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
        """SIGTERM to the engine's process group, SIGKILL after a grace period. Safe to call twice."""
        if self._proc is None or self._proc.poll() is not None:
            self._kill_group(signal.SIGKILL)
            return
        self._kill_group(signal.SIGTERM)
        try:
            self._proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        self._kill_group(signal.SIGKILL)

    def _kill_group(self, sig: signal.Signals) -> None:
        """The group outlives its leader when SGLang's children are slow to follow it; signal it whole."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
