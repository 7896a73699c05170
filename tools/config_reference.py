"""Write docs/configuration.md, the configuration reference, from the typed schema and its field comments.

    python tools/config_reference.py          # (re)write docs/configuration.md
    python tools/config_reference.py --check  # exit 1 if docs/configuration.md differs from what this would write

Nothing here names a config class: the root is the dataclass of `llmft.config.schema` that no other dataclass
holds (the one Hydra composes onto), and the tree is walked from it with `dataclasses.fields` and
`typing.get_type_hints`. A field's description is its trailing comment, else the block of comment lines just above
it (read from the class's source with `ast` and `tokenize`); an enum's values and their comments the same way. The
options of each group are the files of `conf/GROUP/`, its default option the `defaults` list of
`conf/config.yaml`. Run it again after any change to the schema, its comments or the config groups.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "configuration.md"
SCHEMA_MODULE = "llmft.config.schema"
STALE = "docs/configuration.md is stale: run python tools/config_reference.py"


# ---------------------------------------------------------------------------------------------------- comments

def _comments_by_line(source: str) -> dict[int, str]:
    """Line number (1-based, in `source`) -> the text of the comment on that line."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def _code_lines(source: str) -> set[int]:
    """Lines that hold something other than a comment or blank space."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def member_comments(cls: type) -> dict[str, str]:
    """Name -> comment of each assignment in the body of `cls` (a dataclass field or an enum member): the comment
    at the end of its first line, else the comment lines directly above it (no blank line between)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments, code = _comments_by_line(source), _code_lines(source)
    tree = ast.parse(source)
    found = {}
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        if node.lineno in comments:
            found[name] = comments[node.lineno]
            continue
        above, line = [], node.lineno - 1
        while line in comments and line not in code:
            above.insert(0, comments[line])
            line -= 1
        if above:
            found[name] = " ".join(above)
    return found


def class_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    if not doc or (dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "(")):
        return ""  # dataclasses write a signature as the docstring of an undocumented class
    return " ".join(inspect.cleandoc(doc).split())


# ---------------------------------------------------------------------------------------------------- types

def _strip_optional(hint):
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def type_name(hint) -> str:
    hint, optional = _strip_optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        name = " | ".join(str(member.value) for member in hint)
    elif origin in (list, tuple, set, dict):
        name = f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    elif origin in (typing.Union, types.UnionType):
        name = " or ".join(type_name(a) for a in args)
    elif isinstance(hint, type):
        name = hint.__name__
    else:
        name = str(hint).replace("typing.", "")
    return f"{name} or null" if optional else name


def _dataclass_in(hint) -> tuple[type | None, str]:
    """The dataclass a field holds, directly ("") or as the items of a list ("[]") or the values of a dict."""
    hint, _ = _strip_optional(hint)
    if dataclasses.is_dataclass(hint):
        return hint, ""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1], ".<name>"
    return None, ""


# ---------------------------------------------------------------------------------------------------- values

MISSING_TEXT = "required"
KEYS_BELOW = "(keys below)"


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flow(value) -> str:
    """A YAML-like one-line value, the way it is written on the command line."""
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return str(value)


def default_text(field: dataclasses.Field) -> str:
    from omegaconf import MISSING

    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return MISSING_TEXT
    if value == MISSING:
        return MISSING_TEXT
    if dataclasses.is_dataclass(value):
        return "(the keys below)"
    return _code(_flow(_plain(value)))


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _cell(text: str) -> str:
    """Table cell text: pipes escaped, and `<` so that <EMAIL> is not taken for an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


# ---------------------------------------------------------------------------------------------------- the walk

def root_config(module) -> type:
    """The dataclass of `module` that no other dataclass of the schema holds: the composed config."""
    classes = [c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    held = set()
    for cls in classes:
        for hint in typing.get_type_hints(cls).values():
            inner, _ = _dataclass_in(hint)
            if inner is not None:
                held.add(inner)
            for arg in typing.get_args(_strip_optional(hint)[0]):
                if dataclasses.is_dataclass(arg):
                    held.add(arg)
        held.update(base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base))
    roots = [c for c in classes if c not in held and c.__module__ == module.__name__]
    if not roots:
        raise SystemExit(f"no root dataclass in {module.__name__}")
    return max(roots, key=lambda c: len(dataclasses.fields(c)))


def _own_fields(cls: type) -> list[dataclasses.Field]:
    """A subclass (a mixture source is a data config plus two keys) lists only what it adds or redefines."""
    bases = [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)]
    if not bases:
        return list(dataclasses.fields(cls))
    own = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in own]


def tables(cls: type, prefix: str, seen: tuple = ()) -> list[tuple[str, type, list[list[str]]]]:
    """(key prefix, class, rows) for `cls` and, after it, every dataclass it holds, depth first."""
    hints = typing.get_type_hints(cls)
    comments = member_comments(cls)
    rows, nested = [], []
    for field in _own_fields(cls):
        hint = hints[field.name]
        key = f"{prefix}.{field.name}" if prefix else field.name
        inner, suffix = _dataclass_in(hint)
        description = comments.get(field.name, "")
        if inner is not None and inner not in seen:
            kind = {"": KEYS_BELOW, "[]": "list (keys below)", ".<name>": "dict: name -> (keys below)"}[suffix]
            rows.append([f"`{key}`", kind, default_text(field),
                         _cell(description)])
            nested.append((f"{key}{suffix}", inner))
        else:
            rows.append([f"`{key}`", _cell(type_name(hint)), default_text(field), _cell(description)])
    out = [(prefix, cls, rows)]
    for key, inner in nested:
        out += tables(inner, key, seen + (cls,))
    return out


def enums_of(root: type) -> dict[type, list[str]]:
    """Each enum the config uses -> the keys that take it."""
    found: dict[type, list[str]] = {}

    def visit(cls, prefix, seen):
        for name, hint in typing.get_type_hints(cls).items():
            key = f"{prefix}.{name}" if prefix else name
            plain, _ = _strip_optional(hint)
            for candidate in (plain, *typing.get_args(plain)):
                if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
                    found.setdefault(candidate, [])
                    if key not in found[candidate]:
                        found[candidate].append(key)
            inner, suffix = _dataclass_in(hint)
            if inner is not None and inner not in seen:
                visit(inner, key + suffix, seen | {inner})

    visit(root, "", {root})
    return found


# ---------------------------------------------------------------------------------------------------- groups

def group_options(conf: Path) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """The options of each config group (files in conf/GROUP/), the default option of each (config.yaml's
    defaults list) and the top-level values config.yaml sets."""
    import yaml

    options = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf.iterdir()) if d.is_dir()}
    main = yaml.safe_load((conf / "config.yaml").read_text()) or {}
    defaults = {}
    for entry in main.get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not group.startswith("override "):
                    defaults[group] = str(option)
    top = {k: _flow(v) for k, v in main.items() if k not in ("defaults", "hydra") and not isinstance(v, dict)}
    return options, defaults, top


# ---------------------------------------------------------------------------------------------------- the page

HEADER = """\
# Configuration reference

<!-- Generated by tools/config_reference.py from the schema's field comments: do not edit by hand. After a change
to the schema or to the config groups run `python tools/config_reference.py`; tests/project/test_docs.py fails while
this page is stale. -->

`conf/config.yaml` composes one option of each group; override a group with `group=option` and a key with
`group.key=value` (`+group=option` for a group that is not in the defaults). Every key below is typed: an unknown
key or a wrong type stops at launch, on the login node, with one line naming it. The defaults are the schema's; a
group option (a file `conf/GROUP/OPTION.yaml`) sets its own values over them (`--cfg job` prints the composed
result). "required" marks a key that has no default (`???`): the group option or the command line must set it.
"""


def render() -> str:
    sys.path.insert(0, str(REPO))
    module = importlib.import_module(SCHEMA_MODULE)
    root = root_config(module)
    conf = REPO / "conf"
    options, defaults, top_values = group_options(conf) if (conf / "config.yaml").is_file() else ({}, {}, {})

    all_tables = tables(root, "")
    top_prefix, _, top_rows = all_tables[0]
    lines = [HEADER]
    if class_doc(root):
        lines += [class_doc(root), ""]

    lines += ["## Groups", "", "| group | options | default |", "|---|---|---|"]
    group_names = [row[0].strip("`") for row in top_rows if row[1] == KEYS_BELOW]
    for group in [g for g in group_names if g in options]:
        listed = ", ".join(f"`{o}`" for o in options.get(group, [])) or "(none: set its keys)"
        default = defaults.get(group) or defaults.get(f"/{group}")
        lines.append(f"| `{group}` | {listed} | {f'`{default}`' if default else f'none (`+{group}=OPTION`)'} |")
    lines.append("")

    lines += ["## Top-level keys", "", "| key | type | default | description |", "|---|---|---|---|"]
    for key, type_text, default, description in top_rows:
        if type_text == KEYS_BELOW:
            continue
        name = key.strip("`")
        if name in top_values:
            default = f"{_code(top_values[name])} (config.yaml)"
        lines.append(f"| {key} | {type_text} | {default} | {description} |")
    lines.append("")

    prefix_of = {}
    for prefix, cls, _ in all_tables[1:]:
        prefix_of.setdefault(cls, prefix)
    for prefix, cls, rows in all_tables[1:]:
        lines += [f"## `{prefix}`", ""]
        doc = class_doc(cls)
        if doc:
            lines += [doc, ""]
        bases = [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)]
        if bases:
            where = prefix_of.get(bases[0])
            lines += [f"Every key of {f'`{where}`' if where else bases[0].__name__}, and:", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        lines.append("")

    described = {cls: keys for cls, keys in enums_of(root).items() if member_comments(cls)}
    if described:
        lines += ["## Values", "", "What the values of the keys that take one of a fixed set mean.", ""]
        for cls, keys in described.items():
            comments = member_comments(cls)
            lines += [f"### {', '.join(f'`{k}`' for k in keys)}", "", "| value | meaning |", "|---|---|"]
            lines += [f"| `{m.value}` | {_cell(comments.get(m.name, ''))} |" for m in cls]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(STALE, file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
