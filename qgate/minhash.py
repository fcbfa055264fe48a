"""Text identity of a sample: normalised text, exact keys, MinHash signatures, LSH bands.

Dedup (qgate.dedup), the score stage (the ``minhash`` column) and the online selection log
(qgate.selection_log) all compute a sample's signature here, with one ``qgate.config.MinHash``,
so a new sample can be compared with the pool it was never scored beside.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

from qgate.config import MinHash

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
_FNV_PRIME = np.uint64(1099511628211)
_FNV_OFFSET = np.uint64(14695981039346656037)


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed to single spaces and stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def sample_text(messages: list[dict]) -> str:
    """The normalised text of every turn (prompt and answer), one line per turn."""
    return "\n".join(normalize_text(str(m.get("content", ""))) for m in messages)


def exact_key(messages: list[dict]) -> str:
    """Digest of the normalised roles and texts: equal keys mean duplicates up to case and
    whitespace."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        h.update(str(m.get("role", "")).encode())
        h.update(b"\x1f")
        h.update(normalize_text(str(m.get("content", ""))).encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    return h.hexdigest()


def shingles(text: str, st: MinHash) -> list[bytes]:
    """The n-gram set of a normalised text; a text shorter than n is one shingle."""
    if st.unit == "word":
        units = _WORD.findall(text)
        grams = {
            " ".join(units[i : i + st.ngram]) for i in range(max(1, len(units) - st.ngram + 1))
        }
    else:
        grams = {text[i : i + st.ngram] for i in range(max(1, len(text) - st.ngram + 1))}
    return [g.encode("utf-8", "surrogatepass") for g in grams]


def signatures(texts: list[str], st: MinHash) -> np.ndarray:
    """MinHash signatures (N, num_perm) uint32 of normalised texts (datasketch)."""
    from datasketch import MinHash

    if not texts:
        return np.zeros((0, st.num_perm), dtype=np.uint32)
    sets = [shingles(t, st) for t in texts]
    hashes = MinHash.bulk(sets, num_perm=st.num_perm, seed=st.seed)
    return np.stack([m.hashvalues for m in hashes]).astype(np.uint32, copy=False)


def message_signatures(messages: list[list[dict]], st: MinHash) -> np.ndarray:
    """Signatures of samples given as message lists."""
    return signatures([sample_text(m) for m in messages], st)


def band_keys(sig: np.ndarray, st: MinHash) -> np.ndarray:
    """(N, bands) uint64 LSH keys: FNV-1a over each band's values. Equal keys in any band
    make two samples candidates."""
    b, r = st.bands
    sig = np.asarray(sig, dtype=np.uint64)
    keys = np.empty((sig.shape[0], b), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(b):
            k = np.full(sig.shape[0], _FNV_OFFSET, dtype=np.uint64)
            for j in range(i * r, (i + 1) * r):
                k = (k ^ sig[:, j]) * _FNV_PRIME
            keys[:, i] = k
    return keys


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity: the share of equal signature values (row-wise)."""
    return (np.asarray(a) == np.asarray(b)).mean(axis=-1)


class NearDuplicateIndex:
    """Signatures of known samples, for asking "is this new sample a copy of one of them?".

    The pool's keys sit in sorted arrays (one binary search per band); samples added later
    (the selection log) go in a dict. Memory: num_perm*4 + bands*8 bytes per sample.
    """

    def __init__(self, st: MinHash, ids=(), sigs: np.ndarray | None = None):
        self.st = st
        self.ids = list(ids)
        self.sigs = (
            np.asarray(sigs, dtype=np.uint32)
            if sigs is not None
            else np.zeros((0, st.num_perm), dtype=np.uint32)
        )
        if self.sigs.shape[0] != len(self.ids) or self.sigs.shape[1] != st.num_perm:
            raise ValueError("NearDuplicateIndex: one signature of num_perm values per id")
        keys = band_keys(self.sigs, st)
        self._order = np.argsort(keys, axis=0, kind="stable")
        self._sorted = np.take_along_axis(keys, self._order, axis=0)
        self._extra: dict[tuple[int, int], list[int]] = {}
        self._extra_sigs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.ids)

    def _sig(self, i: int) -> np.ndarray:
        n = self.sigs.shape[0]
        return self.sigs[i] if i < n else self._extra_sigs[i - n]

    def add(self, sample_id: str, sig: np.ndarray) -> None:
        """Index one more sample."""
        i = len(self.ids)
        self.ids.append(sample_id)
        self._extra_sigs.append(np.asarray(sig, dtype=np.uint32))
        for band, key in enumerate(band_keys(np.asarray(sig)[None, :], self.st)[0]):
            self._extra.setdefault((band, int(key)), []).append(i)

    def match(self, sig: np.ndarray) -> tuple[str, float] | None:
        """The first indexed sample (in index order) at or above the threshold, with its
        estimated similarity; None when there is none."""
        sig = np.asarray(sig, dtype=np.uint32)
        keys = band_keys(sig[None, :], self.st)[0]
        cands: set[int] = set()
        for band, key in enumerate(keys):
            col = self._sorted[:, band]
            lo, hi = np.searchsorted(col, key, "left"), np.searchsorted(col, key, "right")
            cands.update(self._order[lo:hi, band].tolist())
            cands.update(self._extra.get((band, int(key)), ()))
        for i in sorted(cands):
            sim = float(similarity(self._sig(i), sig))
            if sim >= self.st.threshold:
                return self.ids[i], sim
        return None
