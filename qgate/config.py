"""Typed, validated configs for every stage.

Each stage reads one YAML file into a dataclass here, plus ``key=value`` overrides from the
command line (dotted keys reach nested sections: ``scaling.num_workers=4``). Unknown keys,
wrong types and out-of-range values fail with the key's name before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal

from qgate.corruption import CORRUPTIONS, DEFAULT_CORRUPTIONS


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or out of range."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------- sections


@dataclass
class Scaling:
    """Ray Train workers: count, GPU use and resources per worker."""

    num_workers: int = 2
    """Training workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker when true."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    """Ray resources per worker; fractional CPU lets small runs share a 2-core machine."""

    def __post_init__(self):
        _check(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")


@dataclass(frozen=True)
class MinHash:
    """How signatures are made and compared. Two signatures are comparable only when made
    with equal settings (the scores manifest and the dedup manifest record them)."""

    num_perm: int = 128
    ngram: int = 5
    unit: str = "char"
    """'char': character n-grams of the normalised text (robust on short rows); 'word'."""
    threshold: float = 0.8
    """Estimated Jaccard similarity at or above which two samples are near-duplicates."""
    seed: int = 1

    def __post_init__(self):
        if self.unit not in ("char", "word"):
            raise ConfigError(f"minhash.unit must be 'char' or 'word', not {self.unit!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"minhash.threshold must be in (0, 1], not {self.threshold}")
        if self.ngram < 1 or self.num_perm < 2:
            raise ConfigError("minhash: ngram must be >= 1 and num_perm >= 2")

    def to_dict(self) -> dict:
        """Plain dict for manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> MinHash:
        """Settings from a manifest block (None: the defaults); unknown keys are refused."""
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown minhash settings: {sorted(unknown)}")
        return cls(**d)

    @cached_property
    def bands(self) -> tuple[int, int]:
        """(bands, rows per band) minimising false positives + negatives at the threshold
        (datasketch's own choice for MinHashLSH)."""
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        return int(lsh.b), int(lsh.r)


@dataclass
class TrainConfig:
    """Fields shared by the two training stages (warmup and finetune)."""

    run_dir: str = "runs/demo"
    """Root of this run's artifacts; each stage writes RUN/<stage>/."""
    name: str | None = None
    """Ray Train run name; re-launching with the same name and storage_path resumes."""
    lr: float = 3e-3
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    """Fraction of steps with linear learning-rate warm-up."""
    weight_decay: float = 0.0
    epochs: float = 1.0
    """Passes over the data; ignored when max_steps is set."""
    max_steps: int | None = None
    batch_size: int = 8
    """Rows per worker per micro-step."""
    grad_accum: int = 1
    max_length: int = 512
    loss_on: Literal["assistant", "all"] = "assistant"
    """Which tokens the LM loss counts."""
    gradient_checkpointing: bool = False
    seed: int = 0
    scaling: Scaling = field(default_factory=Scaling)
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints (default RUN/ray_train); shared storage on clusters."""
    checkpoint_every: int = 50
    report_every: int = 10
    max_failures: int = 2
    """Worker failures tolerated; training continues from the last checkpoint."""
    num_to_keep: int = 2
    device_threads: int | None = None
    """torch threads per worker on CPU (default: CPUs requested, at least 1)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype (bf16 autocast, fp32 master weights). auto: bf16 on GPUs and on CPUs
    with native bf16 (AMX / AVX512-BF16), else fp32."""

    def __post_init__(self):
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be > 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _check(self.max_length >= 8, "max_length", "must be >= 8")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.report_every >= 1, "report_every", "must be >= 1")
        _check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: unlimited)")


@dataclass
class WarmupConfig(TrainConfig):
    """Stage 1: train only the gates of a frozen base model."""

    base_model: str = ""
    """HF causal LM directory (Qwen3, Qwen2, Llama, Mistral shapes)."""
    mode: Literal["probe", "mix"] = "probe"
    bias_init: float | None = None
    """Gate bias at init (default: 0 for probe, 4 for mix)."""
    corpus: list[str] = field(default_factory=list)
    """Corpus files or globs (JSONL, JSON, parquet; local or URIs)."""
    subset_ratio: float = 1.0
    """Share of the corpus used for warmup (seeded sample)."""
    subset_count: int | None = None
    """Rows used for warmup; wins over subset_ratio."""
    target: list[str] = field(default_factory=list)
    """Optional target-task corpus, mixed in for loss=target_balanced."""
    target_fraction: float = 0.25
    """Share of each batch from the second stream: target rows (target_balanced) or
    corrupted copies of pool rows (contrast)."""
    loss: Literal["linear", "target_balanced", "contrast"] = "linear"
    """linear / target_balanced as in DESIGN.md; contrast: gates learn to tell real rows
    from corrupted copies (qgate/corruption.py), scored exactly as the score stage does."""
    quality_weight: float = 1.0
    balance: float = 0.2
    """target_balanced: pool rows weigh balance*g, target rows (2-balance)*(1-g)."""
    corruptions: list[str] = field(default_factory=lambda: list(DEFAULT_CORRUPTIONS))
    """contrast: the corruption kinds that make negatives (qgate/corruption.py)."""
    alpha: float = 1.0
    """contrast: token-weight exponent of s_l, as the score stage computes it (0: every answer
    token weighs the same); recorded with the gates, and the score stage's default."""
    gate_bias: bool = True
    """Gates with a bias (False: the original project's Linear(hidden, 1, bias=False))."""
    head_negatives: int = 0
    """Corrupted copies of this many warmup rows (another seed than contrast's) written
    beside the gates, for the score stage to score and a selection with ``gate_score: head``
    to fit the gate head on (qgate/gate_head.py); 0: none."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.base_model), "base_model", "is required")
        _check(bool(self.corpus), "corpus", "needs at least one path")
        _check(0 < self.subset_ratio <= 1, "subset_ratio", "must be in (0, 1]")
        _check(0 <= self.balance <= 2, "balance", "must be in [0, 2]")
        _check(0 < self.target_fraction < 1, "target_fraction", "must be in (0, 1)")
        _check(self.head_negatives >= 0, "head_negatives", "must be >= 0")
        if self.loss == "target_balanced":
            _check(bool(self.target), "target", "is required when loss=target_balanced")
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        _check(not bad, "corruptions", f"unknown {bad}; choose from {list(CORRUPTIONS)}")
        if self.loss == "contrast" or self.head_negatives:
            _check(bool(self.corruptions), "corruptions", "negatives need at least one kind")
        if self.loss == "contrast":
            _check(self.mode == "probe", "mode", "contrast trains probe gates (mode=probe)")


DROPOUT_IMPLS = ("auto", "torch", "indices")


@dataclass
class Lora:
    """PEFT LoRA settings (the adapter's shape; the optimizer settings live in TrainConfig)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: float = 32.0
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input (training only)."""
    dropout_impl: str = "auto"
    """How dropout masks are drawn: "torch" (nn.Dropout, one random number per element),
    "indices" (qgate.lora.IndexDropout: the same keep rate from about -ln(1-p) random indices
    per element: 1.3-1.5x faster SmolLM2 LoRA steps on CPU, where torch's per-element RNG
    costs more than the LoRA matmuls), or "auto" (indices on CPU, torch elsewhere)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Module names to adapt (default: the attention projections), or ["all-linear"]."""

    def __post_init__(self):
        _check(self.r >= 1, "lora.r", "must be >= 1")
        _check(self.alpha > 0, "lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(
            self.dropout_impl in DROPOUT_IMPLS,
            "lora.dropout_impl",
            f"must be one of {', '.join(DROPOUT_IMPLS)}",
        )
        _check(bool(self.target_modules), "lora.target_modules", "must not be empty")
        if "all-linear" in self.target_modules:
            _check(
                self.target_modules == ["all-linear"],
                "lora.target_modules",
                "'all-linear' cannot be combined with module names",
            )


@dataclass
class FinetuneConfig(TrainConfig):
    """Stage 3: LoRA-finetune a target model on the selection (same loop as warmup)."""

    lr: float = 2e-4
    """LoRA learning rate (the shared default of 3e-3 is meant for the gates)."""
    target_model: str = ""
    """HF causal LM directory to finetune (need not be the gated base)."""
    data: list[str] = field(default_factory=list)
    """Training rows, files or globs (default RUN/selection/selected.jsonl)."""
    lora: Lora = field(default_factory=Lora)
    merge: bool = False
    """Also write a merged full model (base + adapter) to OUTPUT/merged."""
    output: str | None = None
    """Where adapter/, metrics.jsonl, config.yaml (and merged/) go; default RUN/finetune."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.target_model), "target_model", "is required")

    @property
    def data_paths(self) -> list[str]:
        """The training files: ``data``, or RUN/selection/selected.jsonl."""
        return self.data or [os.path.join(self.run_dir, "selection", "selected.jsonl")]

    @property
    def out_dir(self) -> str:
        """``output``, or RUN/finetune."""
        return self.output or stage_dir(self.run_dir, "finetune")


@dataclass
class Actors:
    """The scoring actor pool."""

    min_size: int = 1
    max_size: int = 1
    num_cpus: float | None = None
    """CPUs per actor; None: an equal share of the cluster's CPUs on CPU, 1 with GPUs."""
    num_gpus: float = 0.0
    threads: int | None = None
    """torch threads per actor on CPU (default: its CPUs, at least 1)."""
    resources: dict[str, float] | None = None
    """Custom Ray resources each actor needs, e.g. {scorer: 1} to pin actors to nodes that
    have them."""

    def __post_init__(self):
        _check(1 <= self.min_size <= self.max_size, "actors", "need 1 <= min_size <= max_size")


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal over a corpus (a Ray Data job, before scoring)."""

    run_dir: str = "runs/demo"
    corpus: list[str] = field(default_factory=list)
    output: str | None = None
    """Default RUN/dedup."""
    exact: bool = True
    """Remove copies with the same prompt and answer up to case and whitespace."""
    near: bool = True
    """Remove near-copies: MinHash + LSH, at or above minhash.threshold."""
    minhash: MinHash = field(default_factory=MinHash)
    keep: Literal["first", "best"] = "first"
    """Which member of a duplicate cluster stays: the first in input order, or the best
    ``score`` in ``keep_scores`` (ties and unscored rows: input order)."""
    keep_scores: str | None = None
    """A selection.parquet whose ``score`` column ranks members for ``keep: best``."""
    rows_per_shard: int = 20000
    """Input rows per signature task (the unit of resume)."""
    num_cpus: float = 1.0
    """CPUs per signature task."""

    def __post_init__(self):
        _check(bool(self.corpus), "corpus", "needs at least one path")
        _check(self.rows_per_shard >= 1, "rows_per_shard", "must be >= 1")
        _check(
            self.keep != "best" or bool(self.keep_scores),
            "keep_scores",
            "is required with keep: best (a selection.parquet)",
        )
        _check(self.exact or self.near, "exact", "exact and near are both off: nothing to do")


@dataclass
class ScoreConfig:
    """Stage 2: score every corpus row with the gated model."""

    run_dir: str = "runs/demo"
    base_model: str = ""
    gates: str | None = None
    """Gates directory (default RUN/warmup)."""
    corpus: list[str] = field(default_factory=list)
    output: str | None = None
    """Default RUN/scores."""
    max_length: int = 1024
    loss_on: Literal["assistant", "all"] = "assistant"
    """Which tokens are scored (nll and gate weights)."""
    alpha: float | None = None
    """Token-weight exponent of the gate score s_l (0: every scored token weighs the same).
    None: the alpha a contrast warmup trained the gates with (their qgate.json), else 1."""
    eps: float = 1e-8
    embedding_dim: int | None = None
    """Project embeddings to this size with a seeded random matrix (None: hidden size)."""
    embedding_seed: int = 0
    ifd: bool = True
    """Also score the answer alone for IFD (one more forward per sample)."""
    actors: Actors = field(default_factory=Actors)
    batch_rows: int = 256
    """Rows per Ray Data batch: the window that is sorted by length."""
    batch_tokens: int = 16384
    """Cap on padded tokens per forward pass."""
    rows_per_shard: int = 5000
    """Input rows per output shard (the unit of resume)."""
    debug_tokens: bool = False
    """Also store token-level nll and gates (large)."""
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32."""
    dedup: str | None = None
    """A finished dedup run's directory: the rows it removed become rejects here, with its
    reason (duplicate_text / near_duplicate), and are not scored."""
    minhash: MinHash | None = field(default_factory=MinHash)
    """Signature settings of the ``minhash`` column (null: no column). A dedup run's own
    settings win when ``dedup`` is set, so both compare alike."""

    def __post_init__(self):
        _check(bool(self.base_model), "base_model", "is required")
        _check(bool(self.corpus), "corpus", "needs at least one path")
        _check(self.max_length >= 8, "max_length", "must be >= 8")
        _check(self.batch_rows >= 1, "batch_rows", "must be >= 1")
        _check(self.batch_tokens >= self.max_length, "batch_tokens", "must be >= max_length")
        _check(self.rows_per_shard >= 1, "rows_per_shard", "must be >= 1")
        _check(
            self.embedding_dim is None or self.embedding_dim >= 1, "embedding_dim", "must be >= 1"
        )


Calibration = Literal["pool", "source", "both", "cluster"]
SIGNALS = ("gate", "perplexity", "ifd", "length")
"""What worst_rank and rank_mean can join."""


def calibration_of(calibration: str | dict | None, signal: str) -> str:
    """The calibration one signal is ranked with: ``calibration`` itself, or its entry for
    ``signal`` when it is a per-signal mapping (``source`` for signals it does not name)."""
    if isinstance(calibration, dict):
        return calibration.get(signal, "source")
    return calibration or "pool"


SELECT_METHODS = (
    "quality_gate",
    "perplexity",
    "ifd",
    "length",
    "random",
    "worst_rank",
    "rank_mean",
)


@dataclass
class SelectConfig:
    """Selection: score -> rank -> (diversity) -> budget."""

    run_dir: str = "runs/demo"
    scores: str | None = None
    """Scores directory (default RUN/scores)."""
    more_scores: list[str] = field(default_factory=list)
    """Further scores directories selected together with ``scores`` (same model, gates and
    scoring settings): how a grown pool is recalibrated after ``qgate extend`` runs. Set
    ``corpus`` to every scored corpus then."""
    corpus: list[str] = field(default_factory=list)
    """The scored corpus, to join selected rows back (same paths as the score stage)."""
    dedup: str | None = None
    """A dedup run over the scored corpus: only its kept rows are candidates (for dedup run
    after scoring, e.g. with keep: best; scoring with ``dedup`` instead skips the copies)."""
    output: str | None = None
    """Default RUN/selection."""
    method: Literal[SELECT_METHODS] = "worst_rank"
    """Default: worst_rank over perplexity and IFD ranked within each source, the winner of
    bench/quality.py (BENCHMARKS.md, "Selection quality"); every other method stays selectable."""
    signals: list[str] = field(default_factory=lambda: ["perplexity", "ifd"])
    """Signals joined by worst_rank / rank_mean (gate, perplexity, ifd, length)."""
    calibration: Calibration | dict[str, Calibration] = "source"
    """worst_rank / rank_mean: rank each signal within the whole pool, or within the sample's
    own source (perplexity and IFD levels differ by task and source), or ``both``: the lower
    of the two, so a row must rank well in its source and in the pool (a source does not get
    its share of the budget whatever its rows are worth). A mapping sets it per signal, e.g.
    ``{ifd: both}``; signals it does not name use ``source``."""
    calibration_min_rows: int = 200
    """calibration=source/both: sources with fewer rows are ranked against the whole pool."""
    calibration_k: int | None = None
    """calibration=cluster: each signal is ranked within the row's cluster of prompts
    (k-means on the scores' ``prompt_embedding``: what was asked, not how it was answered),
    so every kind of task keeps its share while its worst answers go. k clusters; None:
    one per 64 scored rows, 2 to 256. Clusters under 16 rows use the pool's tables."""
    budget_ratio: float = 0.3
    budget_count: int | None = None
    """Rows to select; wins over budget_ratio."""
    source_quotas: dict[str, float] | None = None
    """Max share of the budget per source (e.g. {web: 0.5})."""
    gate_score: Literal["formula", "head"] = "formula"
    """How the gate signal q is made from the per-layer gate scores: DESIGN.md's formula
    (equal layer weights), or the gate head fitted on the warmup's head negatives
    (qgate/gate_head.py; needs gates warmed up with head_negatives > 0)."""
    tau: float = 0.0
    eps: float = 1e-8
    ppl_band: list[float] | None = None
    """perplexity method: keep rows whose nll quantile lies in [lo, hi]."""
    diversity: bool | None = None
    """Cluster then round-robin (default: on for quality_gate, off for combined methods)."""
    features: Literal["embedding", "gate"] = "embedding"
    k: int | None = None
    """Clusters; None chooses k by silhouette over [k_min, k_max] on a sample."""
    k_min: int = 2
    k_max: int = 32
    fit_sample: int = 50000
    """Rows sampled (seeded) to fit k-means; all rows are then assigned."""
    seed: int = 0
    report: bool = True
    label_column: str = "noise"
    """Ground-truth label column in the corpus, used by the report only (if present)."""

    def __post_init__(self):
        _check(0 < self.budget_ratio <= 1, "budget_ratio", "must be in (0, 1]")
        _check(self.budget_count is None or self.budget_count >= 1, "budget_count", "must be >= 1")
        _check(self.k is None or self.k >= 1, "k", "must be >= 1")
        _check(self.calibration_k is None or self.calibration_k >= 1, "calibration_k", ">= 1")
        _check(self.calibration_min_rows >= 1, "calibration_min_rows", "must be >= 1")
        _check(2 <= self.k_min <= self.k_max, "k_min", "need 2 <= k_min <= k_max")
        bad = [s for s in self.signals if s not in SIGNALS]
        _check(not bad, "signals", f"unknown {bad}; choose from {sorted(SIGNALS)}")
        if isinstance(self.calibration, dict):
            bad = sorted(set(self.calibration) - set(SIGNALS))
            _check(not bad, "calibration", f"unknown signal(s) {bad}; choose from {SIGNALS}")
        if self.ppl_band is not None:
            lo_hi = self.ppl_band
            ok = len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 1
            _check(ok, "ppl_band", "must be [lo, hi] with 0 <= lo < hi <= 1")
        for src, share in (self.source_quotas or {}).items():
            _check(0 < share <= 1, f"source_quotas.{src}", "must be in (0, 1]")

    def calibrates_by_source(self) -> bool:
        """Whether any signal is ranked within its source (per-source tables are needed)."""
        return any(calibration_of(self.calibration, s) in ("source", "both") for s in self.signals)

    def calibrates_by_cluster(self) -> bool:
        """Whether any signal is ranked within its prompt cluster (k-means is fitted)."""
        return any(calibration_of(self.calibration, s) == "cluster" for s in self.signals)

    @property
    def use_diversity(self) -> bool:
        """Diversity is on by default for quality_gate only. The combined methods default to
        global rank: round-robin over clusters took 2-3x more noise into the selection in
        bench/quality.py (BENCHMARKS.md), as clusters that are mostly noise get equal turns."""
        if self.diversity is not None:
            return self.diversity
        return self.method == "quality_gate"


@dataclass
class ExtendConfig:
    """Incremental selection: decide newly scored rows under an existing reference and
    append the passing ones to the selection log (nothing already scored is rescored)."""

    run_dir: str = "runs/demo"
    scores: list[str] = field(default_factory=list)
    """The new rows' scores directories (scored with the reference's model and settings)."""
    corpus: list[str] = field(default_factory=list)
    """The new rows' corpus files (default: what those scores' manifests read)."""
    reference: str | None = None
    """Default RUN/selection/reference.json."""
    pool_scores: list[str] | None = None
    """Scores whose rows new ones must not copy (default: the reference's own scores)."""
    log: str | None = None
    """The selection log (default RUN/selection/log.jsonl)."""
    max_commits: int | None = None
    """Quota: the log holds at most this many samples (null: no cap)."""
    recalibrate_after: float = 0.2
    """Warn to recalibrate once the log holds this share of the reference's scored pool."""

    def __post_init__(self):
        _check(bool(self.scores), "scores", "needs at least one scores directory")
        _check(self.max_commits is None or self.max_commits >= 0, "max_commits", "must be >= 0")
        _check(self.recalibrate_after > 0, "recalibrate_after", "must be > 0")

    @property
    def reference_path(self) -> str:
        """reference, or RUN/selection/reference.json."""
        return self.reference or os.path.join(
            stage_dir(self.run_dir, "selection"), "reference.json"
        )

    @property
    def log_path(self) -> str:
        """log, or RUN/selection/log.jsonl."""
        return self.log or os.path.join(stage_dir(self.run_dir, "selection"), "log.jsonl")


LOCAL_TASK = "qgate_synth"


@dataclass
class EvaluateConfig:
    """Evaluation with lm-eval: a model (plus an optional PEFT adapter) on named tasks."""

    run_dir: str = "runs/demo"
    model: str = ""
    """HF causal LM directory; default: the base recorded in the adapter's adapter_config.json."""
    adapter: str | None = "auto"
    """PEFT adapter directory; 'auto' = RUN/finetune/adapter (must exist); null = model alone."""
    tasks: list[str] = field(default_factory=lambda: [LOCAL_TASK])
    """lm-eval task names. qgate_synth is the local exact-match task built from test_data."""
    test_data: str | None = None
    """JSONL of chat rows for qgate_synth (default RUN/data/test.jsonl); the reference is the
    row's `answer`, else its last assistant turn."""
    task_dir: str | None = None
    """Where the qgate_synth YAML and its data copy are written (default OUTPUT/tasks)."""
    include_path: list[str] = field(default_factory=list)
    """More directories of lm-eval task YAMLs (your own local tasks)."""
    limit: int | None = None
    """Docs per task (None: all). For smoke runs only: the scores are not comparable."""
    num_fewshot: int | None = None
    """Override the tasks' few-shot count (qgate_synth is zero-shot)."""
    batch_size: int = 8
    max_gen_toks: int = 64
    """Generation budget of qgate_synth (greedy, stops at the tokenizer's eos)."""
    apply_chat_template: bool = False
    """Wrap every task's prompt in the model's chat template (lm-eval's option; for hub
    tasks like gsm8k on an instruct model). qgate_synth is rendered with the chat template
    either way: pre-rendered when false, by lm-eval from the raw user turn when true."""
    output: str | None = None
    """Default RUN/eval: results.json, samples_<task>.jsonl, tasks/."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Inference dtype. auto: bf16 on GPUs that have it, fp32 on CPU even with native bf16:
    lm-eval's generation loop there gained only 1.13x from bf16 and exact match moved by up
    to 2 points (BENCHMARKS.md). Compare exact match only within one dtype."""
    seed: int = 0
    offline: bool = True
    """Set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE so nothing is downloaded; set false to run
    hub tasks (MMLU, GSM8K, BBH) on a machine with hub access."""
    log_samples: bool = True
    """Also write every prompt, generation and score to samples_<task>.jsonl."""

    def __post_init__(self):
        _check(bool(self.tasks), "tasks", "needs at least one task name")
        _check(self.adapter != "", "adapter", "must be a directory, 'auto' or null")
        _check(
            bool(self.model) or self.adapter is not None,
            "model",
            "is required when adapter is null",
        )
        _check(self.limit is None or self.limit >= 1, "limit", "must be >= 1")
        _check(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", "must be >= 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.max_gen_toks >= 1, "max_gen_toks", "must be >= 1")
        from qgate.hardware import valid_device  # lazy: configs import without torch

        ok = valid_device(self.device)
        _check(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def out_dir(self) -> str:
        """RUN/eval unless ``output`` is set."""
        return self.output or stage_dir(self.run_dir, "eval")

    @property
    def adapter_dir(self) -> str | None:
        """The adapter directory, with 'auto' resolved to RUN/finetune/adapter."""
        if self.adapter == "auto":
            return os.path.join(stage_dir(self.run_dir, "finetune"), "adapter")
        return self.adapter

    @property
    def test_path(self) -> str:
        """test_data, or RUN/data/test.jsonl."""
        return self.test_data or os.path.join(self.run_dir, "data", "test.jsonl")


@dataclass
class ServeConfig:
    """The live scoring endpoint (serve/app.py): artifacts, batching, replicas, limits, auth.

    These are the ``args:`` of the application in serve/config.yaml. The scoring settings
    (max_length, loss_on, alpha, eps, embedding projection, ifd) are not here: they come from
    the reference's ``scoring`` block, so the endpoint gives the batch job's values.
    """

    run_dir: str = "runs/demo"
    reference: str | None = None
    """Selection reference.json (default RUN/selection/reference.json)."""
    scores: str | None = None
    """Scores directory whose _manifest.json names the model and gates (default RUN/scores)."""
    score_only: bool = False
    """Serve without a reference: settings from the scores manifest, q null, /v1/select 409."""
    base_model: str | None = None
    """HF model directory (default: the model recorded in the scores manifest)."""
    gates: str | None = None
    """Gates directory (default: the gates recorded in the scores manifest)."""
    check_digests: bool = True
    """Refuse to start when the model/gates differ from those the reference was scored with."""
    selection_log: str | None = None
    """Where ``/v1/select`` with ``commit: true`` appends (default RUN/selection/log.jsonl)."""
    commit_quota: int | None = None
    """The selection log holds at most this many samples (null: no cap)."""
    device: str = "auto"
    """'auto' (cuda when visible), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: the dtype the reference was scored in; another is refused (scores would differ)."""
    max_batch_size: int = 32
    """Samples per dynamic batch (@serve.batch); 1 turns batching off."""
    batch_wait_timeout_s: float = 0.0
    """How long a partial batch waits for more samples. 0 runs whatever queued while the
    previous batch computed (no added latency; batches fill under load); a few ms can help
    where a batch costs about the same as one sample (GPU)."""
    batch_tokens: int = 16384
    """Cap on padded tokens per forward pass inside a batch."""
    max_samples: int = 64
    """Samples per request; more gets 413."""
    max_chars: int = 20000
    """Characters per sample (the sample serialized as JSON); more gets 422."""
    api_key_env: str | None = "QGATE_API_KEY"
    """Environment variable (read in the ingress replica) holding the API key; unset: no auth."""
    api_key_file: str | None = None
    """File holding the API key; wins over api_key_env."""
    model_replicas: int = 1
    """Model replicas (ignored when model_autoscaling is set)."""
    model_autoscaling: dict[str, int | float] | None = None
    """Ray Serve autoscaling_config of the model deployment (min_replicas, max_replicas, ...)."""
    model_num_cpus: float = 1.0
    """CPUs per model replica; also its torch thread count on CPU."""
    model_num_gpus: float = 0.0
    model_max_ongoing_requests: int = 256
    """Requests in flight per model replica; must be >= max_batch_size (one-sample requests
    must be able to fill a batch). More wait in the caller's router, which backs off up to
    0.5 s between tries: size it for the expected concurrency."""
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.25
    ingress_max_ongoing_requests: int = 256
    """HTTP requests in flight per ingress replica."""

    def __post_init__(self):
        for key in ("max_batch_size", "batch_tokens", "max_samples", "max_chars"):
            _check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("model_replicas", "ingress_replicas", "ingress_max_ongoing_requests"):
            _check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("batch_wait_timeout_s", "model_num_cpus", "model_num_gpus", "ingress_num_cpus"):
            _check(getattr(self, key) >= 0, key, "must be >= 0")
        _check(
            self.model_max_ongoing_requests >= self.max_batch_size,
            "model_max_ongoing_requests",
            f"must be >= max_batch_size ({self.max_batch_size}), or a batch can never fill",
        )
        from qgate.hardware import valid_device  # lazy: configs import without torch

        ok = valid_device(self.device)
        _check(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(
            not (self.score_only and self.reference),
            "score_only",
            "cannot be combined with reference (a reference is what decisions come from)",
        )


def stage_dir(run_dir: str, stage: str) -> str:
    """RUN/<stage>, the folder each stage writes its artifacts to."""
    return os.path.join(run_dir, stage)
