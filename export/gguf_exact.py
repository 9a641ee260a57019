"""GGUF-exact exports (``--precision gguf``): the weight MatMuls of a float32 graph as onnxruntime MatMulNBits
nodes that hold the blocks of the GGUF file the model came from, so the export computes with the numbers the
user brought: no second rounding.

Matching is by value, never by name: a weight W [K, N] (x @ W) takes the GGUF tensor whose dequantisation
(``gguf.quants.dequantize``, the one transformers' reader and so `infini convert` use) equals W's transpose bit
for bit, rows in any order (llama.cpp stores q/k rows permuted; blocks run along K, so a row keeps its
blocks). Each W row is looked up by a hash of its bytes, then the whole match is compared bit for bit. A
weight without a match (changed by training since, say) stays float32 and is listed in the manifest.

llama.cpp's blocks hold 32 inputs with a scale d (and an offset m) in fp16; fp16 -> float32 is exact:

- Q4_0, w = d (q - 8), q in 0..15: MatMulNBits bits 4, no zero points (default 8): (q - 8) d, exact.
- Q8_0, w = d q, q int8: bits 8, stored u = q + 128, no zero points (default 128): (u - 128) d, exact.
- Q4_1, w = d q + m: the op dequantises (q - zp) scale, and no zero point makes that d q + m for every q in
  float32. So d q is MatMulNBits with zero points 0, and m multiplies the block sums of x in a small float32
  MatMul (``_q4_1``). d q is exact in float32 (11 x 4 significant bits), so d q + m rounds once, as in gguf.
  (onnxruntime 1.32's CPU kernel happens to compute float zero points as q scale + (-zp scale), which a chosen
  zp could make exact; that is not the op's definition, and it is the kernel's slow path: 1.5 ms against
  26 us for a 576 x 1536 MatMul at M = 1 on this CPU.)

``GGUF_ACCURACY`` 4, as for int4 (export/quantize.py): the CPU kernel rounds the activations to int8 per block
and uses integer dot products, as llama.cpp does for these formats (its q8_0 / q8_1 dot products). Level 0
(float32 activations) computes with exactly the GGUF's weights (SmolLM2: top-1 100% against torch, where level
4 gives 92%), but a 4-bit node at level 0 is slower than a float32 MatMul, and an 8-bit one dequantises the
whole matrix per call (70x level 4): docs/quantization.md. The tests run the nodes at level 0 to show the
stored numbers are the GGUF's.

The tied LM head reads the embedding through a Transpose: matched to token_embd's blocks it becomes an 8-bit
MatMulNBits too (Q8_0 in llama.cpp's files); the embedding lookup keeps its Gather over the float32 table.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from ..models.manifest import sha256_file

GGUF_FORMATS = ("Q4_0", "Q4_1", "Q8_0")   # llama.cpp block formats MatMulNBits holds exactly
GGUF_BLOCK = 32
GGUF_ACCURACY = 4
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
MS_DOMAIN = "com.microsoft"


@dataclass
class GgufTensor:
    """One Q4_0 / Q4_1 / Q8_0 matrix of a GGUF file, as llama.cpp stores it: rows of blocks along K."""
    name: str
    kind: str                   # one of GGUF_FORMATS
    blocks: np.ndarray          # uint8 [rows, K / 32, bytes of a block] (memory-mapped from the file)
    rows: dict                  # hash of a dequantised row's bytes -> its row indices

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * GGUF_BLOCK

    def dequantized(self, order: np.ndarray | None = None) -> np.ndarray:
        """float32 [rows, K] as gguf.quants.dequantize gives it, rows in ``order``."""
        import gguf

        blocks = self.blocks if order is None else self.blocks[order]
        return gguf.quants.dequantize(blocks.reshape(len(blocks), -1), gguf.GGMLQuantizationType[self.kind])


@dataclass
class GgufWeights:
    """The Q4_0 / Q4_1 / Q8_0 tensors of a GGUF file, indexed by the values of their rows."""
    path: Path
    sha256: str
    tensors: list[GgufTensor]

    def match(self, w_t: np.ndarray) -> tuple[GgufTensor, np.ndarray] | None:
        """(the tensor, its row order) whose dequantisation in that order is ``w_t`` (float32 [N, K]) bit for bit."""
        w_t = np.ascontiguousarray(w_t, dtype=np.float32)
        if w_t.ndim != 2 or w_t.shape[1] % GGUF_BLOCK:
            return None
        keys = None
        for t in self.tensors:
            if t.shape != w_t.shape or hash(w_t[0].tobytes()) not in t.rows:
                continue
            keys = keys or [hash(row.tobytes()) for row in w_t]
            order = _order(keys, t.rows)
            if order is not None and np.array_equal(t.dequantized(order).view(np.uint32), w_t.view(np.uint32)):
                return t, order
        return None


def _order(keys: list[int], rows: dict) -> np.ndarray | None:
    """Row indices with the given hashes, each row used once (equal rows may come in any order)."""
    taken, order = Counter(), []
    for key in keys:
        found = rows.get(key, ())
        if taken[key] >= len(found):
            return None
        order.append(found[taken[key]])
        taken[key] += 1
    return np.asarray(order, dtype=np.int64)


def read_gguf_weights(path) -> GgufWeights:
    """Index the Q4_0 / Q4_1 / Q8_0 tensors of the GGUF file ``path``; BadInputError when it holds none."""
    from ..models.convert.source import check_gguf

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"--gguf {path} is not a file; expected the .gguf file the model was converted from")
    check_gguf(path)   # magic, metadata, every tensor inside the file, a supported architecture
    try:
        import gguf
    except ImportError:   # pragma: no cover (check_gguf needs it first)
        raise MissingBackendError("reading GGUF files needs the gguf package: pip install 'infini-deploy[convert]'")
    reader = gguf.GGUFReader(str(path))
    tensors, others = [], Counter()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in GGUF_FORMATS or len(t.shape) != 2:
            others[kind] += len(t.shape) == 2
            continue
        size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        tensor = GgufTensor(t.name, kind, t.data.reshape(t.data.shape[0], -1, size), {})
        rows = defaultdict(list)
        for i, row in enumerate(tensor.dequantized()):
            rows[hash(row.tobytes())].append(i)
        tensor.rows = dict(rows)
        tensors.append(tensor)
    if not tensors:
        found = ", ".join(k for k, n in others.items() if n) or "none"
        raise BadInputError(f"{path} holds no {', '.join(GGUF_FORMATS)} matrix (its matrices: {found}); "
                            f"--precision gguf keeps only those formats' blocks")
    return GgufWeights(path, sha256_file(path), tensors)


def check_weights_match(weights: GgufWeights, named_weights: dict) -> int:
    """How many of the model's 2-D weights (name -> float32 [out, in]) the GGUF holds; IncompatibleArtifactError
    when none does (the GGUF of another model, or of this one before training changed every matrix)."""
    matched = sum(weights.match(w) is not None for w in named_weights.values() if w.ndim == 2)
    if not matched:
        kinds = Counter(t.kind for t in weights.tensors)
        raise IncompatibleArtifactError(
            f"{weights.path}: none of its {sum(kinds.values())} {'/'.join(sorted(kinds))} tensors holds one of this "
            f"model's weights (compared by value, rows in any order); pass the GGUF the model was converted from")
    return matched


def gguf_graph(src: Path, dst: Path, weights: GgufWeights) -> dict:
    """Write to ``dst`` a copy of the float32 graph ``src`` (metadata kept) whose weight MatMuls the GGUF holds
    are MatMulNBits over its blocks; returns {"nodes": {format: count}, "float32": [names of weight MatMuls
    left float32]}."""
    from .quantize import save_graph

    model = onnx.load(str(src))
    metadata = {p.key: p.value for p in model.metadata_props}
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    nodes, added, formats, kept, sums = [], {}, Counter(), [], {}
    for node in graph.node:
        w_t = _weight(node, inits, producers)
        found = None if w_t is None else weights.match(w_t)
        if found is None:
            nodes.append(node)
            kept += [node.name] if w_t is not None else []
            continue
        tensor, order = found
        nodes += _replacement(node, tensor, order, added, sums)
        formats[tensor.kind] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added.values())
    _prune(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    save_graph(model, dst, metadata)
    return {"nodes": dict(sorted(formats.items())), "float32": kept}


def gguf_record(weights: GgufWeights, graphs: dict) -> dict:
    """The manifest's ``quantization`` from the records of gguf_graph (graph file -> record)."""
    first = next(iter(graphs.values()))
    same = all(r == first for r in graphs.values())
    kinds = "/".join(first["nodes"]) or "none"
    return {"method": "GGUF-exact: the GGUF's own blocks as onnxruntime MatMulNBits (export/gguf_exact.py)",
            "gguf": weights.path.name, "gguf_sha256": weights.sha256,
            "weights": f"the GGUF's {kinds} blocks of {GGUF_BLOCK}, unchanged",
            "activations": f"float32 (accuracy level {GGUF_ACCURACY}: int8 inside the kernel)",
            **({"nodes": first["nodes"], "float32": first["float32"]} if same else {"graphs": graphs})}


def _weight(node, inits: dict, producers: dict) -> np.ndarray | None:
    """W^T (float32 [N, K]) of a MatMul x @ W whose W is an initializer, or the Transpose of one (a tied head)."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    name = node.input[1]
    if name in inits:
        w = numpy_helper.to_array(inits[name])
        return w.T if w.ndim == 2 and w.dtype == np.float32 else None
    transpose = producers.get(name)
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
        return None
    perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
    w_t = numpy_helper.to_array(inits[transpose.input[0]])
    return w_t if w_t.ndim == 2 and w_t.dtype == np.float32 and perm in ([], [[1, 0]]) else None


def _replacement(node, tensor: GgufTensor, order: np.ndarray, added: dict, sums: dict) -> list:
    """The nodes computing ``node`` (x @ W) from the GGUF tensor's blocks in ``order``; their constants go to
    ``added`` (name -> TensorProto), Q4_1's block sums of x are shared through ``sums``."""
    blocks = tensor.blocks[order]                                         # [N, K/32, bytes] in the graph's order
    n, k_blocks = blocks.shape[:2]
    base = node.name[:-len("MatMul")] if node.name.endswith("MatMul") else f"{node.name}/"
    name = f"{base}MatMulNBits"
    scales = blocks[..., :2].copy().view(np.float16).astype(np.float32).reshape(n * k_blocks)
    if tensor.kind == "Q8_0":
        codes = blocks[..., 2:] ^ np.uint8(0x80)                          # u = q + 128 (q int8)
    else:
        codes = _q4_codes(blocks[..., 4 if tensor.kind == "Q4_1" else 2:])
    x, y = node.input[0], node.output[0]
    consts = {f"{name}.B": codes, f"{name}.scales": scales}
    if tensor.kind == "Q4_1":                                             # d q, zero point 0
        consts[f"{name}.zero_points"] = np.zeros((n, (k_blocks + 1) // 2), np.uint8)
    for key, value in consts.items():
        added[key] = numpy_helper.from_array(np.ascontiguousarray(value), key)
    matmul = helper.make_node("MatMulNBits", [x, *consts], [y if tensor.kind != "Q4_1" else f"{name}/d_q"], name,
                              domain=MS_DOMAIN, K=k_blocks * GGUF_BLOCK, N=n, bits=BITS[tensor.kind],
                              block_size=GGUF_BLOCK, accuracy_level=GGUF_ACCURACY)
    if tensor.kind != "Q4_1":
        return [matmul]
    offsets = blocks[..., 2:4].copy().view(np.float16).astype(np.float32).reshape(n, k_blocks).T   # m [K/32, N]
    return [matmul, *_q4_1(node.name, x, y, f"{name}/d_q", offsets, base, added, sums)]


def _q4_codes(qs: np.ndarray) -> np.ndarray:
    """llama.cpp's 4-bit block (byte j: element j low, element j + 16 high) -> MatMulNBits' (byte j: element 2j
    low, 2j + 1 high); uint8 [..., 16] -> uint8 [..., 16]."""
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)   # [..., 32] in order
    return q[..., 0::2] | (q[..., 1::2] << np.uint8(4))


# Q4_1's offset term, beside the MatMulNBits that computes x (d q):
#
#   x [..., K] ----------------------------------> MatMulNBits(q, d, zero points 0) --> x (d q) [..., N]
#    |                                                                                       |
#    +-> Shape[:-1] -> Concat(K/32, 32) -> Reshape(x) [..., K/32, 32]                        |
#         -> ReduceSum(-1) -> s [..., K/32]  (once per x: q, k and v share it)               |
#              -> MatMul(m [K/32, N] float32) --------------------------------------> Add --> y [..., N]
#
# y = x (d q) + s m = x (d q + m): the weights are the file's d, q and m, and d q + m in float32 is gguf's.
def _q4_1(node_name: str, x: str, y: str, d_q: str, offsets: np.ndarray, base: str, added: dict,
          sums: dict) -> list:
    k_blocks = offsets.shape[0]
    nodes = []
    if (x, k_blocks) not in sums:
        shape, blocked, s = f"{base}BlockSums/shape", f"{base}BlockSums/blocks", f"{base}BlockSums/sums"
        split, axis = f"gguf.block_shape.{k_blocks}", "gguf.last_axis"
        added.setdefault(split, numpy_helper.from_array(np.array([k_blocks, GGUF_BLOCK], np.int64), split))
        added.setdefault(axis, numpy_helper.from_array(np.array([-1], np.int64), axis))
        nodes += [helper.make_node("Shape", [x], [f"{shape}_lead"], f"{base}BlockSums/Shape", end=-1),
                  helper.make_node("Concat", [f"{shape}_lead", split], [shape], f"{base}BlockSums/Concat", axis=0),
                  helper.make_node("Reshape", [x, shape], [blocked], f"{base}BlockSums/Reshape"),
                  helper.make_node("ReduceSum", [blocked, axis], [s], f"{base}BlockSums/ReduceSum", keepdims=0)]
        sums[x, k_blocks] = s
    m = f"{base}MatMulNBits.offsets"
    added[m] = numpy_helper.from_array(np.ascontiguousarray(offsets), m)
    return [*nodes, helper.make_node("MatMul", [sums[x, k_blocks], m], [f"{base}offset"], f"{base}offset/MatMul"),
            helper.make_node("Add", [d_q, f"{base}offset"], [y], f"{base}offset/Add")]


def _prune(graph) -> None:
    """Drop the Transposes and initializers nothing reads any more (a tied head's; the embedding's Gather keeps
    the table), and their value_info."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in _inputs(n)}
        dead = [n for n in graph.node if n.op_type == "Transpose" and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    produced = {o for n in graph.node for o in n.output}
    info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(info)


def _inputs(node):
    """A node's inputs and those its subgraphs (If, Loop, Scan) read."""
    yield from node.input
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                yield from _inputs(inner)
