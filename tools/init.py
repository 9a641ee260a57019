"""`infini init`: a randomly initialised checkpoint of a preset."""

from __future__ import annotations

from pathlib import Path

import click

from ..models.checkpoint import init_model, save_checkpoint
from ..models.config import PRESETS, UPDATE_RULES, preset
from .options import seed_option


@click.command()
@click.argument("preset_name", metavar="PRESET", type=click.Choice(list(PRESETS)))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--update", type=click.Choice(UPDATE_RULES), default="linear", show_default=True,
              help="Memory update rule: linear (Eq 8) or delta (Eq 9).")
@seed_option()
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is a checkpoint of ours.")
def init(preset_name, out_dir, update, seed, force):
    """Write a randomly initialised checkpoint of PRESET to OUT_DIR."""
    model = init_model(preset(preset_name, update=update), seed)
    save_checkpoint(model, out_dir, force=force)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out_dir} ({preset_name}, {update} rule, {n:,} parameters, seed {seed})")
