"""YAML read strictly: a key given twice in one mapping is an error (plain PyYAML keeps the last value),
every error names the file, line and column, and a file too large or whose aliases expand too far is
refused before anything is built from it."""
from __future__ import annotations

import os
import re
from typing import Any

import yaml

from sidcore.errors import UserError

MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_BYTES = 1 << 20  # a YAML file the pipeline reads (config.yaml ~27 kB) is far smaller than 1 MiB
MAX_NODES = 100_000  # values after alias expansion (config.yaml ~3,000): a nested-alias "bomb" stops here


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping key given twice; keys merged in with ``<<`` may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1}): a mapping holds a key "
                    "once; keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node | None, source: str) -> int:
    """The number of values ``node`` stands for once every alias is written out (shared nodes counted once per use)."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            if sizes[id(n)] < 0:
                raise UserError(f"{source}, line {n.start_mark.line + 1}: an alias refers to a value that contains it")
            return sizes[id(n)]
        sizes[id(n)] = -1
        children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
            n.value if isinstance(n, yaml.SequenceNode) else []
        sizes[id(n)] = 1 + sum(size(c) for c in children)
        return sizes[id(n)]

    return 0 if node is None else size(node)


def loads(text: str, source: str = "<string>") -> Any:
    """Parse ``text``; a syntax error, a duplicate key or an expansion past ``MAX_NODES`` raises UserError
    '<source>, line L, column C: ...'."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if (n := expanded_size(node, source)) > MAX_NODES:
            raise UserError(f"{source}: its aliases expand to {n:,} values, more than the {MAX_NODES:,} a "
                            "configuration may have; write the values out or use fewer nested aliases")
        return None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise UserError(f"{where}: {_problem(e)}") from None
    except yaml.YAMLError as e:  # e.g. a control character the reader refuses
        raise UserError(f"{source}: not readable as YAML ({e})") from None
    finally:
        loader.dispose()


def _problem(e: yaml.MarkedYAMLError) -> str:
    """What is wrong, with both places where the reader names two (a duplicate anchor's first definition)."""
    anchor = re.match(r"found duplicate anchor '?([^';]+)'?; first occurrence", e.context or "")
    if anchor and e.context_mark is not None:
        name = anchor.group(1)
        return (f"anchor &{name} is defined again (first at line {e.context_mark.line + 1}); an anchor names one "
                f"value: give this one another name, or drop it and refer to the first as *{name}")
    if e.context and e.problem and e.context_mark is not None and e.problem_mark is not None:
        return f"{e.problem} ({e.context} at line {e.context_mark.line + 1})"
    return e.problem or e.context or "invalid YAML"


def load(path: str | os.PathLike) -> Any:
    """Parse the YAML file at ``path`` strictly (see ``loads``); a file past ``MAX_BYTES``, not UTF-8 or not
    readable is refused naming it."""
    try:
        if (size := os.path.getsize(path)) > MAX_BYTES:
            raise UserError(f"{path}: {size:,} bytes, more than the {MAX_BYTES:,} a YAML file here may have")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                        "save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    return loads(text, str(path))
