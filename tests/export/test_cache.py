"""export/cache.py: a cached export is reused only while it is whole and has every step this version exports."""

import json
import shutil

from infini_deploy.export.cache import export_problem
from infini_deploy.models.manifest import MANIFEST_FILE


def test_an_intact_export_is_usable_and_one_without_its_decode_and_chunk_steps_is_not(tiny_fp32, tmp_path):
    """An export from before attend_previous models had decode and chunk graphs (segment.onnx only) would leave
    the demo's stream with nothing to generate through: it counts as stale and is exported again."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_fp32, copy)
    assert export_problem(copy) is None
    data = json.loads((copy / MANIFEST_FILE).read_text())
    for graph in ("decode", "chunk"):
        del data["graphs"][graph]
        (copy / f"{graph}.onnx").unlink()
        data["files"].pop(f"{graph}.onnx")
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    assert export_problem(copy) == "it has no decode or chunk graph (an older export)"
