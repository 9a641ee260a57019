"""Cost of the batch-first state layout that Triton's onnxruntime/TensorRT backends need (implicit state):
segment.onnx against the copy `infini serve` writes (export/triton_repo.batch_first: a Transpose after each
state input and before each state output), both in onnxruntime on this CPU, same tokens, same threads.

    python docs/measurements/serving/transpose_cost.py EXPORT_DIR [--batch 8] [--threads 1] [--repeat 5]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infini_deploy.models.manifest import load_manifest
from infini_deploy.export.triton_repo import batch_first


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--segments", type=int, default=8)
    args = ap.parse_args()
    manifest = load_manifest(args.export_dir)
    cfg = manifest.config
    L, B, H, d, N = cfg.n_layer, args.batch, cfg.kv_heads, cfg.d_head, cfg.segment_len
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, min(256, cfg.vocab_size), (B, N)).astype(np.int64) for _ in range(args.segments)]
    with tempfile.TemporaryDirectory() as tmp:
        plain = session(args.export_dir / manifest.graphs["segment"].file, args.threads)
        first = session(batch_first(args.export_dir / manifest.graphs["segment"].file, Path(tmp) / "bf.onnx"),
                        args.threads)

        def stream(sess, layout):
            shape_m = (L, B, H, d, d) if layout == "lbf" else (B, L, H, d, d)
            shape_z = (L, B, H, d) if layout == "lbf" else (B, L, H, d)
            m, z = np.zeros(shape_m, np.float32), np.zeros(shape_z, np.float32)
            began = time.perf_counter()
            for t in tokens:
                logits, m, z = sess.run(None, {"tokens": t, "memory": m, "norm": z})
            return time.perf_counter() - began, logits, m

        runs = {"layer_first": [], "batch_first": []}
        for _ in range(args.repeat):
            runs["layer_first"].append(stream(plain, "lbf")[0])
            runs["batch_first"].append(stream(first, "bf")[0])
        _, lg_a, m_a = stream(plain, "lbf")
        _, lg_b, m_b = stream(first, "bf")
    best = {k: min(v) for k, v in runs.items()}
    result = {"export_dir": str(args.export_dir), "batch": B, "threads": args.threads, "segments": args.segments,
              "segment_len": N, "seconds_best": best, "runs": runs,
              "batch_first_over_layer_first": best["batch_first"] / best["layer_first"],
              "logits_equal": bool(np.array_equal(lg_a, lg_b)),
              "memory_equal": bool(np.array_equal(m_a, m_b.transpose(1, 0, 2, 3, 4)))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
