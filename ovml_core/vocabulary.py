"""Vocabularies: the labels a label bank is built for, read from text, CSV or YAML files.

Formats (chosen by suffix):
- `.txt` (or anything else): one label per line.
- `.csv` / `.tsv`: a header row with a `label` column; optional `type` and `description`.
- `.yaml` / `.yml`: a list of labels or of mappings `{label, type, description}`, or a mapping
  `{type: [labels...]}` that groups labels by type.

Validation never silently changes what a label means. Labels are normalised (Unicode NFC,
whitespace runs collapsed, ends stripped); empty entries, duplicates after normalisation and
control characters are reported and skipped or removed. Only a label that cannot be encoded at
all (undecodable bytes, longer than the CLIP text context) is fatal, and the error names the line.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Zero-width (non-)joiners are format characters that real scripts and emoji sequences need.
_KEPT_FORMAT_CHARACTERS = {"\u200c", "\u200d"}


class VocabularyError(ValueError):
    """The vocabulary cannot be used as it is; the message names the file and line(s)."""


@dataclass(frozen=True)
class VocabularyEntry:
    label: str  # normalised
    line: int  # 1-based line in the source file where the entry starts
    type: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class VocabularyIssue:
    line: int
    kind: str  # empty | duplicate | control | too_long
    message: str
    fatal: bool = False


@dataclass
class Vocabulary:
    source: str
    entries: list[VocabularyEntry] = field(default_factory=list)
    issues: list[VocabularyIssue] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]

    @property
    def errors(self) -> list[VocabularyIssue]:
        return [i for i in self.issues if i.fatal]

    def report(self) -> str:
        """One line per issue, `source:line: kind: message`, then a summary line."""
        lines = [
            f"{self.source}:{i.line}: {'error' if i.fatal else 'warning'}: {i.kind}: {i.message}"
            for i in self.issues
        ]
        lines.append(
            f"{self.source}: {len(self.entries)} labels, {len(self.errors)} errors, "
            f"{len(self.issues) - len(self.errors)} warnings"
        )
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        if self.errors:
            details = "\n".join(
                f"  {self.source}:{i.line}: {i.kind}: {i.message}" for i in self.errors
            )
            raise VocabularyError(f"{self.source}: labels that cannot be encoded:\n{details}")


@dataclass(frozen=True)
class _RawEntry:
    text: str
    line: int
    type: str | None = None
    description: str | None = None


def normalise_label(text: str) -> str:
    """Control characters removed, NFC, whitespace runs collapsed to one space, ends stripped."""
    text = "".join(c for c in text if c.isspace() or not _is_control(c))
    return " ".join(unicodedata.normalize("NFC", text).split())


def _is_control(c: str) -> bool:
    category = unicodedata.category(c)
    return category == "Cc" or (category == "Cf" and c not in _KEPT_FORMAT_CHARACTERS)


def read_vocabulary(
    path: str | Path,
    tokens_needed: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> Vocabulary:
    """Read and validate a vocabulary file.

    `tokens_needed(label)` and `max_tokens` describe the text encoder: a label needing more
    tokens than `max_tokens` cannot be encoded and is reported as a fatal issue. Call
    `raise_for_errors()` on the result to stop on those.
    """
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"vocabulary file not found: {path}")
    text = _decode(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        raw = _read_csv(path, text, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".yaml", ".yml"):
        raw = _read_yaml(path, text)
    else:
        raw = _read_lines(text)
    return _validate(str(path), raw, tokens_needed, max_tokens)


def _read_lines(text: str) -> list[_RawEntry]:
    # Split on newlines only: str.splitlines() also splits on form feeds and other separators,
    # which would shift line numbers away from what an editor shows.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [_RawEntry(line.removesuffix("\r"), number) for number, line in enumerate(lines, 1)]


def _validate(
    source: str,
    raw: list[_RawEntry],
    tokens_needed: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> Vocabulary:
    vocabulary = Vocabulary(source)
    first_line: dict[str, int] = {}
    for item in raw:
        issue = _control_issue(item)
        if issue:
            vocabulary.issues.append(issue)
        label = normalise_label(item.text)
        if not label:
            vocabulary.issues.append(VocabularyIssue(item.line, "empty", "no label; skipped"))
            continue
        if label in first_line:
            vocabulary.issues.append(
                VocabularyIssue(
                    item.line,
                    "duplicate",
                    f"{label!r} repeats line {first_line[label]} (after normalisation); skipped",
                )
            )
            continue
        first_line[label] = item.line
        if tokens_needed is not None and max_tokens is not None:
            needed = tokens_needed(label)
            if needed > max_tokens:
                vocabulary.issues.append(
                    VocabularyIssue(
                        item.line,
                        "too_long",
                        f"{label!r} needs {needed} text tokens; the CLIP context holds "
                        f"{max_tokens}",
                        fatal=True,
                    )
                )
                continue
        vocabulary.entries.append(
            VocabularyEntry(label, item.line, _optional(item.type), _optional(item.description))
        )
    return vocabulary


def _control_issue(item: _RawEntry) -> VocabularyIssue | None:
    found = sorted({c for c in item.text if _is_control(c) and c != "\t"})
    if not found:
        return None
    names = ", ".join(f"U+{ord(c):04X}" for c in found)
    return VocabularyIssue(item.line, "control", f"control characters {names} removed")


def _optional(value: str | None) -> str | None:
    if value is None:
        return None
    value = normalise_label(value)
    return value or None


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise VocabularyError(
            f"{path}:{line}: cannot be encoded: not valid UTF-8 ({err.reason} at byte "
            f"{err.start}); save the file as UTF-8"
        ) from err


def _read_csv(path: Path, text: str, delimiter: str) -> list[_RawEntry]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return []
    columns = [name.strip().lower() for name in header]
    if "label" not in columns:
        raise VocabularyError(f"{path}:1: the header row has no 'label' column: {header}")
    index = {
        name: columns.index(name) for name in ("label", "type", "description") if name in columns
    }
    entries = []
    start = reader.line_num + 1
    for row in reader:
        cell = {name: row[i] if i < len(row) else None for name, i in index.items()}
        entries.append(
            _RawEntry(cell["label"] or "", start, cell.get("type"), cell.get("description"))
        )
        start = reader.line_num + 1
    return entries


def _read_yaml(path: Path, text: str) -> list[_RawEntry]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise VocabularyError(f"{path}:{line}: not valid YAML: {err}") from err
    if root is None:
        return []
    if isinstance(root, yaml.SequenceNode):
        return [_yaml_entry(path, node, None) for node in root.value]
    if isinstance(root, yaml.MappingNode):
        entries = []
        for key, value in root.value:
            if not isinstance(value, yaml.SequenceNode):
                raise VocabularyError(
                    f"{path}:{_line(value)}: type {key.value!r} must map to a list of labels"
                )
            entries.extend(_yaml_entry(path, node, key.value) for node in value.value)
        return entries
    raise VocabularyError(f"{path}:{_line(root)}: expected a list of labels or a mapping of types")


def _yaml_entry(path: Path, node: yaml.Node, type_: str | None) -> _RawEntry:
    # Scalars keep their source text, so `yes`, `1.0` or `null` stay the labels they look like.
    if isinstance(node, yaml.ScalarNode):
        return _RawEntry(_scalar_text(node), _line(node), type_)
    if isinstance(node, yaml.MappingNode):
        fields = {}
        for key, value in node.value:
            if not isinstance(value, yaml.ScalarNode):
                raise VocabularyError(f"{path}:{_line(value)}: {key.value!r} must be text")
            fields[key.value] = _scalar_text(value)
        unknown = sorted(set(fields) - {"label", "type", "description"})
        if unknown or "label" not in fields:
            raise VocabularyError(
                f"{path}:{_line(node)}: an entry needs 'label' and may have 'type' and "
                f"'description' (got {sorted(fields)})"
            )
        return _RawEntry(
            fields["label"], _line(node), fields.get("type", type_), fields.get("description")
        )
    raise VocabularyError(f"{path}:{_line(node)}: expected a label or a mapping with 'label'")


def _scalar_text(node: yaml.ScalarNode) -> str:
    return "" if node.tag == "tag:yaml.org,2002:null" else node.value


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1
