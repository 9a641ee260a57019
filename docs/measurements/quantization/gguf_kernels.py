# MatMulNBits against float32 MatMul at SmolLM2-135M shapes, onnxruntime CPU, 1 thread, best of 3 x 20 runs (docs/quantization.md, GGUF-exact)
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto, numpy_helper as nh
rng = np.random.default_rng(0)
def nbits(K, N, bits, zp, acc):
    nb = K // 32
    B = rng.integers(0, 256, (N, nb, 32 * bits // 8), dtype=np.uint8)
    S = (rng.standard_normal(N * nb) * 0.01).astype(np.float32)
    inits = [nh.from_array(B, "B"), nh.from_array(S, "S")]; ins = ["A", "B", "S"]
    if zp: inits.append(nh.from_array(np.zeros((N, (nb + 1) // 2), np.uint8), "Z")); ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=32, accuracy_level=acc)
    return node, inits
def fp32(K, N):
    return helper.make_node("MatMul", ["A", "W"], ["Y"]), [nh.from_array(rng.standard_normal((K, N)).astype(np.float32), "W")]
def t(node, inits, M, K, N, threads=1):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    A = rng.standard_normal((M, K)).astype(np.float32)
    for _ in range(3): s.run(None, {"A": A})
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(20): s.run(None, {"A": A})
        best = min(best, (time.perf_counter() - t0) / 20)
    return best * 1e3
for K, N in ((576, 1536), (576, 49152)):
    for M in (1, 128):
        r = {"fp32": t(*fp32(K, N), M, K, N)}
        r["q4 acc0"] = t(*nbits(K, N, 4, True, 0), M, K, N); r["q4 acc4"] = t(*nbits(K, N, 4, True, 4), M, K, N)
        r["q8 acc4"] = t(*nbits(K, N, 8, False, 4), M, K, N)
        if N < 10000: r["q8 acc0"] = t(*nbits(K, N, 8, False, 0), M, K, N)
        print(K, N, "M", M, "  ".join(f"{k} {v:.3f}ms" for k, v in r.items()), flush=True)
