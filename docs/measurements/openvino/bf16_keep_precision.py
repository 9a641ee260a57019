"""OpenVINO's bf16 inference precision on SmolLM2 (segment-local, N = 512): 3 segments of GPL-3 from a zero
state against torch fp32 (top-1 agreement, perplexity, logits cosine per position), with no keep-precision marks
("none"), the memory block's nodes marked ("memory"), every node but the weights' MatMuls and Gathers marked
("all-but-weights"; marks go in through the IR's rt_info, `precise`, which has no Python binding), and OpenVINO's
snippets disabled ("nosnippets"). Its output, printed, is bf16_keep_precision.txt.

    python bf16_keep_precision.py EXPORT_FP32 CHECKPOINT none memory all-but-weights nosnippets
"""
import re, sys, tempfile, time, torch, numpy as np
from pathlib import Path
import openvino as ov
from infini_deploy.runtime.ov_runner import model_from_onnx, core
from infini_deploy.runtime.inputs import iter_tokens
from infini_deploy.runtime.open import model_tokenizer, load_model
E, CKPT = sys.argv[1], sys.argv[2]   # the fp32 export, the checkpoint it came from (its tokenizer)
ids = np.concatenate(list(iter_tokens(Path("/usr/share/common-licenses/GPL-3"), limit=3 * 512 + 1, tokenizer=model_tokenizer(CKPT))))
ids = torch.from_numpy(ids.astype(np.int64)).view(1, -1)
net = load_model(E); cfg = net.config; N = 512; S = 3
with torch.no_grad():
    ref = []
    M = torch.zeros(cfg.n_layer, 1, cfg.kv_heads, cfg.d_head, cfg.d_head); z = torch.zeros(cfg.n_layer, 1, cfg.kv_heads, cfg.d_head)
    for s in range(S):
        lg, M, z = net(ids[:, s*N:(s+1)*N], M, z); ref.append(lg[0])
ref = torch.cat(ref)
tgt = ids[0, 1:S*N+1]
def score(lg):
    nll = torch.nn.functional.cross_entropy(lg, tgt, reduction="mean")
    return f"top1 {(lg.argmax(-1)==ref.argmax(-1)).float().mean():.3f} ppl {nll.exp():.2f} cos_min {torch.nn.functional.cosine_similarity(lg.double(), ref.double(), -1).min():.4f}"
print("torch fp32", score(ref))
def weight_matmul(op):
    if op.get_type_name() not in ("MatMul", "Gather"): return False
    for i in range(op.get_input_size()):
        src = op.input_value(i).get_node()
        while src.get_type_name() in ("Convert", "Transpose", "Reshape"): src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant" and len(src.get_output_shape(0)) >= 2: return True
    return False
def variant(kind):
    m = model_from_onnx(Path(E) / "segment.onnx")
    if kind in ("none", "nosnippets"):
        return m
    names = set()
    for op in m.get_ops():
        n = op.get_friendly_name()
        if kind == "memory" and n.split("/")[0] in ("retrieve", "gate", "update"): names.add(n)
        if kind == "all-but-weights" and not weight_matmul(op) and op.get_type_name() not in ("Constant", "Parameter", "Result"): names.add(n)
    tmp = tempfile.mkdtemp()
    ov.save_model(m, tmp + "/m.xml", compress_to_fp16=False)
    xml = Path(tmp + "/m.xml").read_text()
    def mark(mo):
        return mo.group(0) + '\n\t\t\t<rt_info>\n\t\t\t\t<attribute name="precise" version="0" />\n\t\t\t</rt_info>' if mo.group(1) in names else mo.group(0)
    xml2 = re.sub(r'<layer id="\d+" name="([^"]*)" type="[^"]*" version="[^"]*">', mark, xml)
    Path(tmp + "/m.xml").write_text(xml2)
    print(kind, "marked", len(names))
    return core().read_model(tmp + "/m.xml")
for kind in sys.argv[3:]:
    m = variant(kind)
    extra = {"SNIPPETS_MODE": "DISABLE"} if kind == "nosnippets" else {}
    cm = core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1, **extra})
    r = cm.create_infer_request()
    Mo = np.zeros((cfg.n_layer, 1, cfg.kv_heads, cfg.d_head, cfg.d_head), np.float32); zo = np.zeros((cfg.n_layer, 1, cfg.kv_heads, cfg.d_head), np.float32)
    outs = []; t = time.perf_counter()
    for s in range(S):
        r.infer({"tokens": ids[:, s*N:(s+1)*N].numpy(), "memory": Mo, "norm": zo})
        outs.append(torch.from_numpy(r.get_tensor("logits").data[0].copy())); Mo = r.get_tensor("memory_out").data.copy(); zo = r.get_tensor("norm_out").data.copy()
    dt = (time.perf_counter() - t) / S
    print(kind, score(torch.cat(outs)), f"{N/dt:.0f} tok/s", "M rel", float(np.abs(Mo - M.numpy()).max() / np.abs(M.numpy()).max()))
    cos = torch.nn.functional.cosine_similarity(torch.cat(outs).double(), ref.double(), -1)
    bad = (cos < 0.95).nonzero().flatten().tolist()
    print(kind, "positions with cosine < 0.95:", len(bad), "at", [(b // N, b % N) for b in bad[:20]], "median cos", float(cos.median()))
