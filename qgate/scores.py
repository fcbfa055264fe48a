"""The scores contract: what the score stage writes and how every consumer reads it.

RUN/scores holds ``part-<shard>.parquet`` (one row per scored sample, :func:`scores_schema`),
``rejects/*.parquet`` (:data:`REJECT_SCHEMA`), ``_shards/<shard>.json`` done-markers, the
``_plan.json`` a resumed run must match and ``_manifest.json``, written last. Readers check
the manifest (complete, no lost rows) and stream the parts in record batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgate import data

PLAN_FILE = "_plan.json"
MANIFEST_FILE = "_manifest.json"
SHARDS_DIR = "_shards"
PROGRESS_DIR = "_progress"  # heartbeats of the shards being scored; gone when a job ends
REJECTS_DIR = "rejects"
SCHEMA_VERSION = 1
BATCH_ROWS = 65536
"""Rows per record batch in every streaming pass (memory: BATCH_ROWS x D x 8 bytes)."""
SCALAR_COLUMNS = ("sample_id", "source", "nll", "ifd", "n_loss_tokens")


def scores_schema(
    num_layers: int, dim: int, debug_tokens: bool = False, num_perm: int | None = None
) -> pa.Schema:
    """The scores row, version 1 (DESIGN.md): fixed-size float32 lists for gate and the two
    embeddings (the whole text, and the prompt alone: older scores lack the second),
    and (``num_perm``) the text's exact key and MinHash signature (qgate.minhash)."""
    f32 = pa.float32()
    fields = [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("n_tokens", pa.int32()),
        ("n_loss_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("nll", f32),
        ("gate", pa.list_(f32, num_layers)),
        ("gate_mean", pa.list_(f32, num_layers)),
        ("embedding", pa.list_(f32, dim)),
        ("prompt_embedding", pa.list_(f32, dim)),
        ("ifd", f32),
    ]
    if num_perm:
        fields += [("text_key", pa.binary(16)), ("minhash", pa.list_(pa.uint32(), num_perm))]
    if debug_tokens:
        fields += [("token_nll", pa.list_(f32)), ("token_gates", pa.list_(pa.list_(f32)))]
    return pa.schema(fields, metadata={"qgate_scores_version": str(SCHEMA_VERSION)})


REJECT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("excerpt", pa.string()),
    ]
)


class SelectionError(ValueError):
    """The scores cannot be selected from (incomplete, inconsistent or missing inputs)."""


def _is_uri(path: str) -> bool:
    return "://" in path


def _open(path: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(path, mode).open()


def _parquet(path: str) -> pq.ParquetFile:
    """Open a parquet file: natively for local paths, through fsspec for URIs."""
    return pq.ParquetFile(_open(path) if _is_uri(path) else path)


def read_manifest(scores_dir: str) -> dict:
    """Read and check ``_manifest.json``: present, complete and with no lost rows."""
    path = os.path.join(scores_dir, "_manifest.json")
    try:
        with _open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise SelectionError(
            f"no scores manifest at {path}: the score stage has not finished (or wrote elsewhere);"
            " run `python -m jobs.score` first or point `scores=` at its output"
        ) from None
    if not manifest.get("complete"):
        raise SelectionError(
            f"{path} says the scoring run is not complete; resume the score stage before selecting"
        )
    missing = [k for k in ("rows_in", "scored", "rejected") if k not in manifest]
    if missing:
        raise SelectionError(f"{path} lacks {missing}; it is not a qgate scores manifest")
    rows_in, scored, rejected = manifest["rows_in"], manifest["scored"], manifest["rejected"]
    if rows_in != scored + rejected:
        raise SelectionError(
            f"rows were lost in scoring: {path} counts rows_in={rows_in} but scored={scored} +"
            f" rejected={rejected} = {scored + rejected}; re-run (resume) the score stage"
        )
    if scored < 1:
        raise SelectionError(
            f"{path}: no rows were scored (rejected={rejected}); nothing to select"
        )
    return manifest


def score_parts(scores_dir: str, manifest: dict) -> list[str]:
    """Sorted ``part-*.parquet`` files; their row count must equal the manifest's ``scored``."""
    try:
        parts = data.expand_paths(os.path.join(scores_dir, "part-*.parquet"))
    except FileNotFoundError:
        raise SelectionError(
            f"no part-*.parquet files in {scores_dir}, but the manifest says"
            f" {manifest['scored']} rows were scored: rows were lost"
        ) from None
    n = 0
    for p in parts:
        with _parquet(p) as pf:
            n += pf.metadata.num_rows
    if n != manifest["scored"]:
        raise SelectionError(
            f"rows were lost: the part files in {scores_dir} hold {n} rows but the manifest says"
            f" scored={manifest['scored']}; re-run (resume) the score stage"
        )
    return parts


COMPARABLE_KEYS = ("scoring", "model_digest", "gates_digest")
"""What two scores directories must share to be ranked together."""


def check_comparable(scores: dict, against: dict, what: str, whom: str) -> None:
    """Raise unless a scores manifest shares the model, gates and scoring settings of
    ``against`` (another manifest, or a reference): only then do their scores compare."""
    bad = [k for k in COMPARABLE_KEYS if scores.get(k) != against.get(k)]
    if bad:
        raise SelectionError(
            f"{what} was scored with other {bad} than {whom}; score it with the same model,"
            " gates and scoring settings"
        )


def merge_manifest(manifest: dict, scores_dir: str) -> tuple[dict, list[str]]:
    """Add another scores directory to a selection: (the summed manifest, its part files).
    Raises when its model, gates or scoring settings differ."""
    other = read_manifest(scores_dir)
    check_comparable(other, manifest, f"{scores_dir}", "the first scores directory")
    merged = dict(manifest)
    for k in ("rows_in", "scored", "rejected"):
        merged[k] = manifest[k] + other[k]
    return merged, score_parts(scores_dir, other)


def iter_score_batches(
    parts: Sequence[str], columns: Sequence[str], batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield ``(offset, batch)`` over all part files in order; offset is the file-order row."""
    offset = 0
    for p in parts:
        with _parquet(p) as pf:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise SelectionError(f"{p} lacks column(s) {missing}; not a qgate scores file")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
                yield offset, batch
                offset += batch.num_rows


def list_matrix(col, name: str = "column") -> np.ndarray:
    """A list (or fixed-size list) column of equal-length float rows as an (n, w) float32 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if col.null_count:
        raise SelectionError(f"{name} has {col.null_count} null rows")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else 0
        if n and (lengths != width).any():
            raise SelectionError(f"{name} rows have different lengths ({sorted(set(lengths))[:5]})")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(n, width)
