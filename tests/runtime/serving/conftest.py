"""A real tritonserver on loopback for the serving tests (skipped without nvidia-pytriton); every server a
test starts is stopped by its PID when the test ends."""

import importlib.util

import pytest

from infini_deploy.export.triton_repo import ServeOptions, write_repository
from infini_deploy.runtime.serving.server import TritonServer


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
        for item in items:
            if "server" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs nvidia-pytriton and tritonclient: "
                                                        "pip install 'infini-deploy[serve]'"))


@pytest.fixture
def serve(tmp_path, tmp_path_factory):
    """serve(export_dir, **ServeOptions fields) -> a started TritonServer (stopped after the test)."""
    started = []
    cache = tmp_path_factory.getbasetemp() / "triton-cache"

    def make(export_dir, repo_name="repo", start=True, **options):
        repo = write_repository(export_dir, tmp_path / repo_name, ServeOptions(**options), force=True)
        server = TritonServer(repo, cache, log=tmp_path / f"{repo_name}-server-{len(started)}.log")
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.kill()


@pytest.fixture
def openai_server():
    """openai_server(export_dir, **engine options) -> a started OpenAIServer on 127.0.0.1 (a free port), stopped
    after the test."""
    from infini_deploy.runtime.serving.openai_api import OpenAIServer, engine_from_export

    started = []

    def make(export_dir, **options):
        server = OpenAIServer(engine_from_export(export_dir, "tiny-chat", threads=1, **options), port=0)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
