"""MkDocs hooks: the CLI reference generated from the typer app, and the benchmark figures as site assets.

Both are produced at build time from the repository itself, so the site never shows a stale copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer.main
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _param_row(param: Any) -> str:
    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    is_option = param.param_type_name == "option"
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    type_name = "flag" if getattr(param, "is_flag", False) else getattr(annotation, "__name__", str(annotation or ""))
    kind = type_name.replace("|", "or") if is_option else "argument"
    default = ""
    if is_option and param.show_default is not False and param.default not in (None, False, ()):
        default = f"`{param.default}`"
    help_text = getattr(param, "help", None) or ""
    required = " (required)" if param.required else ""
    return f"| {names} | {kind}{required} | {default} | {_cell(help_text)} |"


def _command_markdown(command: Any, path: list[str]) -> list[str]:
    """One section per command: its help text, usage and a table of its arguments and options."""
    name = " ".join(path)
    ctx = command.context_class(command, info_name=name)
    lines = [f"{'#' * min(len(path) + 1, 4)} `{name}`", ""]
    if command.help:
        lines += [command.help.split("\f")[0].strip(), ""]
    params = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
    arguments = [p.name.upper() for p in params if p.param_type_name == "argument"]
    sub = " COMMAND [ARGS]..." if hasattr(command, "list_commands") else ""
    lines += ["```text", " ".join([name, "[OPTIONS]", *arguments]) + sub, "```", ""]
    if params:
        lines += ["| argument / option | type | default | help |", "|---|---|---|---|"]
        lines += [_param_row(p) for p in params] + [""]
    if hasattr(command, "list_commands"):  # typer vendors click: duck-type its Group
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                lines += _command_markdown(sub, [*path, sub_name])
    return lines


def cli_reference() -> str:
    """The whole command tree as Markdown (what ``urbanprofile <command> --help`` prints)."""
    from urbanprofile.cli import app

    command = typer.main.get_command(app)
    header = [
        "# Command line",
        "",
        "Generated from the CLI itself when the site is built: every section holds what",
        "`urbanprofile <command> --help` prints, as tables.",
        "",
    ]
    return "\n".join(header + _command_markdown(command, ["urbanprofile"]))


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    for image in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"assets/results/{image.name}", abs_src_path=str(image)))
    return files
