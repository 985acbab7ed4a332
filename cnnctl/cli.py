"""The ``cnnctl`` command line: one click group whose subcommands load lazily.

Each stage keeps its commands in its own module (``cnnctl.training.commands`` and so on); this
file only names them, so ``cnnctl --help`` imports no stage and ``cnnctl predict`` starts without
importing torch. It is also the only place that configures logging and the only place that turns
a ``CnnctlError`` into an exit code.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from cnnctl import __version__
from cnnctl.errors import CnnctlError

# command name -> ("module:attribute", summary). The module is imported only when the command
# runs; the summary is the first paragraph of the command's docstring (tests/unit/test_cli.py
# checks), so listing the commands imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("cnnctl.training.commands:train", "Train a model; writes best.pt, last.pt, "
              "metrics.csv and config.json into the run dir."),
    "evaluate": ("cnnctl.training.commands:evaluate", "Accuracy and per-class accuracy of "
                 "CHECKPOINT on a dataset's test split."),
    "models": ("cnnctl.training.commands:models", "The model zoo: parameters, input shape, seed "
               "file, default dataset."),
    "datasets": ("cnnctl.training.commands:datasets", "Datasets cnnctl can train on."),
    "export": ("cnnctl.export.commands:export", "Export CHECKPOINT to verified ONNX/TorchScript "
               "files plus manifest.json."),
    "serve": ("cnnctl.serving.commands:serve", "Serve exported artifacts over the KServe v2 protocol, "
              "gRPC and REST (Triton-compatible)."),
    "predict": ("cnnctl.clients.commands:predict", "Classify IMAGE files (PNG/JPEG, or folders "
                "of them) on a running server."),
    "bench": ("cnnctl.clients.commands:bench", "Throughput and p50/p90/p99 latency of a running "
              "server at each concurrency level."),
    "health": ("cnnctl.clients.commands:health", "Check a server's gRPC health (for container "
               "health checks); exit 0 when SERVING."),
    "verify": ("cnnctl.clients.commands:verify", "Check that a KServe v2 server answers "
               "ARTIFACT_DIR's golden set as the artifact does."),
    "demo": ("cnnctl.demo:demo", "Train, export, serve and query a model end to end, offline, on "
             "the embedded MNIST sample."),
}

EXIT_USER_ERROR = 2
# Modules the base install leaves out -> the extra that brings them (pyproject.toml).
EXTRA_FOR_MODULE = {"torch": "train", "torchvision": "train", "onnx": "train",
                    "onnxscript": "train"}


def missing_extra(exc: ModuleNotFoundError, command: str | None) -> str | None:
    """The one-line explanation for a module an extra would have installed, else None."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    what = f"cnnctl {command}" if command else "this command"
    return (f"{what} needs {top}, which the base install leaves out (it serves, predicts and "
            f"benches); install the '{extra}' extra: pip install 'cnnctl[{extra}]'")


class LazyGroup(click.Group):
    """click's documented lazy-loading pattern: resolve a subcommand on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[cmd_name][0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("cnnctl"):
                return None  # a stage not installed in this build
            raise
        return getattr(module, attr, None)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own listing, of stand-ins that carry only the summary.
        listing = click.Group(commands={name: click.Command(name, help=summary)
                                        for name, (_, summary) in COMMANDS.items()})
        listing.format_commands(ctx, formatter)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cnnctl")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Train classic CNNs, export verified TorchScript/ONNX artifacts, serve them over KServe v2 gRPC."""
    level = logging.WARNING if quiet else (logging.INFO if verbose < 2 else logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="cnnctl", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except CnnctlError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # One line, as for CnnctlError: click's own adds the usage and a help hint around it.
        hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as exc:
        command = next((a for a in (argv if argv is not None else sys.argv[1:])
                        if a in COMMANDS), None)
        message = missing_extra(exc, command)
        if message is None:
            raise
        click.echo(f"error: {message}", err=True)
        sys.exit(EXIT_USER_ERROR)
