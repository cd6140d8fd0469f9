"""Vocabulary reading and validation: formats, normalisation, and reports that name the line."""

import pytest

from ovml_core.vocabulary import VocabularyError, normalise_label, read_vocabulary


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def issues(vocabulary):
    return [(i.line, i.kind, i.fatal) for i in vocabulary.issues]


def test_normalisation_is_nfc_and_collapses_whitespace():
    decomposed = "cafe\u0301"
    assert normalise_label(f"  {decomposed}\t bar \u00a0") == "caf\u00e9 bar"
    assert normalise_label("a\u0007b\u200bc") == "abc"  # BEL and zero-width space removed
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # joiners hold the emoji together
    assert normalise_label(family) == family


def test_text_file_report_names_each_line(tmp_path):
    path = write(
        tmp_path,
        "labels.txt",
        "dog\n\n  surfing  \nsurf\u0000ing board\nDog\ndog \ncafe\u0301\ncaf\u00e9\r\n",
    )
    vocabulary = read_vocabulary(path)
    assert vocabulary.labels == ["dog", "surfing", "surfing board", "Dog", "caf\u00e9"]
    assert [e.line for e in vocabulary.entries] == [1, 3, 4, 5, 7]
    assert issues(vocabulary) == [
        (2, "empty", False),
        (4, "control", False),
        (6, "duplicate", False),
        (8, "duplicate", False),
    ]
    report = vocabulary.report()
    assert f"{path}:4: warning: control: control characters U+0000 removed" in report
    assert f"{path}:8: warning: duplicate: 'caf\u00e9' repeats line 7" in report
    assert report.endswith("5 labels, 0 errors, 4 warnings")
    vocabulary.raise_for_errors()  # warnings only: usable


def test_form_feed_does_not_shift_line_numbers(tmp_path):
    path = write(tmp_path, "labels.txt", "a\x0cb\ndog\ndog\n")
    vocabulary = read_vocabulary(path)
    assert vocabulary.labels == ["a b", "dog"]  # a form feed is whitespace inside a label
    assert issues(vocabulary) == [(1, "control", False), (3, "duplicate", False)]


def test_label_too_long_for_the_text_context_is_fatal_and_named(tmp_path):
    path = write(tmp_path, "labels.txt", "dog\nan extremely long label\ncat\n")
    vocabulary = read_vocabulary(
        path, tokens_needed=lambda label: len(label.split()) + 2, max_tokens=4
    )
    assert vocabulary.labels == ["dog", "cat"]
    assert issues(vocabulary) == [(2, "too_long", True)]
    with pytest.raises(
        VocabularyError, match=rf"{path}:2: too_long: 'an extremely long label' needs 6"
    ):
        vocabulary.raise_for_errors()


def test_undecodable_bytes_name_the_line(tmp_path):
    path = write(tmp_path, "labels.txt", b"dog\ncat\nbad \xff byte\n")
    with pytest.raises(VocabularyError, match=rf"{path}:3: cannot be encoded: not valid UTF-8"):
        read_vocabulary(path)


def test_csv_with_type_and_description_counts_physical_lines(tmp_path):
    path = write(
        tmp_path,
        "labels.csv",
        'Label,Type,Description\ndog,object,a furry pet\n"two\nlines",scene,\n,,\nsurfing,action\n',
    )
    vocabulary = read_vocabulary(path)
    entries = [(e.label, e.line, e.type, e.description) for e in vocabulary.entries]
    assert entries == [
        ("dog", 2, "object", "a furry pet"),
        ("two lines", 3, "scene", None),
        ("surfing", 6, "action", None),
    ]
    assert issues(vocabulary) == [(3, "control", False), (5, "empty", False)]


def test_csv_without_label_column(tmp_path):
    path = write(tmp_path, "labels.csv", "name,type\ndog,object\n")
    with pytest.raises(VocabularyError, match=rf"{path}:1: the header row has no 'label' column"):
        read_vocabulary(path)


def test_yaml_list_of_labels_and_mappings(tmp_path):
    path = write(
        tmp_path,
        "labels.yaml",
        "- dog\n- {label: surfing, type: action, description: riding waves}\n- ~\n- yes\n- 1.0\n",
    )
    vocabulary = read_vocabulary(path)
    # Scalars stay the text they were written as: YAML's `yes` is not True here.
    assert vocabulary.labels == ["dog", "surfing", "yes", "1.0"]
    assert vocabulary.entries[1].type == "action"
    assert vocabulary.entries[1].description == "riding waves"
    assert issues(vocabulary) == [(3, "empty", False)]


def test_yaml_grouped_by_type(tmp_path):
    path = write(
        tmp_path, "labels.yml", "action:\n  - surfing\n  - running\nobject:\n  - dog\n  - surfing\n"
    )
    vocabulary = read_vocabulary(path)
    assert [(e.label, e.type, e.line) for e in vocabulary.entries] == [
        ("surfing", "action", 2),
        ("running", "action", 3),
        ("dog", "object", 5),
    ]
    assert issues(vocabulary) == [(6, "duplicate", False)]


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ("- dog\n- {label: cat, colour: black}\n", 2, "an entry needs 'label'"),
        ("- dog\n- [cat, dog\n", 3, "not valid YAML"),
        ("action: surfing\n", 1, "type 'action' must map to a list of labels"),
    ],
)
def test_yaml_errors_name_the_line(tmp_path, content, line, message):
    path = write(tmp_path, "labels.yaml", content)
    with pytest.raises(VocabularyError, match=rf"{path}:{line}: {message}"):
        read_vocabulary(path)


def test_missing_file(tmp_path):
    with pytest.raises(VocabularyError, match="vocabulary file not found"):
        read_vocabulary(tmp_path / "nope.txt")
