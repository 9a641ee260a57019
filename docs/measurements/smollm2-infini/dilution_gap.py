"""How far is the trainer's simulated dilution from a real stream? Retrieval reads of the same queries against
(a) the real state after L tokens of prose, (b) the state of n tokens from zero scaled by L/n (the trainer's
dilution), (c) the state n tokens add when written on top of (b)'s old memory, scaled by L/n (--dilute-old-memory),
(d) for L <= 40K, the real state after L tokens of other text of the same file (the floor).
    python dilution_gap.py CHECKPOINT TEXT L [n] [OUT.json]      (docs/training.md)"""
import sys, json, torch
from infini_deploy.models.checkpoint import load_checkpoint, checkpoint_tokenizer
from infini_deploy.models import model as model_mod
from infini_deploy.models.memory import retrieve, sigma, autocast_context

ckpt, text, L = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = int(sys.argv[4]) if len(sys.argv) > 4 else 512
torch.set_num_threads(2)
net = load_checkpoint(ckpt).eval()
tok = checkpoint_tokenizer(ckpt)
ids = torch.tensor(tok.encode(open(text).read()), dtype=torch.long)
N = net.config.segment_len
B = 2   # two independent draws

def stream(tokens, state):
    m, z = state
    with torch.no_grad(), autocast_context("bf16", "cpu"):
        for s in range(0, tokens.shape[1], N):
            _, m, z, *_ = net.step(tokens[:, s:s + N], m, z)
    return m, z

rec = []
orig = model_mod.memory_op
def spy(q, k, v, a_dot, memory, norm, beta, delta, eps):
    rec.append(sigma(q.float()))
    return orig(q, k, v, a_dot, memory, norm, beta, delta, eps)

starts = [0, 150_000]
real_tokens = torch.stack([ids[s:s + L] for s in starts])
probe = torch.stack([ids[s + L:s + L + N] for s in starts])
zero = net.initial_state(B)
real = stream(real_tokens, zero)
model_mod.memory_op = spy
with torch.no_grad(), autocast_context("bf16", "cpu"):
    net.step(probe, *real)
model_mod.memory_op = orig
queries = list(rec)   # per layer (B, H, N, d)

other = torch.stack([ids[s + 60_000:s + 60_000 + n] for s in starts])
other2 = torch.stack([ids[s + 90_000:s + 90_000 + n] for s in starts])
m1, z1 = stream(other, zero)
sim1 = (m1 * (L / n), z1 * (L / n))
m2, z2 = stream(other2, sim1)
sim2 = ((m2 - sim1[0]) * (L / n), (z2 - sim1[1]) * (L / n))

def reads(state):
    m, z = state
    return [retrieve(q, m[l], z[l], net.config.eps) for l, q in enumerate(queries)]

ref = reads(real)
out = {"L": L, "n": n}
cases = [("sim_from_zero", sim1), ("sim_on_old_memory", sim2)]
if L <= 40_000:   # the same length of other text, streamed for real: the floor any simulation is held to
    cases.append(("real_other_text", stream(torch.stack([ids[s + 100_000:s + 100_000 + L] for s in starts]), zero)))
for name, st in cases:
    got = reads(st)
    cos = [torch.nn.functional.cosine_similarity(g.flatten(2), r.flatten(2), dim=-1).mean().item() for g, r in zip(got, ref)]
    rel = [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
    zrel = [((st[1][l] - real[1][l]).norm() / real[1][l].norm()).item() for l in range(len(ref))]
    out[name] = {"read_cosine_mean": sum(cos) / len(cos), "read_rel_err_mean": sum(rel) / len(rel),
                 "norm_rel_err_mean": sum(zrel) / len(zrel), "read_cosine_by_layer": [round(c, 3) for c in cos],
                 "read_rel_err_by_layer": [round(r, 3) for r in rel]}
    print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out[name].items()})
json.dump(out, open(sys.argv[5] if len(sys.argv) > 5 else "/dev/null", "w"), indent=1)
