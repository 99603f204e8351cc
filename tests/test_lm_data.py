"""Byte corpora and batches (mirascore.lm.data)."""
import gzip
import hashlib
import lzma

import numpy as np
import pytest

from mirascore.lm import data

TEXT = bytes(range(256)) * 40          # 10,240 bytes


@pytest.mark.parametrize("suffix, pack", [(".txt", bytes), (".raw", bytes), (".txt.gz", gzip.compress),
                                          (".txt.xz", lzma.compress)])
def test_a_file_of_any_suffix_is_split_90_10_by_bytes(tmp_path, suffix, pack):
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(pack(TEXT))
    corpus = data.load_corpus(path)
    cut = int(len(TEXT) * 0.9)
    assert corpus.train.tobytes() == TEXT[:cut] and corpus.validation.tobytes() == TEXT[cut:]
    assert corpus.train.dtype == np.uint8


def test_a_folder_gives_its_train_and_validation_files(tmp_path):
    (tmp_path / "train.txt.xz").write_bytes(lzma.compress(b"a" * 100))
    (tmp_path / "validation.txt").write_bytes(b"b" * 50)
    (tmp_path / "test.txt.gz").write_bytes(gzip.compress(b"c" * 10))
    corpus = data.load_corpus(tmp_path)
    assert corpus.train.tobytes() == b"a" * 100 and corpus.validation.tobytes() == b"b" * 50
    assert data.split_file(tmp_path, "test").name == "test.txt.gz"


def test_missing_or_wrong_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_corpus(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="no validation file"):
        (tmp_path / "train.txt").write_bytes(b"x")
        data.load_corpus(tmp_path)
    (tmp_path / "corpus.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.txt"):
        data.load_corpus(tmp_path / "corpus.bin")


def test_the_embedded_corpus_is_tiny_shakespeare_split_as_nanogpt():
    raw = data.embedded_bytes()
    assert len(raw) == 1_115_394
    assert hashlib.sha256(raw).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    corpus = data.load_corpus(None)
    assert len(corpus.train) == int(len(raw) * 0.9) == 1_003_854 and len(corpus.validation) == 111_540
    assert corpus.train[:14].tobytes() == b"First Citizen:"


def test_train_batches_are_a_pure_function_of_seed_and_step():
    text = np.frombuffer(TEXT, dtype=np.uint8)
    a = data.train_batch(text, step=7, seed=3, batch=5, context=16)
    assert a.shape == (5, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, data.train_batch(text, step=7, seed=3, batch=5, context=16))
    assert not np.array_equal(a, data.train_batch(text, step=8, seed=3, batch=5, context=16))
    assert not np.array_equal(a, data.train_batch(text, step=7, seed=4, batch=5, context=16))
    # every row is a contiguous window of the text (TEXT counts up by one byte at a time)
    assert np.all(np.diff(a, axis=1) % 256 == 1)


def test_windows_reach_both_ends_and_never_past_them():
    starts = np.concatenate([data.window_starts(20, 17, 50, seed, 0, step) for seed in range(4) for step in range(20)])
    assert starts.min() == 0 and starts.max() == 3


def test_validation_batches_are_fixed_and_apart_from_training():
    text = np.frombuffer(TEXT, dtype=np.uint8)
    first = data.validation_batches(text, seed=0, count=3, batch=4, context=8)
    again = data.validation_batches(text, seed=0, count=3, batch=4, context=8)
    assert len(first) == 3 and all(b.shape == (4, 9) for b in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], data.train_batch(text, 0, 0, 4, 8))


def test_too_short_data_is_a_value_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        data.train_batch(np.zeros(10, np.uint8), 0, 0, 2, context=16)


def test_micro_batches_split_rows():
    parts = data.micro_batches(np.arange(12).reshape(6, 2), 3)
    assert [p.tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
