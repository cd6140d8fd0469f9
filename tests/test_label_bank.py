"""The label bank job end to end on the tiny model: real Ray Data actor pool, real Parquet."""

import copy
import importlib.util

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ovml_core.checkpoint import model_fingerprint, save_checkpoint
from ovml_core.label_embedder import LabelEmbedder, clip_token_budget
from pipeline.label_bank import build_label_bank
from pipeline.parquet_io import label_bank_schema, read_label_bank
from tests.conftest import TINY_CONFIG

VOCABULARY = "dog\ncat\n\nsurfing\nbirthday party\n  dog \nDog\nriding a horse\n"
UNIQUE = ["dog", "cat", "surfing", "birthday party", "Dog", "riding a horse"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cfg(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg.label_bank.batch_size = 4
    cfg.label_bank.actors = 2
    return cfg


@pytest.fixture(scope="module")
def first_bank(tmp_path_factory, ray_local, cfg):
    """A bank built from VOCABULARY: (vocabulary path, bank path, summary)."""
    folder = tmp_path_factory.mktemp("bank")
    labels = folder / "labels.txt"
    labels.write_text(VOCABULARY)
    out = folder / "bank.parquet"
    return labels, out, build_label_bank(cfg, str(labels), str(out))


def read(out):
    table = pq.read_table(out)
    embeddings = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    return table, embeddings


@pytest.mark.slow
def test_bank_holds_each_valid_label_once_with_the_models_embedding(first_bank, tiny_model):
    _, out, summary = first_bank
    table, embeddings = read(out)
    assert table.schema == label_bank_schema(embeddings.shape[1])
    assert table["label"].to_pylist() == UNIQUE
    assert (summary.labels, summary.computed, summary.reused) == (len(UNIQUE), len(UNIQUE), 0)
    assert set(table["model_fingerprint"].to_pylist()) == {model_fingerprint(tiny_model)}
    with torch.inference_mode():
        expected = tiny_model.encode_labels(UNIQUE).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    assert table["attributes"].to_pylist() == tiny_model.label_attributes(UNIQUE)
    # The tagging job's reader accepts it.
    labels, matrix, fingerprints = read_label_bank(str(out))
    assert labels == UNIQUE and matrix.shape == expected.shape
    assert fingerprints == [model_fingerprint(tiny_model)]


@pytest.mark.slow
def test_adding_labels_computes_only_the_new_ones(first_bank, cfg, tmp_path):
    labels, out, _ = first_bank
    before, before_embeddings = read(out)
    grown = tmp_path / "labels.txt"
    # Two new labels, "cat" removed, the rest as before.
    grown.write_text(VOCABULARY.replace("cat\n", "") + "volcano\nknitting\n")
    bank = tmp_path / "bank.parquet"
    bank.write_bytes(out.read_bytes())

    summary = build_label_bank(cfg, str(grown), str(bank))

    assert (summary.computed, summary.reused, summary.dropped) == (2, len(UNIQUE) - 1, 1)
    after, after_embeddings = read(bank)
    expected = [x for x in UNIQUE if x != "cat"] + ["volcano", "knitting"]
    assert after["label"].to_pylist() == expected
    old = {label: row for label, row in zip(UNIQUE, before_embeddings, strict=True)}
    for label, row in zip(expected[:-2], after_embeddings[:-2], strict=True):
        assert np.array_equal(row, old[label])  # carried over bit for bit

    mtime = bank.stat().st_mtime_ns
    unchanged = build_label_bank(cfg, str(grown), str(bank))
    assert (unchanged.computed, unchanged.reused) == (0, len(expected))
    assert bank.stat().st_mtime_ns == mtime  # nothing to do, nothing rewritten


@pytest.mark.slow
def test_a_changed_checkpoint_recomputes_every_label(first_bank, cfg, tiny_model, tmp_path):
    labels, out, first = first_bank
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        trained.labels.soft.prompting.proj_out.bias.add_(0.05)
    checkpoint = save_checkpoint(trained, tmp_path / "checkpoint")
    bank = tmp_path / "bank.parquet"
    bank.write_bytes(out.read_bytes())

    summary = build_label_bank(cfg, str(labels), str(bank), checkpoint=str(checkpoint))

    assert (summary.computed, summary.reused, summary.dropped) == (len(UNIQUE), 0, len(UNIQUE))
    assert summary.model_fingerprint == model_fingerprint(trained) != first.model_fingerprint
    table, embeddings = read(bank)
    assert set(table["model_fingerprint"].to_pylist()) == {summary.model_fingerprint}
    with torch.inference_mode():
        expected = trained.encode_labels(UNIQUE).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)


def test_cli_fails_on_a_label_that_cannot_be_encoded_and_names_the_line(tmp_path, capsys):
    from pipeline.cli import main

    labels = tmp_path / "labels.txt"
    labels.write_text("dog\n" + "very " * 80 + "long\ncat\n")
    out = tmp_path / "bank.parquet"
    args = ["--config", str(TINY_CONFIG), "--labels", str(labels), "--out", str(out)]
    code = main(["labels", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{labels}:2: too_long:" in err
    assert "the CLIP context holds 77" in err
    assert not out.exists()


def test_cli_refuses_to_overwrite_what_is_not_a_label_bank(tmp_path, capsys):
    from pipeline.cli import main

    labels = tmp_path / "labels.txt"
    labels.write_text("dog\n")
    out = tmp_path / "bank.parquet"
    out.write_text("not parquet")
    args = ["--config", str(TINY_CONFIG), "--labels", str(labels), "--out", str(out)]
    assert main(["labels", *args]) == 2
    assert f"--out {out}: not a readable label bank" in capsys.readouterr().err
    assert out.read_text() == "not parquet"


def test_token_budget_counts_the_soft_tokens(tiny_model):
    tokens_needed, context = clip_token_budget(tiny_model)
    num_soft = tiny_model.labels.soft.num_attributes
    # [SOS] dog [EOS] plus the soft attribute tokens.
    assert tokens_needed("dog") == 3 + num_soft
    assert context == tiny_model.labels.text.context_length


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_says_how_to_install(tiny_model):
    with pytest.raises(
        ModuleNotFoundError, match=r"label_bank.backend=vllm needs the vllm package"
    ):
        LabelEmbedder(tiny_model, backend="vllm")
