"""CLI options built from the analyses' configs: one place holds each default and its help.

A ``sonde run`` verb declares an option that mirrors a config field with :func:`config_option`
(``tau: float = config_option("routes", "tau")``): its default and help come from that field's
:func:`analyses.core.base.option` (or its trailing comment), and its ``Literal`` choices are listed in
the help. The configs are read from their module's source (``ast``), not imported, so that the CLI
stays free of torch until a verb runs; a test checks each default against the imported config.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

__all__ = ["FieldSpec", "config_fields", "config_option", "cli_default"]

NOT_STATIC = object()  # a default that is not a literal (built at import time)


@dataclass(frozen=True)
class FieldSpec:
    """A config field as written in its source: name, default, help line and ``Literal`` choices."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()


def _literal(node: ast.AST | None) -> Any:
    if node is None:
        return NOT_STATIC
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NOT_STATIC


def _choices(node: ast.AST, aliases: dict[str, ast.AST]) -> tuple[Any, ...]:
    """``Literal[...]`` values of an annotation (through a module-level alias, inside ``X | None``)."""
    if isinstance(node, ast.Name) and node.id in aliases:
        return _choices(aliases[node.id], aliases)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _choices(node.left, aliases) or _choices(node.right, aliases)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return tuple(_literal(e) for e in elts)
    return ()


@functools.cache
def config_fields(module: str, cls: str = "Config") -> dict[str, FieldSpec]:
    """The fields of ``analyses.<module>.<cls>`` (with those of its bases, in the same module or imported from a
    sibling analysis module, ``from .routes import Config``), read from the source without importing it."""
    spec = importlib.util.find_spec(f"analyses.{module}")
    if spec is None or spec.origin is None:
        raise ValueError(f"no module analyses.{module}")
    src = Path(spec.origin).read_text(encoding="utf-8")
    tree = ast.parse(src)
    lines = src.splitlines()
    aliases = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
               for t in node.targets if isinstance(t, ast.Name)}
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    if cls not in classes:
        raise ValueError(f"analyses.{module} has no class {cls}")
    imported = {a.asname or a.name: (node.module, a.name) for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and "." not in node.module
                for a in node.names}
    out: dict[str, FieldSpec] = {}
    for base in classes[cls].bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out.update(config_fields(module, base.id))
        elif isinstance(base, ast.Name) and base.id in imported:
            out.update(config_fields(*imported[base.id]))
    for node in classes[cls].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or node.value is None:
            continue
        value, help_text = node.value, ""
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("option", "field"):
            kw = {k.arg: k.value for k in value.keywords}
            default = _literal(value.args[0]) if value.args else _literal(kw.get("default"))
            help_text = _literal(kw["help"]) if "help" in kw else ""
        else:
            default = _literal(value)
        if not help_text:  # the field's trailing comment
            line = lines[node.lineno - 1]
            help_text = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        out[node.target.id] = FieldSpec(node.target.id, default, str(help_text), _choices(node.annotation, aliases))
    return out


def cli_default(default: Any) -> Any:
    """A config default as the CLI takes it: tuples as comma-separated text (``(0, 1)`` -> ``"0,1"``)."""
    if isinstance(default, tuple):
        return ",".join(str(x) for x in default)
    return default


def config_option(module: str, name: str, *flags: str, cls: str = "Config", help: str | None = None, **kw: Any) -> Any:
    """A ``typer.Option`` mirroring field ``name`` of ``analyses.<module>.<cls>``: same default, the field's help.

    ``flags`` default to ``--name`` (``--name/--no-name`` for booleans); ``help`` replaces the field's help.
    """
    f = config_fields(module, cls).get(name)
    if f is None:
        raise ValueError(f"analyses.{module}.{cls} has no field {name!r}")
    if f.default is NOT_STATIC:
        raise ValueError(f"the default of analyses.{module}.{cls}.{name} is not a literal; the CLI cannot mirror it")
    flag = "--" + name.replace("_", "-")
    if not flags:
        flags = (f"{flag}/--no-{name.replace('_', '-')}",) if isinstance(f.default, bool) else (flag,)
    text = help if help is not None else f.help
    if f.choices and not all(str(c) in text for c in f.choices):
        text = f"{text} One of: {', '.join(str(c) for c in f.choices)}.".strip()
    return typer.Option(cli_default(f.default), *flags, help=text, **kw)
