"""MkDocs hooks: pages generated at build time, so they cannot drift from the code.

- reference/cli.md: every command and option, read from the Typer app itself;
- reference/config.md: every config key with its type, default and the comment beside it in
  `cnnlab.config.schema`;
- index.md, benchmarks.md, reliability.md, developers.md: README.md and the other files kept at the
  repository root, with their links rewritten for the site (a link to a file outside the site
  becomes its path in code).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import click
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
ROOT_PAGES = {"README.md": "index.md", "BENCHMARKS.md": "benchmarks.md", "RELIABILITY.md": "reliability.md",
              "DEVELOPERS.md": "developers.md"}
SITE_LINKS = ROOT_PAGES


def on_files(files: Files, config) -> Files:
    pages = {"reference/cli.md": cli_reference(), "reference/config.md": config_reference()}
    pictures: set[str] = set()
    for source, page in ROOT_PAGES.items():
        pages[page] = site_links((ROOT / source).read_text(), pictures)
    pages["index.md"] = wrapped_opening(pages["index.md"])
    for path, content in pages.items():
        files.append(File.generated(config, path, content=content))
    for picture in sorted(pictures):  # the root pages' pictures (bench/*.png) travel with them
        files.append(File.generated(config, picture, content=(ROOT / picture).read_bytes()))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Pages link the root files as the repository has them (../BENCHMARKS.md); the site has them as pages."""
    for source, target in SITE_LINKS.items():
        markdown = markdown.replace(f"](../{source}", f"]({target}")
    return markdown


# ------------------------------------------------------------------------------------ root pages
def wrapped_opening(text: str) -> str:
    """The README's opening commands (one long line each, to paste as one) marked `.wrap`, so the home page
    wraps them inside their block (stylesheets/extra.css) instead of hiding their end behind a scrollbar."""
    opening, heading, rest = text.partition("\n## ")
    return opening.replace("```bash\n", "```{.bash .wrap}\n") + heading + rest


LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def site_links(text: str, pictures: set[str] | None = None) -> str:
    """Links as the site has them: docs/x.md -> x.md, BENCHMARKS.md -> benchmarks.md; pictures elsewhere in
    the repository are added to `pictures` (to be copied into the site) and kept; other links become code."""
    def fix(match: re.Match) -> str:
        bang, label, target = match.groups()
        if target.startswith(("http://", "https://", "#", "mailto:")):
            return match.group(0)
        path, _, anchor = target.partition("#")
        if path.startswith("docs/"):
            path = path.removeprefix("docs/")
        elif path in SITE_LINKS:
            path = SITE_LINKS[path]
        elif bang and pictures is not None and not path.startswith("..") and (ROOT / path).is_file():
            pictures.add(path)
        elif bang or not (ROOT / "docs" / path).exists():
            return f"{label} (`{target}` in the repository)" if label != target else f"`{target}`"
        return f"{bang}[{label}]({path}{'#' + anchor if anchor else ''})"

    return LINK.sub(fix, text)


# ------------------------------------------------------------------------------------ command line
def cli_reference() -> str:
    from typer.main import get_command

    from cnnlab.cli import app

    root = get_command(app)
    lines = ["# Command line reference", "",
             "Generated from the command line itself when the site is built: every command, argument and "
             "option, with its default. `cnnlab COMMAND --help` prints the same.", ""]
    from cnnlab.cli import _app

    by_panel: dict[str, list[tuple[str, click.Command]]] = {panel: [] for panel in _app.PANELS}
    for name, command in commands(root):
        by_panel.setdefault(getattr(command, "rich_help_panel", None) or "Other", []).append((name, command))
    for panel, entries in by_panel.items():
        if not entries:
            continue
        lines += [f"## {panel}", ""]
        for name, command in entries:
            lines += command_section(name, command)
    return "\n".join(lines) + "\n"


def commands(group: click.Group, prefix: str = "cnnlab") -> list[tuple[str, click.Command]]:
    """(full name, command) for every command under `group`, subcommands after their group, in help order."""
    ctx = click.Context(group)
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None:
            continue
        full = f"{prefix} {name}"
        if hasattr(command, "commands"):  # a group (Typer ships its own copy of click: no isinstance)
            panel = getattr(command, "rich_help_panel", None)
            for sub_name, sub in commands(command, full):
                sub.rich_help_panel = panel  # subcommands are listed under their group's panel
                found.append((sub_name, sub))
            if command.invoke_without_command:
                found.insert(len(found) - len(command.commands), (full, command))
        else:
            found.append((full, command))
    return found


def command_section(name: str, command: click.Command) -> list[str]:
    help_text = inspect.cleandoc(command.help or "").replace("\b\n", "")
    arguments = [p.name.upper() for p in command.params if is_argument(p)]
    usage = " ".join([name, *arguments, "[OPTIONS]"])
    lines = [f"### `{name}`", "", help_text, "", f"```\n{usage}\n```", ""]
    rows = [param_row(p) for p in command.params if p.name != "help" and not getattr(p, "hidden", False)]
    if rows:
        lines += ["| argument / option | what | default |", "| --- | --- | --- |", *rows, ""]
    return lines


def is_argument(param: click.Parameter) -> bool:
    return param.param_type_name == "argument"


def param_row(param: click.Parameter) -> str:
    if is_argument(param):
        names = f"`{param.name.upper()}`"
        what = getattr(param, "help", "") or ""
    else:
        option = typing.cast(click.Option, param)
        names = ", ".join(f"`{o}`" for o in [*option.opts, *option.secondary_opts])
        what = option.help or ""
    default = param.default
    if default is None or default == () or param.required or callable(default):
        shown = "required" if param.required else ""
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = f"`{getattr(default, 'value', default)}`"
    return f"| {names} | {escape_cell(what)} | {shown} |"


def escape_cell(text: str) -> str:
    """One line for a table cell: rich's escaped brackets plain again, pipes escaped, and angle brackets
    outside `code` kept from reading as HTML."""
    pieces = " ".join(text.split()).replace("\\[", "[").replace("|", "\\|").split("`")
    return "`".join(piece if i % 2 else piece.replace("<", "&lt;").replace(">", "&gt;")
                    for i, piece in enumerate(pieces))


# ------------------------------------------------------------------------------------ config keys
def config_reference() -> str:
    from cnnlab.config import schema

    lines = ["# Config keys", "",
             "Generated from `cnnlab.config.schema` when the site is built: every key a config file, a preset or "
             "`--set` can give, its type, its default and what it means. `cnnlab presets NAME` prints a preset to "
             "start from; [Models and configs](../models.md) explains knobs and overrides.", ""]
    sections = [("data", schema.DataConfig), ("model", schema.ModelConfig), ("model.conv[]", schema.ConvBlock),
                ("model.stages[]", schema.ResidualStage), ("model.dense[]", schema.DenseLayer),
                ("train", schema.TrainConfig), ("train.early_stopping", schema.EarlyStopping)]
    for prefix, cls in sections:
        doc = inspect.cleandoc(cls.__doc__ or "")
        comments = field_comments(cls)
        lines += [f"## `{prefix}`", "", doc, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else "required")
            lines.append(f"| `{field.name}` | {escape_cell(type_text(hints[field.name]))} | `{default!r}` | "
                         f"{escape_cell(comments.get(field.name, ''))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment on its line (or on the comment lines just above it) in the source."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+): [^=]+?(?:= .*?)?(?:\s+#\s*(.*))?$", stripped)
        if match and not stripped.startswith(("def ", "return", '"""')):
            comments[match.group(1)] = " — ".join(text for text in (" ".join(above), match.group(2) or "") if text)
        above = []
    return comments


def type_text(hint: object) -> str:
    text = str(hint).replace("typing.", "").replace("cnnlab.config.schema.", "").replace("<class '", "")
    return "`" + text.replace("'>", "").replace("NoneType", "None") + "`"
