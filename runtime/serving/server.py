"""Starting and stopping the tritonserver that the ``nvidia-pytriton`` wheel ships, on loopback.

What the bare binary needs, done here (DESIGN.md section 7): a backend directory holding the Python
backend with the stub built for the running Python next to it (copied into the user cache, since
site-packages may be read-only), the wheel's bundled libraries on LD_LIBRARY_PATH, this Python's folder
first on PATH (the stub runs the environment it finds there, so it imports this installation of
infini-deploy), free loopback ports for HTTP, gRPC and metrics, and no GPU metrics. ``start`` waits until
the server is ready, or says why it is not, in one line: the served model's own reason when an instance
did not load (tritonserver 2.51 hangs then, so the model writes it to ``FAILED.<pid>`` and the launcher
kills the server), or the end of its log when the server died. ``stop`` drains the served model (each
instance persists its open streams: :meth:`TritonServer.drain`), sends SIGTERM, and SIGKILL after a grace
period. Every server is stopped by its PID.

On Linux the server dies with its launcher: it is started with a parent-death signal (SIGKILL), so a
launcher killed by SIGKILL, the OOM killer or a supervisor's timeout leaves no server behind (its Python
stubs exit when they see their server gone). The kernel sends it when the starting *thread* exits: start a
server from a thread that lives as long as it does (the main thread; from another thread the signal is not
set).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BadInputError, InfiniError, MissingBackendError
from . import protocol as P

INSTALL = "pip install 'infini-deploy[serve]' (nvidia-pytriton, tritonclient)"
PR_SET_PDEATHSIG = 1   # linux/prctl.h


class ServerStartError(InfiniError):
    """The server did not come up: the served model did not load, or tritonserver exited or never got ready."""


def pytriton_folder() -> Path:
    """The installed nvidia-pytriton package folder (found without importing it)."""
    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        raise MissingBackendError(f"tritonserver is not installed: {INSTALL}")
    return Path(list(found.submodule_search_locations)[0])


def backend_dir(cache: Path) -> Path:
    """A backend folder with the Python backend and the stub for this Python (made once per version)."""
    wheel = pytriton_folder() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingBackendError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    folder = cache / f"triton-backends-{version}-{int(stub.stat().st_mtime)}"
    if not (folder / "python" / "triton_python_backend_stub").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(wheel / "backends", tmp)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def instance_count(config: Path) -> int:
    """Instances of a model, from its config.pbtxt (``instance_group [ { kind: ... count: N } ]``)."""
    import re

    counts = [int(n) for n in re.findall(r"\bcount:\s*(\d+)", config.read_text())]
    return sum(counts) or 1


def die_with_parent():
    """A ``preexec_fn`` that makes the child receive SIGKILL when the thread that started it exits (Linux
    prctl PR_SET_PDEATHSIG); None where that is not available, or off the main thread (see module docstring).
    libc is loaded here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:   # the launcher died before the signal was set
            os._exit(1)

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A tritonserver process on 127.0.0.1 over ``repo``; ``with TritonServer(repo) as server:`` stops it."""
    repo: Path
    cache: Path
    log: Path | None = None
    ports: dict = field(default_factory=lambda: {"http": free_port(), "grpc": free_port(), "metrics": free_port()})
    process: subprocess.Popen | None = None
    persisted_at_stop: int | None = None   # open streams the drain persisted (stop); None: not every instance said

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    def command(self) -> list[str]:
        binary = pytriton_folder() / "tritonserver" / "bin" / "tritonserver"
        return [str(binary), "--model-repository", str(Path(self.repo).resolve()),
                "--backend-directory", str(backend_dir(Path(self.cache))),
                "--http-address", "127.0.0.1", "--http-port", str(self.ports["http"]),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.ports["grpc"]),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.ports["metrics"]),
                "--allow-gpu-metrics=false", "--exit-on-error=false", "--strict-readiness=false",
                "--exit-timeout-secs", "10"]   # drained first (stop): what is served after is persisted

    def environment(self) -> dict:
        env = dict(os.environ)
        libs = pytriton_folder().parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if not (Path(self.repo) / "infini_stream" / "config.pbtxt").is_file():
            raise BadInputError(f"{self.repo} is not a model repository of `infini serve` (no infini_stream)")
        folder = Path(self.repo) / P.MODEL_NAME
        for stale in [folder / P.DRAIN_FILE, *folder.glob(f"{P.DRAIN_FILE}.*.done"),
                      *folder.glob(f"{P.FAILED_FILE}.*")]:   # a previous server's
            stale.unlink(missing_ok=True)
        log = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"tritonserver exited with code {self.process.returncode} while "
                                       f"starting{self._log_tail()}")
            failed = self.load_failure()
            if failed:   # tritonserver 2.51 would wait for that instance forever
                self.kill()
                raise ServerStartError(f"the served model did not load: {failed}"
                                       + (f" (server log: {self.log})" if self.log else ""))
            if self.ready("infini_stream"):   # the implicit-state models need backends this wheel lacks
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(f"tritonserver was not ready after {timeout:.0f} s{self._log_tail()}")

    def load_failure(self) -> str | None:
        """Why an instance of the served model did not load (its ``FAILED.<pid>`` line), or None."""
        for path in sorted((Path(self.repo) / P.MODEL_NAME).glob(f"{P.FAILED_FILE}.*")):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                return text.splitlines()[0]
        return None

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, grace: float = 40.0) -> int | None:
        """Drain (every instance persists its open streams), then SIGTERM, then SIGKILL after ``grace`` s.

        Triton counts an open sequence as an in-flight inference: with streams open it waits its exit
        timeout and then kills the models without calling their finalize(), so persisting at shutdown
        cannot wait for SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.persisted_at_stop = self.drain()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            return self.kill()

    def drain(self, timeout: float = 60.0) -> int | None:
        """Touch the served model's drain file and wait until each of its instances acknowledged (it then
        persists every open stream, and each stream after every request until the server stops). Returns
        how many open streams the instances persisted, or None if not every instance acknowledged."""
        folder = Path(self.repo) / P.MODEL_NAME
        (folder / P.DRAIN_FILE).touch()
        wanted = instance_count(folder / "config.pbtxt")
        deadline = time.monotonic() + timeout
        while True:
            done = list(folder.glob(f"{P.DRAIN_FILE}.*.done"))
            if len(done) >= wanted:
                return sum(_count(path) for path in done)
            if time.monotonic() > deadline or self.process.poll() is not None:
                return None
            time.sleep(0.1)

    def kill(self) -> int:
        """SIGKILL, as a crash would: nothing is persisted that was not already."""
        os.killpg(self.process.pid, signal.SIGKILL)   # the server and its Python-backend stubs
        return self.process.wait(30)

    def _log_tail(self) -> str:
        if not self.log or not Path(self.log).is_file():
            return ""
        lines = [x for x in Path(self.log).read_text(errors="replace").splitlines() if x.strip()][-3:]
        return ": " + " | ".join(lines)

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()


def _count(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
