"""`infini convert`: wiring only; the work is in models/convert/."""

from __future__ import annotations

from pathlib import Path

import click

from ..models.config import UPDATE_RULES


def _list(ctx, _param, value):
    if value:
        from ..models.convert.families import supported_table

        click.echo(supported_table())
        ctx.exit(0)


@click.command()
@click.option("--list", is_flag=True, is_eager=True, expose_value=False, callback=_list,
              help="Print the supported architectures, what is refused and why, and exit.")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--segment-len", type=click.IntRange(min=1), default=None,
              help="Tokens per segment N [default: 2048, at most the source's trained context].")
@click.option("--update", type=click.Choice(UPDATE_RULES), default=None,
              help="Memory update rule: linear (Eq 8) or delta (Eq 9).  [default: linear, or the adapter's base's]")
@click.option("--gate-init", type=float, default=None,
              help="Initial gate logit beta of every head [default: -6, sigmoid = 0.0025; docs/conversion.md].")
@click.option("--attend-previous/--segment-local", "attend_previous", default=None,
              help="The local attention also sees the previous segment's keys and values and the stream's first "
                   "tokens (constant memory; it models language far better at the same N: docs/conversion.md), or "
                   "the segment alone (the paper's variant, a smaller state)  [default: attend-previous, or the "
                   "adapter's base's]")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against transformers.")
@click.option("--adapter", type=click.Path(path_type=Path, exists=True), default=None,
              help="Apply an adapter of `infini train lm` or `infini train passkey` (folder or adapter.safetensors) "
                   "trained on this base; --segment-len, --update and --gate-init default to its base's.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def convert(src, out_dir, segment_len, update, gate_init, attend_previous, no_validate, adapter, force):
    """Convert SRC (a Hugging Face folder or a .gguf file of a family --list names) into an Infini checkpoint at
    OUT_DIR, checked against transformers with the gates closed."""
    from ..models.convert import DEFAULT_GATE_INIT, convert as run
    from ..models.convert.validate import PARITY_RTOL
    from ..runtime.bench.measure import human_bytes, peak_rss_bytes

    if adapter is not None:   # the options its base was converted with, unless given
        from ..models.adapter import adapter_options

        base = adapter_options(adapter)
        segment_len = segment_len or base.get("segment_len")
        update = update or base.get("update")
        gate_init = base.get("gate_init") if gate_init is None else gate_init
        if attend_previous is None:   # either flag overrides the adapter's base: attend_previous changes no weight
            attend_previous = base.get("attend_previous", False)
    if attend_previous is None:
        attend_previous = True
    update = update or "linear"
    gate = DEFAULT_GATE_INIT if gate_init is None else gate_init
    result = run(src, out_dir, segment_len, update, gate, validate=not no_validate, force=force, adapter=adapter,
                 attend_previous=attend_previous)
    cfg = result.model.config
    n = sum(p.numel() for p in result.model.parameters())
    click.echo(f"wrote {out_dir}: {n:,} parameters, {cfg.n_layer} layers, {cfg.n_head} query / {cfg.kv_heads} KV "
               f"heads of {cfg.d_head}, vocabulary {cfg.vocab_size:,}, segment {cfg.segment_len}, {cfg.update} rule, "
               f"gates at beta {gate:g}" + (", the previous segment attended" if cfg.attend_previous else ""))
    p = result.parity
    if p is None:
        click.echo("not validated: " + ("--no-validate" if no_validate else
                                       "transformers is not installed (pip install 'infini-deploy[convert]')"))
    else:
        click.echo(f"validated against transformers, gates closed, {p.tokens} probe tokens in one segment: logits "
                   f"max abs {p.max_abs:.2e} on logits of magnitude {p.logits_scale:.1f} (tolerance {p.tolerance:.2e}"
                   f" = {PARITY_RTOL:g} x max(1, magnitude)), top-1 {p.top1_agree}/{p.top1_checked}; at beta {gate:g}: "
                   f"max abs {p.gate_init_max_abs:.2e}")
    for note in result.notes:
        click.echo(f"note: {note}")
    if adapter is not None:
        click.echo(f"applied the adapter {adapter} (its base model's weights sha256 matched)")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    past = f" (and {human_bytes(cfg.past_bytes())} of the previous segment's keys and values)" if cfg.attend_previous else ""
    click.echo(f"state {human_bytes(cfg.state_bytes())}{past} per stream; {stages}; peak RSS {human_bytes(peak_rss_bytes())}")
