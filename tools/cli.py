"""The ``infini`` command: wires arguments to the API, nothing more.

Errors a user can cause (subclasses of InfiniError) become one line on stderr
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import click

from ..errors import InfiniError
from .bench import bench
from .build_inspect import build, inspect
from .convert import convert
from .demo import demo
from .evaluate import evaluate
from .export_verify import export, verify
from .generate import generate, passkey
from .init_run import init, run
from .train import train


class UserError(click.ClickException):
    exit_code = 2


class InfiniGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InfiniError as e:
            raise UserError(str(e)) from None


@click.group(cls=InfiniGroup)
@click.version_option(package_name="infini-deploy")
def cli():
    """Export, build and stream Infini-attention transformers."""


cli.add_command(init)
cli.add_command(convert)
cli.add_command(run)
cli.add_command(export)
cli.add_command(verify)
cli.add_command(build)
cli.add_command(inspect)
cli.add_command(bench)
cli.add_command(generate)
cli.add_command(passkey)
cli.add_command(train)
cli.add_command(demo)
cli.add_command(evaluate)


def main():
    cli(prog_name="infini")
