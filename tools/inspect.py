"""`infini inspect`: wiring only; the work is in export/inspection.py."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON (all layers).")
def inspect(path, as_json):
    """Show what PATH (an export folder, an .onnx graph or a TensorRT engine) holds."""
    from ..export.inspection import format_inspection, inspect_path

    info = inspect_path(path)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspection(info))
