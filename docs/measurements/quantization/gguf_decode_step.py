# One decode.onnx step at batch 1 (2 threads), the fp32 export against the gguf export of the same SmolLM2 checkpoint (docs/quantization.md, GGUF-exact)
import time, numpy as np, onnxruntime as ort, sys
def feeds(sess):
    f = {}
    for i in sess.get_inputs():
        shape = [1 if d == "batch" else 0 if d == "past_len" else d for d in i.shape]
        f[i.name] = np.full(shape, 5, np.int64) if i.type == "tensor(int64)" else np.zeros(shape, np.float32)
    return f
res = {}
for name, folder in (("fp32", sys.argv[1]), ("gguf", sys.argv[2])):   # the fp32 and gguf export folders
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(folder + "/decode.onnx", so, providers=["CPUExecutionProvider"])
    f = feeds(s)
    for _ in range(5): s.run(None, f)
    best = []
    for r in range(3):
        t0 = time.perf_counter()
        for _ in range(20): s.run(None, f)
        best.append((time.perf_counter() - t0) / 20 * 1e3)
    res[name] = best
    print(name, " ".join(f"{b:.1f}" for b in best), "ms/token", flush=True)
    del s
