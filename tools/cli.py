"""The ``infini`` command: wires arguments to the API, nothing more.

Errors a user can cause (subclasses of InfiniError, and an OSError on a path: a full disk, a read-only
folder) become one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
SIGTERM and SIGHUP are turned into KeyboardInterrupt (tools/entry.py), as Ctrl-C is, so every writer's
cleanup runs (atomic.py) and the command exits 130 (Ctrl-C) or 143 (SIGTERM) with nothing half-written.
"""

from __future__ import annotations

import signal

import click

from .. import signals
from ..errors import InfiniError
from .bench import bench
from .build import build
from .convert import convert
from .demo import demo
from .eval import evaluate
from .export import export
from .generate import generate
from .init import init
from .inspect import inspect
from .passkey import passkey
from .run import run
from .serve import serve
from .train import train
from .verify import verify


class UserError(click.ClickException):
    exit_code = 2


def describe_os_error(e: OSError) -> str:
    """One line naming the path and the reason: "cannot write out/x.json: No space left on device"."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {reason}"
    if e.filename is not None:
        return f"{e.filename}: {reason}"
    return reason


class InfiniGroup(click.Group):
    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            signals.check()   # a signal whose exception something swallowed: the command did not finish
            return result
        except InfiniError as e:
            raise UserError(_one_line(str(e))) from None
        except OSError as e:
            if signals.received:
                _interrupted(signals.received[0])
            raise UserError(_one_line(describe_os_error(e))) from None
        except KeyboardInterrupt as e:
            _interrupted(getattr(e, "signum", signal.SIGINT))
        except Exception:
            if signals.received:   # a library turned the interrupt into its own error (torch.onnx.export does)
                _interrupted(signals.received[0])
            raise


def _interrupted(signum: int):
    click.echo(f"interrupted ({signal.Signals(signum).name}): outputs left as they were", err=True)
    raise click.exceptions.Exit(128 + signum) from None


def _one_line(message: str) -> str:
    """The message on one line: line breaks (a path may hold one) are shown as \\n."""
    return message.strip().replace("\r", "\\r").replace("\n", "\\n")


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
cli.add_command(serve)
cli.add_command(evaluate)

