#!/usr/bin/env python3
"""Regenerate the docs' tables that mirror code, so that each exists in one place: the code.

    scripts/gen_docs.py           rewrite every generated table in README.md and docs/*.md
    scripts/gen_docs.py --check   change nothing; exit 1 listing the files whose tables are stale

A generated table sits between two marker comments in a Markdown page:

    <!-- generated: timeouts (scripts/gen_docs.py; do not edit by hand) -->
    ...
    <!-- end generated -->

and everything between them is replaced by the output of the table's generator below:

- `timeouts`: the task budgets, from `operators/timeouts.py` (`BUDGETS`, with each entry's comment);
- `settings`: the `[gfocal]` keys, from the docstring of `operators/settings.py`, checked against the
  fields of `GfocalSettings` (a field missing from the docstring is an error, not a silent gap);
- `run-options`: the trigger forms' and the CLI's run options, from
  `gfocal_pipeline.run_config.form_options(ascend=True)` (each `OptionSpec`'s title, description,
  default and bounds) and the `gfocal` parser (`gfocal_pipeline.cli.build_parser`).

No Airflow import: `tests/test_docs.py` runs `--check` in CI, so a stale table fails the tests.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import io
import os
import re
import sys
import textwrap
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(
    r"(?P<start><!-- generated: (?P<name>[\w-]+)[^>]*-->\n)(?P<body>.*?)(?P<end><!-- end generated -->)",
    re.DOTALL,
)
START_TEXT = "<!-- generated: {name} (scripts/gen_docs.py; do not edit by hand) -->"


def pages(root: Path = ROOT) -> list[Path]:
    """The Markdown pages that may hold generated tables."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, `|` escaped, and `<` outside code spans (so that
    `<work_dir>` is shown, not taken for an HTML tag)."""
    parts = " ".join(str(text).split()).split("`")
    parts[::2] = [re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part) for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _note(text: str) -> str:
    """A paragraph after a table, wrapped like the hand-written pages."""
    return "\n" + textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --- timeouts ------------------------------------------------------------------------------------


def _line_comments(path: Path) -> dict[int, str]:
    """{line number: the text of the comment ending that line} of a Python source file."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}


def _budget_comments(path: Path) -> dict[str, str]:
    """{kind: the comment on its line} of the `BUDGETS = {...}` literal in `path`."""
    comments = _line_comments(path)
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "BUDGETS" and isinstance(node.value, ast.Dict):
            return {
                key.value: comments.get(key.lineno, "")
                for key in node.value.keys
                if isinstance(key, ast.Constant)
            }
    raise SystemExit(f"{path}: no `BUDGETS: dict[...] = {{...}}` literal found")


def _load_file(name: str, path: Path) -> Any:
    """A module from its file, without its package's `__init__` (`operators/__init__.py` imports
    Airflow; `operators/timeouts.py` itself does not)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timeouts_table() -> str:
    timeouts = _load_file("_gfocal_timeouts", ROOT / "operators" / "timeouts.py")
    comments = _budget_comments(ROOT / "operators" / "timeouts.py")
    rows = []
    for kind, budget in timeouts.BUDGETS.items():
        text = f"{_number(budget.minutes)} min"
        if budget.seconds_per_image:
            text += f" + {_number(budget.seconds_per_image)} s per image"
        rows.append([f"`{kind}`", text, comments.get(kind, "")])
    return _table(["task kind", "budget (× `task_timeout_scale`)", "note (from the code)"], rows) + _note(
        f"Images not known when the DAG is parsed count as `FULL_SET_IMAGES` = "
        f"{timeouts.FULL_SET_IMAGES}. Source: `operators/timeouts.py` (`BUDGETS`)."
    )


# --- settings ------------------------------------------------------------------------------------

_KEY_LINE = re.compile(r"^(?P<key>[a-z_][a-z0-9_]*(?:(?:, | / )[a-z_][a-z0-9_]*)*)(?:\s+(?P<text>.*))?$")


def _split_default(text: str) -> tuple[str, str]:
    """("meaning", "default") of a docstring entry: its `(default ...)` parenthesis taken out."""
    start = text.find("(default")
    if start < 0:
        return text, ""
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            break
    default = text[start + 1 : end].removeprefix("default").lstrip(":").strip()
    before, after = text[:start].rstrip(), text[end + 1 :].lstrip()
    return (before + ("" if after[:1] in ("", ",", ".", ";") else " ") + after).strip(), default


def settings_entries(doc: str) -> list[tuple[str, str]]:
    """[(key or "" for a group heading, text)] of the settings docstring, in its order."""
    entries: list[tuple[str, str]] = []
    for line in doc.splitlines()[1:]:
        if not line.strip():
            continue
        match = _KEY_LINE.match(line)
        if line.startswith(" ") and entries:
            key, text = entries[-1]
            entries[-1] = (key, (text + " " + line.strip()).strip())
        elif match:
            entries.append((match["key"], match["text"] or ""))
        else:  # a group heading such as "Retries and timeouts (...):"
            entries.append(("", line.strip()))
    return entries


def _settings_source() -> tuple[str, set[str], tuple[str, ...]]:
    """The docstring, the field names of `GfocalSettings` and `DATA_KEYS`, read without importing."""
    tree = ast.parse((ROOT / "operators" / "settings.py").read_text())
    doc = ast.get_docstring(tree) or ""
    fields: set[str] = set()
    data_keys: tuple[str, ...] = ()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "GfocalSettings":
            fields = {
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "DATA_KEYS" for t in node.targets
        ):
            data_keys = tuple(ast.literal_eval(node.value))
    return doc, fields, data_keys


def settings_keys() -> set[str]:
    """Every `[gfocal]` key the settings docstring documents."""
    doc, _, _ = _settings_source()
    return {key for keys, _ in settings_entries(doc) for key in re.split(r", | / ", keys) if key}


def settings_table() -> str:
    doc, fields, data_keys = _settings_source()
    documented = settings_keys()
    if not fields or not data_keys:
        raise SystemExit("operators/settings.py: no `GfocalSettings` class or `DATA_KEYS` tuple found")
    missing = sorted(key for key in (fields - {"run_defaults"}) | set(data_keys) if key not in documented)
    if missing:
        raise SystemExit(
            f"operators/settings.py: GfocalSettings reads {missing} but its docstring does not document "
            "them; add them to the module docstring (the source of docs/settings.md)"
        )
    out, rows = [], []
    for key, text in settings_entries(doc):
        if not key:  # a group heading: close the table, write the heading as a paragraph
            if rows:
                out.append(_table(["key", "meaning", "default"], rows))
                rows = []
            head, _, rest = text.rstrip(":").partition(" (")
            out.append(f"**{head}**" + (f" ({rest}:" if rest else ":") + "\n")
            continue
        meaning, default = _split_default(text)
        keys = ", ".join(f"`{k}`" for k in re.split(r", | / ", key))
        rows.append([keys, meaning, default])
    if rows:
        out.append(_table(["key", "meaning", "default"], rows))
    return "\n".join(out) + _note("Source: the docstring of `operators/settings.py` (`GfocalSettings`).")


# --- run options ---------------------------------------------------------------------------------

# hand-written `gfocal` flags with the run option's meaning (checked below to exist)
SAME_MEANING = {"device": ("infer",), "keep_candidates": ("infer",)}
WORK_DIR_PLACEHOLDER = "$GFOCAL_WORK_DIR"


def _cli_flags() -> dict[str, dict[str, list[str]]]:
    """{option name: {flag: [subcommands]}} of the `gfocal` flags generated from a run option's spec,
    plus those of `SAME_MEANING`."""
    from gfocal_pipeline.cli import build_parser
    from gfocal_pipeline.run_config import option_spec

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found: dict[str, dict[str, list[str]]] = {}
    for command, parser in sub.choices.items():
        for action in parser._actions:
            name, flags = action.dest, [s for s in action.option_strings if s.startswith("--")]
            if not flags:
                continue
            try:
                generated = (action.help or "").startswith(option_spec(name).description.replace("%", "%%"))
            except KeyError:
                continue
            if generated or command in SAME_MEANING.get(name, ()):
                found.setdefault(name, {}).setdefault(flags[0], []).append(command)
    for name, commands in SAME_MEANING.items():
        present = {command for cmds in found.get(name, {}).values() for command in cmds}
        absent = [c for c in commands if c not in present]
        if absent:
            raise SystemExit(f"scripts/gen_docs.py: SAME_MEANING names `gfocal {absent[0]} --{name}`, gone")
    return found


def _default(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{_number(value)}`"
    return f"`{value}`"


def _values(spec: Any) -> str:
    from gfocal_pipeline.options import Choice

    parts = []
    if issubclass(spec.kind, Choice) or spec.choices:
        choices = spec.kind.values() if issubclass(spec.kind, Choice) else (spec.allowed() or ())
        parts.append(", ".join(f"`{v}`" for v in choices))
    elif spec.kind is bool:
        parts.append("true / false")
    elif spec.path:
        parts.append("absolute path")
    elif spec.subpath:
        parts.append("relative path inside the COCO root")
    elif spec.pattern:
        parts.append(f"`{spec.pattern}`")
    else:
        parts.append({int: "integer", float: "number", str: "text"}[spec.kind])
    bounds = [
        f"≥ {_number(spec.minimum)}" if spec.minimum is not None else "",
        f"> {_number(spec.exclusive_minimum)}" if spec.exclusive_minimum is not None else "",
        f"≤ {_number(spec.maximum)}" if spec.maximum is not None else "",
        f"< {_number(spec.exclusive_maximum)}" if spec.exclusive_maximum is not None else "",
        f"multiple of {spec.multiple_of}" if spec.multiple_of else "",
    ]
    text = " ".join([parts[0], ", ".join(b for b in bounds if b)]).strip()
    return text + (", or empty" if spec.nullable else "")


def _work_dir_rule() -> str:
    from gfocal_pipeline.workspace import default_work_dir

    return " ".join((default_work_dir.__doc__ or "").split())


def run_options_table() -> str:
    os.environ["GFOCAL_WORK_DIR"] = WORK_DIR_PLACEHOLDER  # machine-independent demo defaults
    from gfocal_pipeline import run_config

    every = run_config.form_options(ascend=True)
    nightly_only = set(every) - set(run_config.form_options(ascend=False))
    section_of = getattr(run_config, "SECTION_OF", None) or {
        item.name: group for group, cls in run_config.GROUPS.items() for item in dataclasses.fields(cls)
    }
    flags = _cli_flags()
    out: list[str] = []
    sections: dict[str, list[list[str]]] = {}
    for name, (default, spec) in every.items():
        section = str(section_of.get(name, "other"))
        sections.setdefault(section, []).append([name, spec, default])
    for section, items in sections.items():
        whole = {name for name, _, _ in items} <= nightly_only
        rows = []
        for name, spec, default in items:
            cli = "; ".join(f"`{flag}` ({', '.join(cmds)})" for flag, cmds in flags.get(name, {}).items())
            label = f"`{name}`" + (" (nightly only)" if name in nightly_only and not whole else "")
            rows.append([label, spec.title, spec.description, _default(default), _values(spec), cli or "—"])
        notes = [
            "the form's open section" if section == getattr(run_config, "DEFAULT_SECTION", None) else "",
            "`gfocal_ascend_nightly` only" if whole else "",
        ]
        note = "; ".join(n for n in notes if n)
        out.append(f"**{section[:1].upper() + section[1:]}**" + (f" ({note})" if note else "") + "\n")
        out.append(_table(["option", "form title", "meaning", "default", "values", "`gfocal` flag"], rows))
    return "\n".join(out) + _note(
        f"`{WORK_DIR_PLACEHOLDER}` in a default is the work directory: {_work_dir_rule()} "
        "Source: `gfocal_pipeline.run_config.form_options(ascend=True)` and "
        "`gfocal_pipeline.cli.build_parser()`."
    )


GENERATORS: dict[str, Callable[[], str]] = {
    "timeouts": timeouts_table,
    "settings": settings_table,
    "run-options": run_options_table,
}


def render(text: str, tables: dict[str, str], where: str) -> str:
    """`text` with every generated block's body replaced by its table."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in tables:
            raise SystemExit(f"{where}: unknown generated table {name!r} (known: {', '.join(tables)})")
        return START_TEXT.format(name=name) + "\n" + tables[name] + match["end"]

    return MARKER.sub(replace, text)


def update(root: Path, tables: dict[str, str], *, write: bool) -> tuple[list[str], list[str]]:
    """(pages whose generated tables differ from `tables`, names of tables on no page) under `root`;
    with `write`, the stale pages are rewritten."""
    stale, placed = [], set()
    for path in pages(root):
        text = path.read_text()
        placed |= {match["name"] for match in MARKER.finditer(text)}
        new = render(text, tables, str(path.relative_to(root)))
        if new != text:
            stale.append(str(path.relative_to(root)))
            if write:
                path.write_text(new)
    return stale, sorted(set(tables) - placed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 listing stale files; write nothing")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "include"), str(ROOT)]  # this checkout, not an installed copy
    tables = {name: make() for name, make in GENERATORS.items()}
    stale, unplaced = update(ROOT, tables, write=not args.check)
    for name in unplaced:
        print(f"generated table {name!r} is on no page (add its markers to a docs page)", file=sys.stderr)
    for name in stale:
        if args.check:
            print(f"{name}: generated table(s) out of date; run scripts/gen_docs.py", file=sys.stderr)
        else:
            print(f"updated {name}")
    return 1 if unplaced or (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
