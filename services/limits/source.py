"""YAML read with line numbers, so every configuration error can say where it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Issue:
    """One problem in one file, at a line (0 when the whole file is meant)."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class YamlError(Exception):
    def __init__(self, issue: Issue) -> None:
        super().__init__(str(issue))
        self.issue = issue


@dataclass
class Document:
    """A parsed YAML document and the line of every mapping key and list item in it."""

    file: str
    data: Any
    lines: dict[KeyPath, int]

    def line(self, path: KeyPath) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 0)

    def issue(self, path: KeyPath, message: str) -> Issue:
        return Issue(self.file, self.line(path), ".".join(str(p) for p in path), message)


MAX_NODES = 50_000  # far beyond any real configuration; stops alias bombs


def load_document(text: str, file: str) -> Document:
    """Parse ``text`` safely; a syntax error, a duplicated key, an alias bomb or absurd
    nesting raises YamlError rather than exhausting the service."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError as err:
        raise YamlError(Issue(file, 0, "", "nested too deeply to be a configuration")) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        raise YamlError(
            Issue(file, mark.line + 1 if mark else 0, "", f"not valid YAML: {problem}")
        ) from err
    lines: dict[KeyPath, int] = {}
    constructor = yaml.SafeLoader("")
    budget = [MAX_NODES]
    try:
        data = _convert(node, (), lines, constructor, file, budget) if node is not None else None
    except RecursionError as err:
        raise YamlError(Issue(file, 0, "", "nested too deeply to be a configuration")) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise YamlError(
            Issue(file, mark.line + 1 if mark else 0, "", f"not valid YAML: {err}")
        ) from err
    return Document(file, data, lines)


def _convert(
    node: yaml.Node,
    path: KeyPath,
    lines: dict[KeyPath, int],
    constructor: yaml.SafeLoader,
    file: str,
    budget: list[int],
) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError(
            Issue(file, node.start_mark.line + 1, "", f"more than {MAX_NODES} values (alias bomb?)")
        )
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise YamlError(
                    Issue(file, key_node.start_mark.line + 1, "", "mapping keys must be plain text")
                )
            key = str(key) if not isinstance(key, str) else key
            if key in result:
                dotted = ".".join(str(p) for p in (*path, key))
                raise YamlError(
                    Issue(file, key_node.start_mark.line + 1, dotted, "key appears twice")
                )
            lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _convert(value_node, (*path, key), lines, constructor, file, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            items.append(_convert(item, (*path, i), lines, constructor, file, budget))
        return items
    return constructor.construct_object(node, deep=True)
