# The SmolLM2 --precision gguf export segment graph with its MatMulNBits at accuracy level 0 or 4, against torch fp32 on the first 1,024 ids of export/data/validation.txt (docs/quantization.md, GGUF-exact)
import sys, time, numpy as np, onnx, onnxruntime as ort, torch
from infini_deploy.models import load_checkpoint, spec
from infini_deploy.models.checkpoint import resolve_tokenizer
from infini_deploy.export.exporter import validation_text
torch.set_num_threads(2)
out = sys.argv[1]   # the gguf export folder
model = load_checkpoint(out + "/checkpoint").eval()
text = validation_text(resolve_tokenizer(out + "/checkpoint"))[None, :1024]
N = model.config.segment_len
# torch reference
ref = []
with torch.no_grad():
    state = model.start_state(1)
    for seg in text.split(N, 1):
        logits, *state = model.step(seg, *state)
        ref.append((logits[0].numpy(), state[0].numpy()))
base = onnx.load(out + "/segment.onnx")
def variant(rule):
    p = onnx.ModelProto(); p.CopyFrom(base)
    for n in p.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level": a.i = rule(n.name)
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
    state = [x.numpy() for x in model.start_state(1)]
    cos, top, srel = [], [], 0
    t0 = time.time()
    for (rl, rm), seg in zip(ref, text.split(N, 1)):
        logits, *state = s.run(None, {spec.TOKENS: seg.numpy(), spec.MEMORY: state[0], spec.NORM: state[1], spec.PAST: state[2]})
        l = logits[0].astype(np.float64); r = rl.astype(np.float64)
        cos += list((l * r).sum(-1) / np.linalg.norm(l, axis=-1) / np.linalg.norm(r, axis=-1))
        top += list(l.argmax(-1) == r.argmax(-1))
        srel = max(srel, np.abs(state[0] - rm).max() / np.abs(rm).max())
    return f"cos {np.mean(cos):.4f} top1 {np.mean(top):.3f} state {srel:.3f} ({time.time() - t0:.1f}s)"
for name, rule in [("all acc4", lambda n: 4), ("all acc0", lambda n: 0), ("down acc0", lambda n: 0 if "down_proj" in n else 4),
                   ("head acc0", lambda n: 0 if "lm_head" in n else 4), ("q/k/v acc0", lambda n: 0 if any(x in n for x in ("q_proj", "k_proj", "v_proj")) else 4)]:
    print(name, variant(rule), flush=True)
