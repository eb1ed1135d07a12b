"""YAML read strictly: a key given twice in one mapping is an error (plain PyYAML keeps the last value),
and every error names the file, line and column."""
from __future__ import annotations

import os
from typing import Any

import yaml

from sidcore.errors import UserError

MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping key given twice; keys merged in with ``<<`` may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def loads(text: str, source: str = "<string>") -> Any:
    """Parse ``text``; a syntax error or a duplicate key raises UserError '<source>, line L, column C: ...'."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = e.problem or e.context or "invalid YAML"
        raise UserError(f"{where}: {problem}") from None


def load(path: str | os.PathLike) -> Any:
    """Parse the YAML file at ``path`` strictly (see ``loads``)."""
    with open(path, encoding="utf-8") as f:
        return loads(f.read(), str(path))
