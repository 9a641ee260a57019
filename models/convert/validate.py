"""Conversion's parity check: the converted model with its gates closed equals its source in transformers.

With every gate closed (sigmoid(beta) = 0) a segment is plain causal attention over the segment, so
over a probe prompt no longer than the segment the converted model must give the source model's
logits. The tolerance is relative to the logits' magnitude (docs/conversion.md):

    max |ours - transformers| <= PARITY_RTOL * max(1, max |transformers|)

and at every position where transformers' top token leads the runner-up by more than that bound,
ours has the same top token. Both run float32 on the CPU; what remains is summation order (SDPA
kernels, matmul blocking) growing with depth: measured 1e-6 to 1e-5 of the logits' magnitude on
tiny random models and SmolLM2 (docs/conversion.md), so 1e-4 is 10x the worst seen, while a wrong
permutation, a missing norm or a wrong rope base is off by a large fraction of the magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import NumericalFaultError
from .source import require_transformers

PARITY_RTOL = 1e-4
CLOSED = -1e4        # sigmoid(-1e4) is exactly 0 in float32: the gate is shut, not nearly so
PROBE_TOKENS = 256   # at most; fewer when the segment is shorter
PROBE_TEXT = (
    "The library was quiet in the late afternoon. Rain had been falling since noon, and the long windows "
    "along the reading room were streaked with water. A few students sat at the tables near the radiators, "
    "bent over their notes, and an old man in a grey coat turned the pages of a newspaper without reading "
    "it. At the desk by the door the librarian sorted returned books into three piles: history, science, "
    "and everything else. She had worked there for twenty-six years, and she could tell from the weight of "
    "a book, and from the way its spine had been cracked, whether anyone had really read it. Outside, a bus "
    "stopped, waited, and pulled away again. The clock above the catalogue struck four. Somewhere upstairs "
    "a chair scraped on the wooden floor, and then there was silence again, the particular silence of a "
    "room full of people who are thinking. In 1911 the building had been a customs house; the counting "
    "tables were still there, and the brass rails where merchants once leaned to argue over duties. "
    "Nobody argued now. The newspaper rustled, the radiators ticked, and the rain went on.")


@dataclass(frozen=True)
class Parity:
    tokens: int           # probe length
    max_abs: float        # max |ours - transformers| over the probe's logits
    logits_scale: float   # max |transformers' logits|
    tolerance: float      # PARITY_RTOL * max(1, logits_scale)
    top1_checked: int     # positions where the reference's top token is decisive
    top1_agree: int       # of those, positions where ours has the same top token
    gate_init_max_abs: float   # the same difference with the gates at gate_init (information only)

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance and self.top1_agree == self.top1_checked


def probe_ids(tokenizer, segment_len: int) -> torch.Tensor:
    """(1, P) int64: the probe text in the source's tokenizer, P <= min(segment_len, PROBE_TOKENS)."""
    ids = [*tokenizer.start_ids, *tokenizer.encode(PROBE_TEXT)]
    return torch.tensor(ids[:min(segment_len, PROBE_TOKENS)], dtype=torch.int64)[None]


def check_parity(model, source, ids: torch.Tensor, reference=None) -> Parity:
    """Compare ``model`` (gates closed for the check) with transformers' model of ``source`` over ``ids``.

    ``reference``: a transformers causal LM to compare with; default: loaded from the source by
    transformers itself (from_pretrained), independent of our reading of the files.
    """
    reference = reference or source.reference or load_reference(source)
    with torch.no_grad():
        want = reference(ids).logits.float()[0]                         # (P, V)
        got = _logits(model, ids, CLOSED)
        at_init = _logits(model, ids, None)
    scale = float(want.abs().max())
    tolerance = PARITY_RTOL * max(1.0, scale)
    top2 = want.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    agree = (got.argmax(-1) == want.argmax(-1)) & decisive
    return Parity(ids.shape[1], float((got - want).abs().max()), scale, tolerance, int(decisive.sum()),
                  int(agree.sum()), float((at_init - want).abs().max()))


def load_reference(source):
    transformers = require_transformers("check the conversion against the source model")
    path = source.transformers_path
    kwargs = {"gguf_file": path[1]} if source.kind == "gguf" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path[0], dtype=torch.float32, **kwargs)
    return model.eval()


def _logits(model, ids, beta: float | None) -> torch.Tensor:
    """model.step over one segment, with every beta set to ``beta`` (None: as it is), restored after."""
    saved = [layer.self_attn.beta.detach().clone() for layer in model.layers]
    try:
        if beta is not None:
            for layer in model.layers:
                layer.self_attn.beta.data.fill_(beta)
        return model.step(ids, *model.start_state(1))[0].float()[0]
    finally:
        for layer, b in zip(model.layers, saved):
            layer.self_attn.beta.data.copy_(b)


def refuse(parity: Parity, origin: str) -> None:
    if not parity.ok:
        raise NumericalFaultError(
            f"the converted {origin} differs from transformers with the gates closed: logits max abs "
            f"{parity.max_abs:.3g} (tolerance {parity.tolerance:.3g} = {PARITY_RTOL:g} x max(1, |logits| "
            f"{parity.logits_scale:.3g})), top-1 agreement {parity.top1_agree}/{parity.top1_checked}; nothing written")
