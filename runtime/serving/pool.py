"""The streams a server holds: one batch-1 Stream per stream id over shared runners, persisted to disk.

- **Slots.** At most ``max_streams`` streams are held in memory; a new stream beyond that is refused (the
  others go on). A stream idle for ``idle_s`` seconds is persisted and dropped from memory (Triton drops an
  idle sequence without telling the model: the pool keeps its own clock).
- **Persistence.** With a ``state_dir``, a stream's state is saved in the project's snapshot format
  (atomically) when it ENDs, when it idles out, when the server shuts down, and with ``persist="every"``
  after each request. A START naming a stream that is not in memory resumes it from its snapshot,
  bit-exactly; several servers sharing one state directory can therefore continue each other's streams.
- **Isolation.** A request names its stream by id and can reach only that stream's state; a stream's bad
  input or broken snapshot is that stream's error only.
- **One holder per stream.** With a state directory, a process holding a stream in memory locks one byte of
  ``<state_dir>/streams.lock`` for it (:class:`StreamLocks`): another server sharing the folder (or a
  server's orphan, or another instance) is refused that stream, instead of both continuing it apart.
- **All or nothing.** :meth:`checkpoint` copies a stream before a request that will persist it; when the
  write fails (a full disk) :meth:`restore` puts it back, so the failed request changed nothing.
- **Batching.** :meth:`feed` runs the feeds of many streams together (runtime/feeding.py): one runner call
  per round of full segments, the streams' rows stacked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from pathlib import Path

from ...errors import BadInputError, InfiniError
from ..feeding import feed_streams
from ..stream import Stream

PERSIST = ("end", "every")
LOCK_FILE = "streams.lock"   # in the state directory: one locked byte per stream held in memory


def check_state_dir(folder) -> Path:
    """Create the state directory if needed and prove it writable by writing a probe file into it (a mode
    check is not enough: root passes every chmod). BadInputError naming the folder and the reason."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"the state directory {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"the state directory {folder} cannot be created: {e.strerror or e}") from None
    probe = folder / f".write-test.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"probe")
            os.fsync(f.fileno())
    except OSError as e:
        raise BadInputError(f"the state directory {folder} is not writable: {e.strerror or e}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return folder


class StreamLocks:
    """Which process holds which stream of a state directory: a POSIX record lock on byte ``sid`` of
    ``<state_dir>/streams.lock``, taken when a stream comes into memory and released when it leaves. The
    kernel refuses a byte another process holds, and frees a process's bytes when it dies (even by SIGKILL),
    so nothing stale is left. Record locks are per process: one instance's streams never block each other."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self.supported = True   # False on a filesystem without record locks: streams are then not guarded

    def acquire(self, sid: int) -> None:
        if not self.supported:
            return
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _byte(sid))
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                self.supported = False
                return
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise BadInputError(f"stream {sid} is open in another process ({self.holder(sid)}) serving the state "
                                f"directory {self.folder}: end it there, or stop that server") from None

    def release(self, sid: int) -> None:
        if self.supported:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, _byte(sid))

    def holder(self, sid: int) -> str:
        """"pid N" of the process holding ``sid`` (and its tritonserver's pid), as the kernel reports it."""
        layout = "hhqqi4x"   # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid
        try:
            query = struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, _byte(sid), 1, 0)
            pid = struct.unpack(layout, fcntl.fcntl(self.fd, fcntl.F_GETLK, query))[4]
        except (OSError, struct.error):
            return "pid unknown"
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            parent = int(stat[1])
            if Path(f"/proc/{parent}/comm").read_text().strip() == "tritonserver":
                return f"pid {pid}, a model instance of tritonserver pid {parent}"
        except (OSError, IndexError, ValueError):
            pass
        return f"pid {pid}"


def _byte(sid: int) -> int:
    return sid % (2**63 - 1)   # a lock's offset is a signed 64-bit off_t; ids of 2^63 and more wrap


class StreamPool:
    """Streams by id (int > 0) over one export's segment and decode runners."""

    def __init__(self, runner, decode_runner=None, max_streams: int = 64, state_dir=None, persist: str = "end",
                 idle_s: float | None = None, chunk_runner=None):
        if persist not in PERSIST:
            raise BadInputError(f"persist={persist!r}; expected one of: {', '.join(PERSIST)}")
        if max_streams < 1:
            raise BadInputError(f"max_streams must be at least 1, got {max_streams}")
        self.runner, self.decode_runner, self.chunk_runner = runner, decode_runner, chunk_runner
        self.max_streams, self.persist, self.idle_s = max_streams, persist, idle_s
        self.state_dir = check_state_dir(state_dir) if state_dir else None
        self.locks = StreamLocks(self.state_dir) if self.state_dir is not None else None
        self.streams: dict[int, Stream] = {}
        self.last_used: dict[int, float] = {}
        self.lock = threading.RLock()

    # -- streams by id --------------------------------------------------------------------------
    def open(self, sid: int, start: bool) -> Stream:
        """The stream ``sid``: held in memory; else, on START, resumed from its snapshot or new."""
        if not isinstance(sid, int) or isinstance(sid, bool) or sid <= 0:
            raise BadInputError(f"stream id {sid!r}: expected a positive integer (the sequence's correlation ID)")
        with self.lock:
            if sid in self.streams:
                return self._touch(sid)
            if not start:
                raise BadInputError(f"stream {sid} is not open on this server: send START to open or resume it")
            if len(self.streams) >= self.max_streams:
                raise BadInputError(f"this server holds {self.max_streams} streams (its --max-streams): end one, "
                                    "or use another server")
            if self.locks is not None:
                self.locks.acquire(sid)
            try:
                path = self.path(sid)
                if path is not None and path.is_file():
                    stream = Stream.load(path, self.runner, decode_runner=self.decode_runner,
                                         chunk_runner=self.chunk_runner)
                else:
                    stream = Stream(self.runner, decode_runner=self.decode_runner, chunk_runner=self.chunk_runner)
            except BaseException:
                self._unlock(sid)
                raise
            self.streams[sid] = stream
            return self._touch(sid)

    def reset(self, sid: int) -> None:
        """Forget stream ``sid``: drop it from memory and delete its snapshot."""
        with self.lock:
            if self.streams.pop(sid, None) is not None:
                self._unlock(sid)
            self.last_used.pop(sid, None)
            path = self.path(sid)
            if path is not None:
                path.unlink(missing_ok=True)

    def end(self, sid: int) -> int:
        """Persist (with a state directory) and free stream ``sid``; returns the persisted position or -1."""
        with self.lock:
            persisted = self.save(sid)
            if self.streams.pop(sid, None) is not None:
                self._unlock(sid)
            self.last_used.pop(sid, None)
            return persisted

    def save(self, sid: int) -> int:
        """Write stream ``sid``'s snapshot (when there is a state directory); its position, or -1."""
        stream = self.streams.get(sid)
        if stream is None or self.state_dir is None:
            return -1
        stream.save(self.path(sid), force=True)
        return stream.position

    def after_request(self, sid: int) -> int:
        """Persist after a request when asked to (``persist="every"``); the persisted position or -1."""
        return self.save(sid) if self.persist == "every" else -1

    def checkpoint(self, sid: int, end: bool) -> Stream | None:
        """A copy of stream ``sid`` before a request that will persist it (END, or ``persist="every"``), for
        :meth:`restore` if that write fails; None when the request persists nothing (nothing can fail)."""
        if self.state_dir is None or not (end or self.persist == "every"):
            return None
        return self.streams[sid].fork()

    def restore(self, sid: int, copy: Stream) -> None:
        """Put stream ``sid`` back as :meth:`checkpoint` copied it: the failed request changed nothing."""
        with self.lock:
            self.streams[sid] = copy

    def evict_idle(self, now: float | None = None) -> list[int]:
        """Persist and drop the streams idle for more than ``idle_s``; their ids."""
        if self.idle_s is None:
            return []
        now = time.monotonic() if now is None else now
        with self.lock:
            idle = [sid for sid, t in self.last_used.items() if now - t > self.idle_s]
            for sid in idle:
                self.end(sid)
            return idle

    def drain(self) -> int:
        """The server is about to stop: persist every open stream now, and after each request from now on
        (a request served later is on disk before its reply). Returns how many streams were persisted."""
        with self.lock:
            self.persist, saved = "every", 0
            for sid in list(self.streams):
                try:
                    saved += self.save(sid) >= 0
                except (InfiniError, OSError):   # one stream's failure must not lose the others
                    pass
            return saved

    def watch(self, drain_file: Path, interval: float = 0.25) -> threading.Thread:
        """A daemon thread that evicts idle streams on time (Triton calls the model only when a request comes)
        and drains the pool once ``drain_file`` appears (touched after this call), then acknowledges with
        ``<drain_file>.<pid>.done``: what a launcher waits for before it stops the server (server.py)."""
        import os

        from ...atomic import write_text

        started, drain_file = time.time(), Path(drain_file)

        def run():
            while True:
                time.sleep(interval)
                try:
                    if drain_file.stat().st_mtime >= started:
                        count = self.drain()
                        write_text(drain_file.with_name(f"{drain_file.name}.{os.getpid()}.done"), f"{count}\n",
                                   force=True)
                        return
                except FileNotFoundError:
                    pass
                except (InfiniError, OSError):
                    return
                self.evict_idle()

        thread = threading.Thread(target=run, name="infini-pool-watch", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Shutdown: persist every stream held in memory."""
        with self.lock:
            for sid in list(self.streams):
                try:
                    self.end(sid)
                except (InfiniError, OSError):   # one stream's failure must not lose the others
                    pass

    def path(self, sid: int) -> Path | None:
        return self.state_dir / f"{sid}.safetensors" if self.state_dir is not None else None

    def _unlock(self, sid: int) -> None:
        if self.locks is not None:
            self.locks.release(sid)

    def _touch(self, sid: int) -> Stream:
        self.last_used[sid] = time.monotonic()
        return self.streams[sid]

    # -- work -----------------------------------------------------------------------------------
    def feed(self, items: list[tuple[int, object, str]]) -> list:
        """Feed ``(sid, tokens, keep)`` items of distinct open streams together; per item what ``keep`` asks
        for, or the InfiniError of that stream (it is then unchanged)."""
        with self.lock:
            results: list = [None] * len(items)
            by_keep: dict[str, list[int]] = {}
            for i, (sid, _, keep) in enumerate(items):
                by_keep.setdefault(keep, []).append(i)
            for keep, idx in by_keep.items():
                outs = feed_streams([self.streams[items[i][0]] for i in idx], [items[i][1] for i in idx], keep)
                for i, out in zip(idx, outs):
                    results[i] = out
            return results
