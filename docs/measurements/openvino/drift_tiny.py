"""OpenVINO against torch fp32 on the tiny preset (seed 0, linear rule): every export precision, OpenVINO's f32
and bf16 inference precision, onnxruntime and torch's bf16 autocast beside it; then 1,000 segments of the fp32
export in OpenVINO f32. Writes drift_tiny.json next to this file.

    PYTHONPATH=... python docs/measurements/openvino/drift_tiny.py OUT_DIR   (OUT_DIR: where the exports go)
"""

import json
import sys
from pathlib import Path

from infini_deploy.export.exporter import export_model
from infini_deploy.models import init_model, preset
from infini_deploy.runtime.ort_runner import OrtRunner
from infini_deploy.runtime.ov_runner import OvRunner
from infini_deploy.runtime.quality.compare import drift, worst
from infini_deploy.runtime.torch_runner import TorchRunner

KEYS = ("logits_max", "logits_cosine", "top1_agreement", "memory_max", "norm_max", "state_rel")


def main(out: Path, segments: int = 100, long: int = 1000) -> dict:
    model = init_model(preset("tiny"), seed=0)
    result = {"model": "tiny, seed 0, linear", "segments": segments, "batch": 1, "threads": 1, "rows": {}}
    for precision in ("fp32", "fp16", "bf16", "int8", "int4"):
        folder = out / f"tiny-{precision}"
        if not folder.exists():
            export_model(model, folder, precision, validate=False)
        runners = {f"onnxruntime {precision} export": OrtRunner(folder, threads=1),
                   f"openvino f32, {precision} export": OvRunner(folder, threads=1)}
        if precision == "fp32":
            runners["openvino bf16, fp32 export"] = OvRunner(folder, threads=1, precision="bf16")
            runners["torch bf16 autocast"] = TorchRunner(model, autocast="bf16")
        with TorchRunner(model) as ref:
            for r in runners.values():
                r.activate()
            rows = drift(ref, runners, segments=segments, batch=1)
            for r in runners.values():
                r.deactivate()
        for name, r in rows.items():
            w = worst(r)
            result["rows"][name] = {k: w[k] for k in KEYS}
            print(f"{name:>32}: " + ", ".join(f"{k} {w[k]:.3g}" for k in KEYS))
    with TorchRunner(model) as ref, OvRunner(out / "tiny-fp32", threads=1) as ov:
        rows = drift(ref, {"openvino": ov}, segments=long, batch=1)["openvino"]
    result["long"] = {"segments": long, "worst": {k: worst(rows)[k] for k in KEYS},
                      "last": {k: rows[-1][k] for k in ("memory_rel", "norm_rel", "state_rel", "logits_max")},
                      "first": {k: rows[0][k] for k in ("memory_rel", "norm_rel", "state_rel", "logits_max")}}
    print(f"openvino f32, {long} segments: worst " + ", ".join(f"{k} {v:.3g}" for k, v in result["long"]["worst"].items()))
    return result


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    (Path(__file__).parent / "drift_tiny.json").write_text(json.dumps(result, indent=1) + "\n")
