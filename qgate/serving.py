"""What an endpoint serves for a run: its reference, scoring settings, model and gates.

The Serve model replica and the benches resolve them here, with the same checks: the
reference (or, score-only, the scores manifest) must exist and carry a scoring block, and
the model and gates default to what the score stage recorded.
"""

from __future__ import annotations

import hashlib
import json
import os

from qgate.config import ServeConfig, stage_dir


def _read_json(path: str) -> dict:
    import fsspec

    with fsspec.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _exists(path: str) -> bool:
    import fsspec

    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    return fs.exists(p)


def resolve_artifacts(cfg: ServeConfig) -> dict:
    """Find the reference (or scores manifest), the scoring settings, model and gates paths.

    Returns ``{reference, reference_path, reference_digest, scoring, base_model, gates,
    expected_digests}``; raises FileNotFoundError / ValueError naming what is missing.
    """
    from qgate.reference import Reference

    scores_dir = cfg.scores or stage_dir(cfg.run_dir, "scores")
    manifest_path = os.path.join(scores_dir, "_manifest.json")
    manifest = _read_json(manifest_path) if _exists(manifest_path) else None
    reference, ref_path, ref_digest = None, None, None
    if cfg.score_only:
        if manifest is None:
            raise FileNotFoundError(
                f"score_only needs the scores manifest {manifest_path}; run `qgate score` first"
                " or set scores= to its output directory"
            )
        scoring, expected = manifest.get("scoring"), manifest
    else:
        ref_path = cfg.reference or os.path.join(
            stage_dir(cfg.run_dir, "selection"), "reference.json"
        )
        if not _exists(ref_path):
            raise FileNotFoundError(
                f"no selection reference at {ref_path}: run `qgate select` first, set reference="
                " to its reference.json, or set score_only=true to serve scores without decisions"
            )
        reference = Reference.load(ref_path)
        import fsspec

        with fsspec.open(ref_path, "rb") as f:
            ref_digest = hashlib.sha256(f.read()).hexdigest()[:16]
        scoring, expected = reference.scoring, reference.to_dict()
    if not scoring:
        src = ref_path or manifest_path
        raise ValueError(f"{src} has no `scoring` block; re-run the score (and select) stage")
    base = cfg.base_model or (manifest or {}).get("model")
    if not base:
        raise ValueError(
            f"no base_model set and no scores manifest at {manifest_path} to take it from;"
            " set base_model= (and gates=) to what the score stage used"
        )
    gates = cfg.gates if cfg.gates else (manifest or {}).get("gates")
    return {
        "scores_dir": scores_dir,
        "reference": reference,
        "reference_path": ref_path,
        "reference_digest": ref_digest,
        "scoring": scoring,
        "base_model": base,
        "gates": gates,
        "expected_digests": {
            "model_digest": expected.get("model_digest"),
            "gates_digest": expected.get("gates_digest"),
        },
    }
