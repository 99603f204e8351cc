"""Byte corpora and the batches drawn from them (docs/training.md, "Data").

Bytes are the tokens (vocab 256). A corpus is a training and a validation byte array:

    corpus = load_corpus(None)                  # the embedded Tiny Shakespeare, split 90 % / 10 %
    corpus = load_corpus("book.txt.xz")         # one file: the same 90 % / 10 % split
    corpus = load_corpus("../shared/data/pg19-mini")   # a folder: its train and validation files

A training batch is `batch` random windows of context + 1 bytes (context predicted positions).
The window starts of step s come from a generator seeded by (seed, s) alone, so the data order
is a pure function of the step: resuming needs no generator state beyond the step number.
"""
import gzip
import lzma
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

EMBEDDED = "tinyshakespeare"
EMBEDDED_SOURCE = f"{EMBEDDED} (embedded)"
SUFFIXES = (".txt", ".txt.gz", ".txt.xz", ".raw")      # .raw: WikiText's plain-text files
TRAIN_FRACTION = 0.9
_TRAIN_STREAM, _VALIDATION_STREAM = 0, 1     # keep the two seed sequences apart


class Corpus(NamedTuple):
    """Training and validation bytes (uint8 arrays) and where they came from."""
    train: np.ndarray
    validation: np.ndarray
    source: str          # "tinyshakespeare (embedded)" or the resolved path
    split: str           # where the validation bytes come from, for run.json and eval reports


def read_bytes(path):
    """The bytes of a .txt (or .raw), .txt.gz or .txt.xz file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    name = path.name
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    return path.read_bytes()


def read_array(path):
    """The bytes of a text file (see read_bytes) as a uint8 array."""
    return np.frombuffer(read_bytes(path), dtype=np.uint8)


def split_bytes(data):
    """(train, validation): the first 90 % of the bytes and the rest, as nanoGPT's shakespeare_char."""
    data = np.frombuffer(data, dtype=np.uint8)
    cut = int(len(data) * TRAIN_FRACTION)
    return data[:cut], data[cut:]


def embedded_bytes():
    """The embedded default corpus (Tiny Shakespeare, mirascore/lm/corpus/README.md)."""
    return lzma.decompress((resources.files(__package__) / "corpus" / f"{EMBEDDED}.txt.xz").read_bytes())


def split_file(folder, split):
    """The file of `split` ("train", "validation", "test") in a data folder, any of SUFFIXES."""
    for suffix in SUFFIXES:
        path = Path(folder) / f"{split}{suffix}"
        if path.is_file():
            return path
    names = ", ".join(f"{split}{s}" for s in SUFFIXES)
    raise FileNotFoundError(f"data folder {str(folder)!r} has no {split} file ({names})")


def load_corpus(path=None):
    """The corpus at `path` (None: the embedded default); see the module docstring."""
    if path is None:
        train, validation = split_bytes(embedded_bytes())
        return Corpus(train, validation, EMBEDDED_SOURCE, "last 10 % of the bytes")
    path = Path(path)
    if path.is_dir():
        train, validation = (read_array(split_file(path, split)) for split in ("train", "validation"))
        return Corpus(train, validation, str(path.resolve()), "the folder's validation file")
    if not path.exists():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    if not path.name.endswith(SUFFIXES):
        raise ValueError(f"--data {str(path)!r} must be a folder or a {', '.join(SUFFIXES)} file")
    train, validation = split_bytes(read_bytes(path))
    return Corpus(train, validation, str(path.resolve()), "last 10 % of the bytes")


def path_of_source(source):
    """The load_corpus argument that gives back a corpus of this `source` (None: the embedded one)."""
    return None if source == EMBEDDED_SOURCE else source


def _check_length(name, data, length):
    if len(data) < length:
        raise ValueError(f"the {name} data has {len(data)} bytes, fewer than one window of {length}")


def window_starts(n_bytes, length, count, seed, stream, index=0):
    """`count` window starts in [0, n_bytes − length], from a generator seeded by (seed, stream, index)."""
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, n_bytes - length + 1, size=count)


def windows(data, starts, length):
    """int32 array (len(starts), length): data[s : s + length] for each start s."""
    return data[np.asarray(starts)[:, None] + np.arange(length)].astype(np.int32)


def train_batch(data, step, seed, batch, context):
    """The training batch of optimizer step `step` (0-based): int32 (batch, context + 1)."""
    _check_length("training", data, context + 1)
    return windows(data, window_starts(len(data), context + 1, batch, seed, _TRAIN_STREAM, step), context + 1)


def validation_batches(data, seed, count, batch, context):
    """The fixed validation set: `count` int32 arrays (batch, context + 1), the same at every eval."""
    _check_length("validation", data, context + 1)
    starts = window_starts(len(data), context + 1, count * batch, seed, _VALIDATION_STREAM)
    return [windows(data, s, context + 1) for s in np.split(starts, count)]


def micro_batches(tokens, accumulate):
    """The `accumulate` equal row blocks of a batch (gradient accumulation)."""
    return np.split(tokens, accumulate)
