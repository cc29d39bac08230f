"""A real English text corpus available offline, a byte-level split and fixed-length windows.

Sources (`load_documents(source)`):

* `"python-docs"`: the reStructuredText sources of the Python documentation (tutorial, library
  and language reference, HOWTOs, what's new): 11 MB of English prose with code samples in
  497 documents (Python 3.11). Debian/Ubuntu ship them in the `python3-doc` package
  (`apt-get install python3-doc` -> `/usr/share/doc/python3.X/html/_sources/**/*.rst.txt`).
* `"pydoc-topics"`: the Python language-reference topics that every CPython carries in
  `pydoc_data.topics` (0.47 MB in 79 documents in Python 3.11): always present, the fallback.
* a path: every `*.txt`/`*.rst`/`*.md` file under a directory, or one file.

`"auto"` (default) takes python-docs when installed, else pydoc-topics.

The train/held-out split is by document (no held-out text leaks into training), a seeded
choice of `heldout_fraction` of the documents. Each split is its documents in name order,
byte-tokenized and joined with `ByteTokenizer.EOS`. `TokenWindows` cuts a split into
fixed-length windows for a grain pipeline (`make_batches`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Sequence

import numpy as np

from streamzoo.train.data.tokenizers import ByteTokenizer

SOURCES = ("python-docs", "pydoc-topics")
_TEXT_SUFFIXES = (".txt", ".rst", ".md")


def _python_docs_dir() -> str | None:
    """The newest installed `/usr/share/doc/python3.X/html/_sources`, or None."""
    found = {}
    for path in glob.glob("/usr/share/doc/python3*/html/_sources"):
        real = os.path.realpath(path)
        match = re.search(r"python3\.(\d+)", real)
        if match and os.path.isdir(os.path.join(real, "tutorial")):
            found[real] = int(match.group(1))
    return max(found, key=found.get) if found else None


def available_sources() -> list[str]:
    """The named sources present on this machine (pydoc-topics always is)."""
    return [s for s in SOURCES if s != "python-docs" or _python_docs_dir() is not None]


def load_documents(source: str = "auto") -> list[tuple[str, str]]:
    """`[(name, text)]` sorted by name; see the module docstring for the sources."""
    if source == "auto":
        source = "python-docs" if _python_docs_dir() is not None else "pydoc-topics"
    if source == "pydoc-topics":
        from pydoc_data.topics import topics
        return sorted(topics.items())
    if source == "python-docs":
        root = _python_docs_dir()
        if root is None:
            raise FileNotFoundError(
                "source='python-docs': no /usr/share/doc/python3.X/html/_sources found; "
                "install it with `apt-get install python3-doc` or use source='pydoc-topics'")
        return _read_tree(root, (".rst.txt",))
    if os.path.isfile(source):
        with open(source, encoding="utf-8", errors="replace") as f:
            return [(os.path.basename(source), f.read())]
    if os.path.isdir(source):
        docs = _read_tree(source, _TEXT_SUFFIXES)
        if docs:
            return docs
        raise ValueError(f"source: expected a directory with {_TEXT_SUFFIXES} files, got "
                         f"{source!r} with none")
    raise ValueError(f"source: expected 'auto', one of {SOURCES}, or an existing file or "
                     f"directory, got {source!r}")


def _read_tree(root: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    docs = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(suffixes):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    docs.append((os.path.relpath(path, root), f.read()))
    return sorted(docs)


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Byte tokens of the train and held-out documents (uint16 ids of `ByteTokenizer`)."""

    source: str
    train_names: tuple[str, ...]
    heldout_names: tuple[str, ...]
    train_tokens: np.ndarray
    heldout_tokens: np.ndarray
    tokenizer: ByteTokenizer = dataclasses.field(default_factory=ByteTokenizer)

    def tokens(self, split: str) -> np.ndarray:
        if split not in ("train", "heldout"):
            raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
        return self.train_tokens if split == "train" else self.heldout_tokens


def load_text_corpus(source: str = "auto", *, heldout_fraction: float = 0.05,
                     seed: int = 0) -> TextCorpus:
    """Load `source`, split it by document (seeded) and byte-tokenize both splits."""
    docs = load_documents(source)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: expected in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise ValueError(f"source: expected >= 2 documents to split, got {len(docs)} in {source!r}")
    n_heldout = min(max(1, round(len(docs) * heldout_fraction)), len(docs) - 1)
    heldout = set(np.random.default_rng(seed).permutation(len(docs))[:n_heldout].tolist())
    tok = ByteTokenizer()

    def join(indices):
        parts = [tok.encode(docs[i][1], add_eos=True) for i in indices]
        return np.concatenate(parts).astype(np.uint16)

    train_idx = [i for i in range(len(docs)) if i not in heldout]
    heldout_idx = sorted(heldout)
    return TextCorpus(
        source=source, train_names=tuple(docs[i][0] for i in train_idx),
        heldout_names=tuple(docs[i][0] for i in heldout_idx),
        train_tokens=join(train_idx), heldout_tokens=join(heldout_idx), tokenizer=tok)


class TokenWindows(Sequence):
    """Random-access fixed-length windows `tokens[i * stride : i * stride + window]` as int32.

    For next-token training take `window = seq_len + 1` (inputs `w[:-1]`, targets `w[1:]`).
    `stride` defaults to `window` (disjoint windows); the last `< stride` tokens that do not fill
    a window are not used.
    """

    def __init__(self, tokens: np.ndarray, window: int, stride: int | None = None):
        stride = window if stride is None else stride
        if window < 1:
            raise ValueError(f"window: expected >= 1, got {window}")
        if stride < 1:
            raise ValueError(f"stride: expected >= 1, got {stride}")
        if len(tokens) < window:
            raise ValueError(f"window: expected <= the {len(tokens)} tokens, got {window}")
        self.tokens = np.asarray(tokens)
        self.window = window
        self.stride = stride
        self._len = (len(tokens) - window) // stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} windows")
        start = (index % self._len) * self.stride
        return self.tokens[start:start + self.window].astype(np.int32)

    def __iter__(self):
        return (self[i] for i in range(self._len))
