"""runtime/cpu_bench.py: the llama.cpp worker on the shipped GGUF (when the optional extra is installed)."""

import pytest
import torch


@pytest.mark.real
def test_llama_cpp_worker_prefills_the_shipped_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    from safetensors.torch import save_file

    from infini_deploy.runtime.bench import cpu as cb
    from helpers import smollm2_gguf

    save_file({"stream": torch.randint(0, 49152, (1, 600))}, str(tmp_path / "in.safetensors"))
    job = cb.Job("llama", "llama.cpp shipped", str(tmp_path / "in.safetensors"), str(tmp_path / "l"), 1, [600],
                 gguf=str(smollm2_gguf()))
    r = cb.run_job(job, timeout=600)
    assert "error" not in r, r
    (row,) = r["rows"]
    assert row["context"] == 600 and row["tokens_per_s"] > 0
    assert cb.llama_kv_bytes(str(smollm2_gguf()), 600) == 2 * 30 * 3 * 64 * 2 * 600   # K and V, f16


def test_a_measurement_process_reports_its_own_peak_rss_not_its_parents():
    import subprocess
    import sys

    ballast = bytearray(600 << 20)                # a parent far bigger than the child it starts
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from infini_deploy.runtime.bench.measure import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 400 << 20                      # ru_maxrss would report the parent's 600+ MiB here
    del ballast


def test_openvino_paths_are_left_out_with_the_reason_when_openvino_is_missing(monkeypatch):
    import sys

    from infini_deploy.runtime import ov_runner
    from infini_deploy.runtime.bench import cpu as cb

    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(ov_runner, "_CORE", None)
    skipped = cb.unavailable(list(cb.PATHS))
    assert set(skipped) == {n for n in cb.PATHS if n.startswith("openvino-")}
    assert all(why.startswith("openvino is not installed: pip install openvino") for why in skipped.values())
    assert cb.export_precision("openvino-bf16") == "fp32" and cb.export_precision("openvino-int4") == "int4"
