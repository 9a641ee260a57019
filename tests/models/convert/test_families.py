"""The families `infini convert` takes from a Hugging Face folder: Llama 3.2 (rope llama3), Qwen2.5 (q/k/v biases),
Qwen3 (q/k norms), Gemma 3 text (the whole Gemma block, sliding layers with their own RoPE), Phi-3/4-mini (fused
projections, partial rotary, LongRoPE). Each is a tiny random model built with transformers' own config class
(tests/llama_fixtures.py: family_config), converted once per family, then checked against transformers, on
disk, through decode and chunk steps, exported, and refused where it must be."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from infini_deploy.models import InfiniTransformer, load_checkpoint, save_checkpoint  # noqa: E402
from infini_deploy.models.checkpoint import checkpoint_tokenizer  # noqa: E402
from infini_deploy.models.config import PRESETS, InfiniConfig  # noqa: E402
from infini_deploy.models.convert import convert  # noqa: E402
from infini_deploy.models.convert.reference import to_transformers  # noqa: E402
from infini_deploy.models.convert.validate import CLOSED, PARITY_RTOL  # noqa: E402
from infini_deploy.models.chunk import chunk_step  # noqa: E402
from infini_deploy.models.decode import decode_step, fold, initial_decode_state  # noqa: E402
from infini_deploy.models.layers import rope_frequencies  # noqa: E402

from llama_fixtures import FAMILIES, family_config, tiny_family  # noqa: E402

N = 64          # segment length of the conversions: at least the probe, as validate.py asks
TOLERANCE = 1e-5   # closed-gate logits against transformers on these tiny models (logits below 1.5): measured
#                    0 to 6e-7 (docs/conversion.md), the conversion's own bound is PARITY_RTOL x max(1, |logits|)
# what each family's tiny model must show: switching the option back to the Llama block moves the logits
OPTIONS = {
    "llama3": [{"rope_scaling": None}],
    "qwen2": [{"qkv_bias": False}],
    "qwen3": [{"qk_norm": False}],
    "gemma3": [{"norm_offset": 0.0}, {"sandwich_norm": False}, {"activation": "silu"}, {"embed_scale": None},
               {"query_scale": None}, {"qk_norm": False}, {"rope_scaling": None}, {"local_rope_theta": None}],
    "phi3": [{"rope_scaling": None}, {"rope_scaling": None, "rotary_dim": None}],
}


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """(family, source folder, checkpoint folder, what convert returned), once per family."""
    root = tmp_path_factory.mktemp(request.param)
    src = tiny_family(root / "src", request.param)
    return request.param, src, root / "out", convert(src, root / "out", segment_len=N)


def closed(model: InfiniTransformer) -> InfiniTransformer:
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.beta.fill_(CLOSED)
    return model


def reference(src):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()


def ids(vocab: int, length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_closed_gate_logits_equal_transformers_segment_by_segment(converted):
    """Gates shut, every segment is plain causal attention at positions 0..N-1: each of three segments equals
    transformers' model run on that segment's tokens alone."""
    family, src, out, result = converted
    assert result.parity.ok and result.parity.tokens == N and result.parity.max_abs < TOLERANCE
    assert result.parity.tolerance == PARITY_RTOL * max(1.0, result.parity.logits_scale)
    model = closed(load_checkpoint(out))
    tokens = ids(model.config.vocab_size, 3 * N)
    with torch.no_grad():
        got = model(tokens)[0][0]
        source = reference(src)
        for s in range(3):
            want = source(tokens[:, s * N:(s + 1) * N]).logits[0]
            torch.testing.assert_close(got[s * N:(s + 1) * N], want, rtol=0, atol=TOLERANCE)


def test_every_option_of_a_family_changes_its_logits(converted):
    """The tiny models exercise what they are built for: each option set back to the Llama block's value moves
    the logits far past the tolerance (so the parity above could not pass with the option ignored)."""
    family, _, out, _ = converted
    model = closed(load_checkpoint(out))
    tokens = ids(model.config.vocab_size, N, seed=1)
    with torch.no_grad():
        want = model.step(tokens, *model.start_state(1))[0]
        for change in OPTIONS[family]:
            other = InfiniTransformer(dataclasses.replace(model.config, **change)).eval()
            other.load_state_dict(model.state_dict(), strict=False)
            got = other.step(tokens, *other.start_state(1))[0]
            assert (got - want).abs().max() > 100 * TOLERANCE, change


def test_the_checkpoint_round_trip_is_exact(converted, tmp_path):
    family, src, out, result = converted
    loaded = load_checkpoint(out)
    assert loaded.config == result.model.config
    assert InfiniConfig.from_dict(json.loads((out / "config.json").read_text())) == loaded.config
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    again = load_checkpoint(save_checkpoint(loaded, tmp_path / "again", tokenizer=checkpoint_tokenizer(out)))
    assert again.config.digest() == loaded.config.digest()
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in loaded.state_dict().items())


def test_the_config_says_what_the_family_is(converted):
    family, _, _, result = converted
    cfg = result.model.config
    expected = {
        "llama3": dict(rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                     ("original_max_position_embeddings", 64), ("rope_type", "llama3")),
                       tie_embeddings=True, rope_theta=500000.0),
        "qwen2": dict(qkv_bias=True, tie_embeddings=True),
        "qwen3": dict(qk_norm=True, qkv_bias=False),
        "gemma3": dict(norm_offset=1.0, sandwich_norm=True, qk_norm=True, activation="gelu_tanh", embed_scale=8.0,
                       query_scale=24 ** -0.5, sliding_window=128, layer_types=("sliding_attention", "full_attention"),
                       local_rope_theta=10000.0, rope_theta=1000000.0, tie_embeddings=True),
        "phi3": dict(rotary_dim=12, sliding_window=256, tie_embeddings=False),
    }[family]
    assert {k: getattr(cfg, k) for k in expected} == expected
    if family == "phi3":
        assert dict(cfg.rope_scaling)["rope_type"] == "longrope"
        assert dict(cfg.rope_scaling)["original_max_position_embeddings"] == 128


def test_scaled_rope_frequencies_stay_float32_on_the_weights_device(converted):
    """A layer with scaled or partial RoPE keeps its frequencies out of the state dict and out of dtype casts (a
    bf16 export's graph still turns positions in float32); plain layers keep a float base and the fused kernel."""
    import copy

    family, _, out, _ = converted
    model = load_checkpoint(out)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    for layer, other in zip(model.layers, cast.layers):
        attn = layer.self_attn
        if isinstance(attn.rope_theta, torch.Tensor):
            assert other.self_attn.rope_theta.dtype == torch.float32
            assert torch.equal(other.self_attn.rope_theta, attn.rope_theta)
        assert attn.fused_kernel == (isinstance(attn.rope_theta, float) and model.config.query_scale is None)
    assert not any("rope" in k for k in model.state_dict())
    assert {"llama3": False, "qwen2": True, "qwen3": True, "gemma3": False, "phi3": False}[family] == all(
        layer.self_attn.fused_kernel for layer in model.layers)


def decode_all(model, tokens):
    """Decode (B, T) tokens one by one, folding at every segment end: logits (B, T, V)."""
    cfg, B = model.config, tokens.shape[0]
    memory, norm = model.initial_state(B)
    state = initial_decode_state(cfg, B)
    logits = []
    for t in range(tokens.shape[1]):
        pos = t % cfg.segment_len
        out, *state = decode_step(model, tokens[:, t], torch.full((B,), pos), memory, norm, *state)
        logits.append(out)
        if pos == cfg.segment_len - 1:
            memory, norm = fold(memory, norm, state[2], state[3])
            state = initial_decode_state(cfg, B)
    return torch.stack(logits, dim=1)


def test_decoding_and_chunks_equal_teacher_forcing(converted):
    """Through two segment boundaries, with the gates open (the memory matters): decode token by token, and the
    chunk step in pieces, give the segment step's logits (the projections, norms and RoPE are one code)."""
    _, _, out, _ = converted
    model = with_segment(load_checkpoint(out), 16)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.0, model.config.n_head))
        tokens = ids(model.config.vocab_size, 2 * 16 + 5, seed=2, batch=2)
        want = model(tokens)[0]
        torch.testing.assert_close(decode_all(model, tokens), want, rtol=1e-4, atol=1e-5)
        memory, norm = model.initial_state(2)
        state, got, start = initial_decode_state(model.config, 2), [], 0
        for n in (5, 11):   # one segment in two chunks
            out, *state = chunk_step(model, tokens[:, start:start + n], torch.full((2,), start), memory, norm, *state)
            got.append(out)
            start += n
        torch.testing.assert_close(torch.cat(got, dim=1), want[:, :16], rtol=1e-4, atol=1e-5)


def with_segment(model, n):
    other = InfiniTransformer(dataclasses.replace(model.config, segment_len=n)).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_the_chat_template_renders_as_transformers_does(converted, tmp_path):
    from transformers import AutoTokenizer

    family, src, out, _ = converted
    tok = checkpoint_tokenizer(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):   # the converted files, without our config.json
        shutil.copy(out / name, tmp_path / name)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": " What is the capital of France? "}]
    for prompt in (True, False):
        assert tok.chat(messages, add_generation_prompt=prompt) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt)
    if family == "gemma3":   # its template refuses a system turn, as Gemma's does
        with pytest.raises(Exception, match="System role not supported"):
            tok.chat([{"role": "system", "content": "x"}, *messages])


@pytest.mark.slow
def test_the_export_validates(converted, tmp_path):
    """fp32 and one reduced precision (bf16 or int8 by family), segment 16: export_model refuses a graph that
    disagrees with torch, so a written manifest is a validated one."""
    from infini_deploy.export.exporter import export_model

    family, _, out, _ = converted
    model = with_segment(load_checkpoint(out), 16)
    reduced = "bf16" if family in ("gemma3", "qwen3", "llama3") else "int8"
    for precision in ("fp32", reduced):
        manifest = export_model(model, tmp_path / precision, precision, tokenizer=checkpoint_tokenizer(out))
        assert manifest.config == model.config and manifest.validation["decode"]["folds"] >= 1
        if precision == "fp32":
            assert manifest.validation["worst"]["logits_max"] < 1e-4
            assert manifest.validation["decode"]["worst"]["logits_max"] < 1e-4


def test_the_full_attention_reference_is_the_source(converted):
    """to_transformers (infini eval ppl --reference) rebuilds the source's family from the converted weights;
    LongRoPE's long factors are not kept, so a Phi-3 with LongRoPE is refused by name."""
    from infini_deploy.errors import BadInputError

    family, src, out, _ = converted
    model = load_checkpoint(out)
    if family == "phi3":
        with pytest.raises(BadInputError, match="LongRoPE model needs its long factors"):
            to_transformers(model, 1024)
        return
    tokens = ids(model.config.vocab_size, 100, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(to_transformers(model, 512)(tokens).logits, reference(src)(tokens).logits,
                                   rtol=0, atol=1e-6)


def test_rope_frequencies_equal_transformers():
    """Every scaling computes transformers' inverse frequencies and attention factor (modeling_rope_utils)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from infini_deploy.models.convert.families import FAMILIES as TABLE, rope_fields

    cases = {
        "llama3": ("llama3", family_config("llama3")),
        "linear": ("gemma3", family_config("gemma3")),
        "longrope": ("phi3", family_config("phi3")),
        "yarn": ("qwen2", family_config("qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 128})),
        "dynamic": ("qwen2", family_config("qwen2", rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    }
    for kind, (family, hf) in cases.items():
        fields = rope_fields(hf.to_dict(), TABLE[hf.model_type])
        config = InfiniConfig(d_head=16, n_head=4, d_model=64, segment_len=64, **fields)
        theta, factor = rope_frequencies(config)
        layer = {"layer_type": "full_attention"} if family == "gemma3" else {}
        want, want_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", **layer)
        if kind == "dynamic":   # within max_position_embeddings: the plain RoPE (a float base here)
            assert theta == config.rope_theta and factor == 1.0
            theta = theta ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
        torch.testing.assert_close(theta, want, rtol=1e-6, atol=0)
        assert factor == pytest.approx(want_factor, rel=1e-12), kind


def test_the_presets_keep_their_json_and_digests():
    """The new options are left out at their defaults: every config made before them is byte-for-byte the same."""
    assert {k: v.digest() for k, v in PRESETS.items()} == {
        "tiny": "173a1f01f53d5085288bff6db15ea05028a3eaea657048afabfbe1ae4553a5d6",
        "small": "c8ecc32223eb51632ef51170c01514b307d89ffc437b71f16f056679275b73b4",
        "passkey": "99c505b0f17f4411cb37764d443a6e4fb689ed72f89c7bbefce6834676a8e906",
        "paper-lm": "2795fc4113f9ddd57b6b12873880ab84f5029d8fc2e8e00f038bc20b4ef4d620"}
    assert set(PRESETS["tiny"].to_dict()) == {"vocab_size", "n_layer", "n_head", "d_head", "d_model", "d_ff",
                                              "segment_len", "update", "eps", "rope_theta", "norm_eps",
                                              "tie_embeddings"}


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "takes exactly the parameters"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32}},
     "exact only for a segment of at most max_position_embeddings (32)"),
    ({"sliding_window": 32}, "longer than the sliding window (sliding_window 32)"),
    ({"layer_types": ["sliding_attention"]}, "must be null or a list of 2 (n_layer)"),
    ({"norm_offset": 0.5}, "must be 0 (w) or 1"),
    ({"activation": "relu"}, "expected one of: silu, gelu_tanh"),
    ({"rotary_dim": 7}, "rotary_dim must be even"),
    ({"local_rope_theta": 10000.0}, "layer_types has none"),
])
def test_a_config_with_a_bad_option_is_refused(change, message):
    from infini_deploy.errors import BadInputError

    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        InfiniConfig(**change)


# -- refusals, through the CLI: one line, exit 2, nothing written ------------------------------------------------
def edited(tmp, family, **changes):
    folder = tiny_family(tmp / "src", family)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


REFUSALS = [   # (id, family, config changes, --segment-len, what the one line must say)
    ("llama-mlp-bias", "llama3", {"mlp_bias": True}, 64, "llama with attention or MLP biases"),
    ("llama-partial-rotary", "llama3", {"partial_rotary_factor": 0.5}, 64,
     "llama with partial rotary embeddings (partial_rotary_factor 0.5) is not supported"),
    ("qwen2-window-shorter-than-segment", "qwen2", {"use_sliding_window": True, "sliding_window": 32,
                                                    "max_window_layers": 1, "layer_types": None}, 64,
     "qwen2 with sliding-window attention (sliding_window 32) is exact only for segments of at most 32 tokens"),
    ("qwen3-output-bias", "qwen3", {"attention_bias": True}, 64, "qwen3 with attention or MLP biases"),
    ("gemma3-softcapping", "gemma3", {"final_logit_softcapping": 30.0}, 64,
     "gemma3_text with logit soft-capping (final_logit_softcapping 30.0) is not supported"),
    ("gemma3-bidirectional", "gemma3", {"use_bidirectional_attention": True}, 64,
     "gemma3_text with bidirectional attention"),
    ("gemma3-segment-past-window", "gemma3", {}, 256,
     "gemma3_text with sliding-window attention (sliding_window 128) is exact only for segments of at most 128"),
    ("gemma3-activation", "gemma3", {"hidden_activation": "gelu"}, 64, "gemma3_text with activation 'gelu'"),
    ("gemma3-multimodal", "gemma3", {"model_type": "gemma3"}, 64,
     "model_type 'gemma3' (Gemma3ForCausalLM) is not supported; supported: llama"),
    ("phi3-longrope-past-original", "phi3", {}, 256,
     "phi3 with rope scaling 'longrope' (original_max_position_embeddings 128) is exact only for segments of at "
     "most 128 tokens"),
    ("qwen2-yarn-deepseek", "qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0}},
     64, "qwen2 with rope scaling 'yarn' with mscale_all_dim"),
    ("llama3-incomplete", "llama3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 64,
     "llama with rope scaling 'llama3' of incomplete or invalid parameters (KeyError: 'low_freq_factor')"),
]


@pytest.mark.parametrize("family, changes, segment, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_refused_source_is_one_line_exit_2_and_writes_nothing(tmp_path, family, changes, segment, message):
    from click.testing import CliRunner

    from infini_deploy.tools.cli import cli

    src, out = edited(tmp_path, family, **changes), tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--segment-len", str(segment)],
                             catch_exceptions=False)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert message in lines[0], lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_list_names_every_family_and_what_is_refused():
    from click.testing import CliRunner

    from infini_deploy.tools.cli import cli

    res = CliRunner().invoke(cli, ["convert", "--list"])
    assert res.exit_code == 0, res.output
    for name in ("llama:", "mistral:", "qwen2:", "qwen3:", "gemma3_text:", "phi3:", "mixtures of experts",
                 "a segment longer than a sliding window", "refused: final_logit_softcapping"):
        assert name in res.output, name


def test_the_default_segment_fits_the_window_and_the_log_says_so(tmp_path):
    """Without --segment-len, a Phi-3 whose window is shorter than the default segment gets the window; the CLI
    prints why its sliding layers are exact."""
    from click.testing import CliRunner

    from infini_deploy.tools.cli import cli

    src = edited(tmp_path, "phi3", sliding_window=100, rope_scaling=None, partial_rotary_factor=1.0,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    res = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "segment 100," in res.output
    assert "note: sliding-window attention (every layer, window 100): exact, the segment of 100 tokens fits" \
        in res.output
    shutil.rmtree(tmp_path / "out")
