"""The typer app: the command tree in the order ``--help`` shows it, and the entry point that turns user mistakes
into one ``error:`` line and exit code 2."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

import urbanprofile
from urbanprofile.apps.r1.cli import r1_app
from urbanprofile.cli.data import attach, build, datasets_info, datasets_list
from urbanprofile.cli.methods import methods_list
from urbanprofile.cli.predict import fit, predict
from urbanprofile.cli.pretrain import pretrain, pretrain_store
from urbanprofile.cli.results import map_command, report
from urbanprofile.cli.run import benchmark, embed, evaluate
from urbanprofile.clikit import err
from urbanprofile.errors import UrbanProfileError

app = typer.Typer(
    help="urbanprofile: urban region profiling with leak-free evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Registered here, in one place, because the order is the one `--help` and the CLI reference list them in.
app.command()(embed)
app.command()(evaluate)
app.command()(benchmark)
app.command()(report)
app.command()(build)
app.command("map")(map_command)
app.command()(attach)
app.command()(fit)
app.command()(predict)
app.command("pretrain-store")(pretrain_store)
app.command()(pretrain)

datasets_app = typer.Typer(help="Datasets found in the data directory.", no_args_is_help=True)
datasets_app.command("list")(datasets_list)
datasets_app.command("info")(datasets_info)
methods_app = typer.Typer(help="Registered methods.", no_args_is_help=True)
methods_app.command("list")(methods_list)
app.add_typer(datasets_app, name="datasets")
app.add_typer(methods_app, name="methods")
app.add_typer(r1_app, name="r1")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"urbanprofile {urbanprofile.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    # Only here for --version; the app's help is the Typer's own.
    pass


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Our own warnings speak to the user: one ``warning:`` line, not Python's ``file.py:89: RuntimeWarning``
    header and a line of our source; other libraries' warnings keep their location (it says whose they are)."""
    if Path(filename).resolve().is_relative_to(Path(urbanprofile.__file__).resolve().parent):
        sys.stderr.write(f"warning: {' '.join(str(message).split())}\n")
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        _main()
    finally:
        warnings.showwarning = previous  # main() also runs inside tests


def _main() -> None:
    try:
        _refuse_repeated_options(sys.argv[1:])
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns an exit code (Ctrl-C: 130) instead of exiting
            sys.exit(code)
    except UrbanProfileError as error:
        message = " ".join(str(error).split())  # always one line
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # the help has been printed: that was the answer
            sys.exit(0)
        if _is_usage_error(error):
            message = " ".join(str(error.format_message()).split())  # type: ignore[attr-defined]
            ctx = getattr(error, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            sys.stderr.write(f"error: {message}{hint}\n")
            sys.exit(2)
        raise


def _refuse_repeated_options(argv: list[str]) -> None:
    """Refuse an option given twice that takes one value: click silently keeps the last one, so
    ``--datasets a --datasets b`` would run ``b`` alone and ``--seeds 0 --seeds 1`` seed 1 alone.

    Raises:
        UrbanProfileError: Naming the option, and how to give several values.
    """
    # Duck-typed: newer typer releases vendor their own copy of click, whose classes are not click's.
    command: Any = typer.main.get_command(app)
    counts: dict[str, int] = {}
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            return
        if token in (getattr(command, "commands", None) or {}):
            command = command.commands[token]
            counts.clear()
            continue
        if not token.startswith("-") or token == "-":
            continue
        name = token.split("=", 1)[0]
        option = next((p for p in command.params if p.param_type_name == "option" and name in p.opts), None)
        if option is None or option.is_flag or option.count:
            continue
        if "=" not in token:
            next(tokens, None)  # its value, which may itself start with '-'
        if option.multiple:
            continue
        counts[option.name] = counts.get(option.name, 0) + 1  # -o and --out are one option
        if counts[option.name] == 2:
            raise UrbanProfileError(f"{name} is given more than once and only the last would count; give it once "
                                    f"(a list of values is one comma-separated argument)")


def _is_usage_error(error: Exception) -> bool:
    """A command-line mistake (unknown option, bad value): click's exceptions, or the copy of click that
    newer typer releases vendor (``typer._click``, whose exceptions are not click's)."""
    import click

    vendored = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    kinds = (click.exceptions.ClickException, *((vendored,) if vendored else ()))
    return isinstance(error, kinds) and callable(getattr(error, "format_message", None))
