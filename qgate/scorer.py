"""The one Scorer: a gated model set up for scoring, shared by the Ray Data job, Serve and benches.

:class:`ScoringSettings` is the typed contract that defines what a score means (token
selection, weighting, embedding projection, model shape, dtype). The score stage writes it
into its plan and manifest, selection copies it into ``reference.json``, and Serve loads it
back, so every path scores the same way. :class:`Scorer` resolves device, dtype and threads
once, loads the model through :func:`qgate.model.load_gated_model`, and scores tokenized
samples with :func:`qgate.scoring.score_batch`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np

from qgate.hardware import dtype_name, resolve_device, resolve_dtype, set_cpu_threads

BF16_TOLERANCE = {"nll": 0.4, "gate": 0.015}
"""Largest differences seen in a bf16 score of the same row (BENCHMARKS.md): against fp32
(nll 0.22, gate 0.007 on SmolLM2, 200 rows), and between two bf16 runs that batch the row
with other rows, so other padding (nll 0.38, gate 0.015, the job against the loop, 5,000
rows). In fp32 a row's score does not depend on its batch-mates beyond float rounding."""


def scoring_alpha(alpha: float | None, meta) -> float:
    """The token-weight exponent to score with: ``alpha`` if set, else the one a contrast
    warmup trained ``meta``'s gates with, else 1. A set alpha that differs from the gates'
    is kept, with a warning: their scores then weigh tokens as the gates were not taught."""
    trained = (meta.extra or {}).get("alpha") if meta is not None else None
    if alpha is None:
        return float(trained) if trained is not None else 1.0
    if trained is not None and float(trained) != float(alpha):
        print(
            f"[score] warning: alpha {alpha:g} differs from the alpha the gates were trained"
            f" with ({float(trained):g}); leave alpha unset to follow the gates",
            flush=True,
        )
    return float(alpha)


@dataclass(frozen=True)
class ScoringSettings:
    """What defines a score; two scores are comparable only under equal settings."""

    max_length: int
    loss_on: str
    """'assistant' (answer tokens) or 'all' (every non-pad token)."""
    alpha: float
    eps: float
    embedding_dim: int | None
    """Requested projection size (None: the hidden size)."""
    embedding_seed: int
    embedding_dim_out: int
    hidden_size: int
    num_layers: int
    gate_mode: str
    ifd: bool
    dtype: str = "float32"
    """The dtype the model ran in ('float32' or 'bfloat16'): it changes nll, gates, embedding."""
    minhash: dict | None = None
    """qgate.config.MinHash settings of the ``minhash`` column (None: no column)."""

    @classmethod
    def for_model(cls, base_model: str, gate_meta, dtype: str, **score_args) -> ScoringSettings:
        """Settings for scoring ``base_model`` (with gates ``gate_meta``, or fresh probe gates);
        an ``alpha`` of None follows the gates (:func:`scoring_alpha`)."""
        from transformers import AutoConfig

        from qgate.model import resolve_base

        config = AutoConfig.from_pretrained(resolve_base(base_model))
        dim = score_args.get("embedding_dim")
        alpha = scoring_alpha(score_args.pop("alpha", None), gate_meta)
        return cls(
            **score_args,
            alpha=alpha,
            embedding_dim_out=dim or config.hidden_size,
            hidden_size=config.hidden_size,
            num_layers=gate_meta.num_layers if gate_meta else config.num_hidden_layers,
            gate_mode=gate_meta.mode if gate_meta else "probe",
            dtype=dtype,
        )

    def to_dict(self) -> dict:
        """Plain dict, as stored in the scores plan, the manifest and reference.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScoringSettings:
        """Read a stored block; blocks written before dtype was recorded were fp32 (CPU)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown scoring settings {unknown}: written by a newer qgate?")
        return cls(**d)


class Scorer:
    """A gated model ready to score: device, dtype, threads, projection and digests in one place.

    ``dtype='auto'`` follows ``settings.dtype`` (what the reference or plan was scored with);
    forcing another dtype is refused, since its scores would not match. ``loader`` replaces
    :func:`qgate.model.load_gated_model` (tests).
    """

    def __init__(
        self,
        base: str,
        gates: str | None,
        settings: ScoringSettings,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        batch_tokens: int = 16384,
        debug_tokens: bool = False,
        loader: Callable | None = None,
    ):
        from qgate.model import load_gated_model
        from qgate.scoring import projection_matrix

        self.settings = settings
        self.device = resolve_device(device)
        want = settings.dtype if dtype == "auto" else dtype_name(resolve_dtype(dtype, self.device))
        if want != settings.dtype:
            raise ValueError(
                f"the scores were made in {settings.dtype} but dtype={dtype} asks for {want}: "
                f"scores would differ (up to {BF16_TOLERANCE['nll']} in nll in bf16). Use "
                "dtype=auto, or re-score in the dtype you want"
            )
        set_cpu_threads(self.device, threads)
        self.model, self.tokenizer, self.meta = (loader or load_gated_model)(
            base, gates=gates, device=self.device, dtype=resolve_dtype(want, self.device)
        )
        shape = (self.meta.num_layers, self.meta.hidden_size)
        if shape != (settings.num_layers, settings.hidden_size):
            raise ValueError(
                f"the model has {shape[0]} gated layers of size {shape[1]}; the scores were made"
                f" with {settings.num_layers} of size {settings.hidden_size}"
            )
        self.projection = projection_matrix(
            settings.hidden_size, settings.embedding_dim, settings.embedding_seed
        )
        self.batch_tokens = max(batch_tokens, settings.max_length)
        self.debug_tokens = debug_tokens
        self.base, self.gates = base, gates

    def with_settings(self, settings: ScoringSettings) -> Scorer:
        """This loaded model under other settings (e.g. IFD off): one model, two outputs.

        Only what is applied per call may differ; the dtype, model shape and embedding
        projection must match, since they are fixed when the model loads."""
        fixed = ("dtype", "num_layers", "hidden_size", "embedding_dim", "embedding_seed")
        differ = [k for k in fixed if getattr(settings, k) != getattr(self.settings, k)]
        if differ:
            raise ValueError(f"a Scorer view cannot change {differ}; load another Scorer")
        view = copy.copy(self)
        view.settings = settings
        view.batch_tokens = max(self.batch_tokens, settings.max_length)
        return view

    def tokenize(self, messages: list[dict]) -> dict:
        """Tokenize one canonical conversation for :meth:`score` (raises RowError)."""
        from qgate.scoring import tokenize_for_scoring

        s = self.settings
        return tokenize_for_scoring(self.tokenizer, messages, s.max_length, s.loss_on, s.ifd)

    def score(self, encs: list[dict]) -> list[dict]:
        """Per-sample stats for tokenized samples, in order (see :func:`score_batch`)."""
        from qgate.scoring import score_batch

        s = self.settings
        return score_batch(
            self.model,
            encs,
            pad_id=self.tokenizer.pad_token_id,
            alpha=s.alpha,
            eps=s.eps,
            batch_tokens=self.batch_tokens,
            projection=self.projection,
            ifd=s.ifd,
            debug_tokens=self.debug_tokens,
        )

    def digests(self) -> dict:
        """Digests of the loaded model and gates, as the score stage records them."""
        return loaded_digests(self.base, self.gates)


def loaded_digests(base: str, gates: str | None) -> dict:
    """``{model_digest, gates_digest}`` of a base model directory and a gates directory."""
    from qgate.model import GATES_FILE, file_digest, model_digest, resolve_base

    g = file_digest([os.path.join(gates, GATES_FILE)]) if gates else "fresh-init"
    return {"model_digest": model_digest(resolve_base(base)), "gates_digest": g}


def finite_stats(st: dict) -> bool:
    """True when a sample's nll, gate and embedding are all finite (NaN marks a poison row)."""
    return bool(
        np.isfinite(st["nll"])
        and np.isfinite(st["gate"]).all()
        and np.isfinite(st["embedding"]).all()
        and np.isfinite(st.get("prompt_embedding", 0.0)).all()
    )
