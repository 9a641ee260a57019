"""`infini serve` and the `--server` clients under faults, as a user meets them: a bad or unreachable address
fails at once in one line, a state directory that cannot be used is refused before any server starts, the
launcher says what was really persisted, and a killed launcher takes its server with it."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import invoke

INFINI = str(Path(sys.executable).parent / "infini")


def test_a_bad_or_unreachable_server_address_fails_at_once_in_one_line(tiny_fp32):
    began = time.monotonic()
    for args, message in [
        (["run", tiny_fp32, "--server", "127.0.0.1:1"], "cannot reach a server at 127.0.0.1:1: Connection refused"),
        (["generate", tiny_fp32, "--server", "127.0.0.1:1", "--prompt", "ab"],
         "cannot reach a server at 127.0.0.1:1: Connection refused"),
        (["run", tiny_fp32, "--server", "nonsense"], "server address 'nonsense': expected HOST:PORT"),
        (["run", tiny_fp32, "--server", "127.0.0.1:99999"], "expected HOST:PORT with a port in 1-65535"),
        (["generate", tiny_fp32, "--server", "127.0.0.1:99999", "--prompt", "ab"], "with a port in 1-65535"),
        (["run", tiny_fp32, "--server", "127.0.0.1:1", "--backend", "torch", "--save-state", "s.st"],
         "--save-state, --backend cannot go with --server"),
        (["generate", tiny_fp32, "--server", "127.0.0.1:1", "--prompt", "ab", "--device", "cpu"],
         "--device cannot go with --server"),
        (["run", tiny_fp32, "--stream-id", "3"], "--stream-id needs --server"),
        (["passkey", tiny_fp32, "--server", "127.0.0.1:1"], "cannot reach a server at 127.0.0.1:1: Connection refused"),
        (["passkey", "tiny", "--server", "127.0.0.1:1"], "with --server, MODEL names the export the server runs"),
        (["passkey", tiny_fp32, "--server", "127.0.0.1:1", "--gate", "closed"], "--gate cannot go with --server"),
        (["passkey", tiny_fp32, "--stream-id", "3"], "--stream-id needs --server"),
    ]:
        res = invoke(*args, "--no-progress")
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
    assert time.monotonic() - began < 60          # each waited 120 s in silence before


def test_a_state_directory_that_cannot_be_used_is_refused_before_serving(tiny_fp32, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    for start in ([], ["--start"]):               # --start: the model failed to load and tritonserver hung
        res = invoke("serve", tiny_fp32, "--repo", tmp_path / "repo", "--state-dir", tmp_path / "a-file/state",
                     *start)
        assert res.exit_code == 2, res.output
        assert f"the state directory {tmp_path / 'a-file/state'} cannot be created: Not a directory" in res.output
        assert not (tmp_path / "repo").exists()
    with _read_only_folder(tmp_path / "ro") as folder:
        if folder is not None:
            res = invoke("serve", tiny_fp32, "--repo", tmp_path / "repo", "--state-dir", folder)
            assert res.exit_code == 2 and f"the state directory {folder} is not writable" in res.output, res.output
            assert not (tmp_path / "repo").exists()


@pytest.mark.server
@pytest.mark.slow
def test_the_launcher_says_what_was_persisted_when_its_server_is_killed(tiny_fp32, tmp_path):
    pytest.importorskip("pytriton")
    from infini_deploy.runtime.serving.remote import RemoteStream

    state = tmp_path / "state"
    proc, url = _launch(tiny_fp32, tmp_path, "--state-dir", state, "--persist", "end")
    try:
        RemoteStream(url, stream_id=9).feed(list(range(100)), "none")
        run = invoke("run", tiny_fp32, "--server", url, "--stream-id", 9, "--no-end", "--no-progress")
        server = _children(proc.pid)
        assert len(server) == 1, server
        os.kill(server[0], signal.SIGKILL)        # the OOM killer, say
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 2, rest
        assert "tritonserver exited on its own (killed by SIGKILL" in rest, rest
        assert "lost what was fed since their last END" in rest and "persisted where" not in rest, rest
        assert run.exit_code == 0 and "no --state-dir" not in run.output, run.output    # the client, before
        assert f"not persisted yet: the server persists it to {state} at END" in run.output, run.output
    finally:
        _stop(proc)


@pytest.mark.server
@pytest.mark.slow
def test_a_killed_launcher_takes_its_server_with_it(tiny_fp32, tmp_path):
    pytest.importorskip("pytriton")
    proc, url = _launch(tiny_fp32, tmp_path)
    server = _children(proc.pid)
    processes = server + [p for pid in server for p in _children(pid)]   # tritonserver and its Python stub
    try:
        assert len(server) == 1 and len(processes) >= 2, processes
        run = invoke("run", tiny_fp32, "--server", url, "--no-end", "--no-progress")
        os.kill(proc.pid, signal.SIGKILL)         # kill -9, a supervisor's timeout
        proc.wait(30)
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in processes if _alive(p)], "the server outlived its launcher"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2)
        assert run.exit_code == 0 and "not persisted: the server has no --state-dir" in run.output, run.output
    finally:
        for pid in processes:                     # the orphans of a failed assertion, by PID
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _launch(export_dir, tmp_path, *args):
    """`infini serve --start` in a process of its own; (the process, its URL) once it serves."""
    proc = subprocess.Popen([INFINI, "serve", str(export_dir), "--repo", str(tmp_path / "repo"), "--threads", "1",
                             "--start", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:                      # "serving on http://127.0.0.1:PORT ..."
        seen.append(line)
        if line.startswith("serving on http://"):
            return proc, line.split("http://")[1].split()[0]
    _stop(proc)
    raise AssertionError("".join(seen))


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


class _read_only_folder:
    """A folder nobody may write: chmod 0o555 for a normal user; for root (whom chmod does not stop) a
    read-only tmpfs, where mount is allowed; None where neither is possible."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def __enter__(self) -> Path | None:
        self.path.mkdir()
        if os.geteuid() != 0:
            self.path.chmod(0o555)
            return self.path
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(self.path)],
                             capture_output=True)
        if res.returncode != 0:
            return None
        self.mounted = True
        return self.path

    def __exit__(self, *exc):
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False)
        else:
            self.path.chmod(0o755)
