"""Selection quality: does the gate pick better data than the baselines? (issue 7)

    python bench/quality.py [--n-pool 20000] [--seed 0] [--families F ...] [--budgets 0.1 0.3]
        [--steps 300] [--downstream | --no-downstream] [--seeds 0 1] [--out DIR] [--tiny]

Everything runs through the real stages, in one embedded Ray session:

1. a labelled synthetic corpus (``qgate.synthetic.generate_corpus``): pool with ~30% noise of
   seven kinds, target and test splits, and a pretrain split that holds loops, refusals and
   swapped answers (the "realistic" web text);
2. the tiny stand-in base (``build_stand_in``), pretrained on that split (realistic), and a
   second one pretrained on its clean rows only (clean-only);
3. per gate variant (probe+linear, mix+linear, probe+target_balanced): warmup on Ray Train
   (``qgate.warmup.run``) and scoring on Ray Data (``qgate.batch_scoring.run_scoring``);
4. per method and budget: ``qgate.selection.compute_selection``; the noise labels are read
   only here, by ``qgate.report.label_metrics`` (AUROC clean vs noisy, noise shares).

Downstream (the first corpus run, realistic or real base, the largest budget): the base is
LoRA-finetuned (``qgate.finetune.run``) on the selections of the best methods, of random, and
on the full pool, with the same number of steps, and scored by exact match on the test split
with the lm-eval local task (``qgate.evaluation.evaluate``), once per ``--seeds`` entry.

Generalisation: steps 1-4 again on a corpus with another seed and another family mix (and
other target families), which no setting here was tuned on (B). With ``--corpora C`` and
``--base-model``, also on corpus C (bench/heldout_corpus.py): other families, other sources
and six other noise kinds, none of which qgate.synthetic or the contrast negatives make;
``--corpora D`` the same with bench/heldout_corpus_d.py, a fourth generator kept out of every
choice made on A, B and C (unbalanced families, a family under two sources, six more kinds);
``--corpora E`` with bench/heldout_corpus_e.py, a fifth, run after the choice made on A-D;
``--corpora F`` with bench/heldout_corpus_f.py: E's families with noise in the prompt (a
garbled, cut-off, placeholder or context-less question over the right answer).

Writes OUT/quality.md (the table), OUT/quality.json (every number) and prints the table.
Stage outputs live under OUT as well; the bench never reuses them (a re-run starts clean).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/quality.py` from anywhere
    sys.path.insert(0, REPO)

# Families of the main corpus and of the generalisation corpus (its first three are its
# target families, as generate_corpus defines them).
MAIN_FAMILIES = (
    "arithmetic",
    "sort",
    "date_format",
    "reverse",
    "count_letter",
    "capital",
    "world_qa",
    "uppercase",
)
GEN_FAMILIES = ("max_list", "count_items", "reverse", "capital", "uppercase", "sort")
NOISE_ORDER = (
    "gibberish",
    "wrong_answer",
    "truncated",
    "copied",
    "repetition",
    "near_duplicate",
    "refusal",
)
NOISE_SHORT = ("gib", "wrong", "trunc", "copied", "rep", "dup", "refus")
SHORT = dict(zip(NOISE_ORDER, NOISE_SHORT, strict=True))


def noise_kinds(labels: dict) -> list[str]:
    """The noise kinds a corpus's labels hold: qgate.synthetic's in NOISE_ORDER, then any
    other kind (e.g. corpus C's) by name."""
    present = {v for v in labels.values() if v and v != "clean"}
    return [t for t in NOISE_ORDER if t in present] + sorted(present - set(NOISE_ORDER))


def _union_kinds(kind_lists) -> list[str]:
    """Every kind of several corpora, in noise_kinds' order (one table's columns)."""
    return noise_kinds({t: t for kinds in kind_lists for t in kinds})


@dataclass(frozen=True)
class GateVariant:
    """One warmup recipe: gate mode, quality loss, learning rate, (contrast) the corruption
    kinds of its negatives (None: WarmupConfig's default) and the token-weight exponent alpha
    of both warmup and scoring (0: every scored token weighs the same)."""

    name: str
    mode: str
    loss: str
    lr: float = 3e-3
    corruptions: tuple[str, ...] | None = None
    alpha: float = 1.0


GATES = {
    "probe_linear": GateVariant("probe_linear", "probe", "linear"),
    "mix_linear": GateVariant("mix_linear", "mix", "linear"),
    "probe_target": GateVariant("probe_target", "probe", "target_balanced"),
    # warmup.yaml's recipe: every answer token weighs the same in s_l (alpha 0)
    "probe_contrast": GateVariant("probe_contrast", "probe", "contrast", lr=1e-2, alpha=0.0),
}
# contrast gates on other sets of negatives, side by side with the shipped one (opt-in):
# the five kinds shipped before `extend` existed, and all six (both with alpha 1, as then)
NEGATIVE_SETS = {
    "probe_contrast5": ("swap", "truncate", "repeat", "shuffle", "char_noise"),
    "probe_contrast6": ("swap", "truncate", "repeat", "shuffle", "char_noise", "extend"),
}
for _name, _kinds in NEGATIVE_SETS.items():
    GATES[_name] = GateVariant(_name, "probe", "contrast", lr=1e-2, corruptions=_kinds)
# the shipped recipe with the method's perplexity token weights (alpha 1), in its warmup loss
# and its scores: warmup.yaml's recipe until 2026-12-07 (measured then as the opt-in
# "probe_contrast_a0" against this one)
GATES["probe_contrast_a1"] = GateVariant("probe_contrast_a1", "probe", "contrast", 1e-2, alpha=1.0)
VARIANT_LABELS = {g: "+".join(kinds) for g, kinds in NEGATIVE_SETS.items()}
VARIANT_LABELS["probe_contrast_a1"] = "alpha 1"
"""The opt-in contrast gates, by the label their methods carry in the table."""
REAL_GATES = ("probe_linear", "probe_contrast")
"""On a real base (--base-model) the original recipe and the contrast gate are trained."""
OPT_IN_GATES = tuple(VARIANT_LABELS)
"""Trained only when --gates names them (comparisons for one question, not every run)."""


@dataclass(frozen=True)
class Method:
    """One row of the table: a SelectConfig setting on the scores of one gate variant.

    Baselines and combined methods read the probe+linear scores: probe gates leave the
    logits equal to the base model's, so nll and IFD there are the base model's.
    """

    name: str
    gate: str
    select: dict = field(default_factory=dict)


GATE_IFD = ["gate", "ifd"]
GATE_PPL_IFD = ["gate", "perplexity", "ifd"]
PPL_IFD = ["perplexity", "ifd"]
IFD_BOTH = {"ifd": "both"}
"""Per-signal calibration: IFD within its source and the pool, the other signals within the
source."""
METHODS = (
    # baselines
    Method("random", "probe_linear", {"method": "random"}),
    Method("length", "probe_linear", {"method": "length"}),
    Method("perplexity", "probe_linear", {"method": "perplexity"}),
    Method("ifd", "probe_linear", {"method": "ifd"}),
    # the gate alone: the original recipe (probe+linear), mix mode, a target-trained gate
    Method("gate probe+linear", "probe_linear", {"method": "quality_gate", "diversity": False}),
    Method("gate probe+linear +div", "probe_linear", {"method": "quality_gate", "diversity": True}),
    Method("gate mix+linear", "mix_linear", {"method": "quality_gate", "diversity": False}),
    Method("gate mix+linear +div", "mix_linear", {"method": "quality_gate", "diversity": True}),
    Method("gate probe+target", "probe_target", {"method": "quality_gate", "diversity": False}),
    Method("gate probe+target +div", "probe_target", {"method": "quality_gate", "diversity": True}),
    Method("gate probe+contrast", "probe_contrast", {"method": "quality_gate", "diversity": False}),
    *(
        m
        for g, label in VARIANT_LABELS.items()
        for m in (
            Method(
                f"gate probe+contrast [{label}]",
                g,
                {"method": "quality_gate", "diversity": False},
            ),
            Method(
                f"worst_rank(contrast gate [{label}],ppl,ifd) src",
                g,
                {
                    "method": "worst_rank",
                    "signals": GATE_PPL_IFD,
                    "calibration": "source",
                    "diversity": False,
                },
            ),
        )
    ),
    Method(
        "worst_rank(contrast gate,ppl,ifd)",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": "pool",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(contrast gate,ppl,ifd) src",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": "source",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(contrast gate,ppl,ifd) src&pool",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": "both",
            "diversity": False,
        },
    ),
    # without perplexity, which ranks fluent noise (boilerplate, markup, reasoning that ends
    # wrong) as good on corpora C and D and drags every worst_rank that holds it
    Method(
        "worst_rank(contrast gate,ifd) src",
        "probe_contrast",
        {"method": "worst_rank", "signals": GATE_IFD, "calibration": "source", "diversity": False},
    ),
    Method(
        "worst_rank(contrast gate,ifd) src&pool",
        "probe_contrast",
        {"method": "worst_rank", "signals": GATE_IFD, "calibration": "both", "diversity": False},
    ),
    # within clusters of what the rows ask (the prompt embedding): every kind of task keeps
    # its share, and within it the rows with the worst answers go
    Method(
        "worst_rank(contrast gate,ifd) cluster",
        "probe_contrast",
        {"method": "worst_rank", "signals": GATE_IFD, "calibration": "cluster", "diversity": False},
    ),
    Method(
        "worst_rank(contrast gate,ppl,ifd) cluster",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": "cluster",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(ppl,ifd) cluster",
        "probe_contrast",
        {"method": "worst_rank", "signals": PPL_IFD, "calibration": "cluster", "diversity": False},
    ),
    # the gate within prompt clusters, IFD within the source: a cluster of broken prompts
    # (corpus F) is no longer ranked only against itself on IFD
    Method(
        "worst_rank(contrast gate clu,ifd src)",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": GATE_IFD,
            "calibration": {"gate": "cluster", "ifd": "source"},
            "diversity": False,
        },
    ),
    # only IFD, a ratio of two perplexities of the same answer, also ranked pool-wide: its
    # level means the same in every task, while perplexity's and the gate's follow the task
    Method(
        "worst_rank(contrast gate,ppl,ifd) ifd src&pool",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": IFD_BOTH,
            "diversity": False,
        },
    ),
    # the gate head: a logistic read-out of the contrast gates' layers, fitted on the
    # warmup's head negatives (qgate/gate_head.py) instead of DESIGN.md's equal weights
    Method(
        "gate head",
        "probe_contrast",
        {"method": "quality_gate", "gate_score": "head", "diversity": False},
    ),
    Method(
        "worst_rank(gate head,ifd) src",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": ["gate", "ifd"],
            "gate_score": "head",
            "calibration": "source",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(gate head,ppl,ifd) src",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "gate_score": "head",
            "calibration": "source",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(gate head,ifd)",
        "probe_contrast",
        {
            "method": "worst_rank",
            "signals": ["gate", "ifd"],
            "gate_score": "head",
            "calibration": "pool",
            "diversity": False,
        },
    ),
    Method(
        "rank_mean(contrast gate,ppl,ifd)",
        "probe_contrast",
        {"method": "rank_mean", "signals": GATE_PPL_IFD, "calibration": "pool", "diversity": False},
    ),
    # combined, percentiles over the whole pool
    Method(
        "worst_rank(gate,ppl,ifd)",
        "probe_linear",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": "pool",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(gate,ppl,ifd) +div",
        "probe_linear",
        {"method": "worst_rank", "signals": GATE_PPL_IFD, "calibration": "pool", "diversity": True},
    ),
    Method(
        "rank_mean(gate,ppl,ifd)",
        "probe_linear",
        {"method": "rank_mean", "signals": GATE_PPL_IFD, "calibration": "pool", "diversity": False},
    ),
    Method(
        "rank_mean(gate,ppl,ifd) +div",
        "probe_linear",
        {"method": "rank_mean", "signals": GATE_PPL_IFD, "calibration": "pool", "diversity": True},
    ),
    Method(
        "worst_rank(ppl,ifd)",
        "probe_linear",
        {"method": "worst_rank", "signals": PPL_IFD, "calibration": "pool", "diversity": False},
    ),
    # combined, percentiles within each source (calibration=source)
    Method(
        "worst_rank(gate,ppl,ifd) src",
        "probe_linear",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": "source",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(target gate,ppl,ifd) src",
        "probe_target",
        {
            "method": "worst_rank",
            "signals": GATE_PPL_IFD,
            "calibration": "source",
            "diversity": False,
        },
    ),
    Method(
        "worst_rank(ppl,ifd) src",
        "probe_linear",
        {"method": "worst_rank", "signals": PPL_IFD, "calibration": "source", "diversity": False},
    ),
    Method(
        "worst_rank(ppl,ifd) src&pool",
        "probe_linear",
        {"method": "worst_rank", "signals": PPL_IFD, "calibration": "both", "diversity": False},
    ),
    Method(
        "worst_rank(ppl,ifd) ifd src&pool",
        "probe_linear",
        {"method": "worst_rank", "signals": PPL_IFD, "calibration": IFD_BOTH, "diversity": False},
    ),
    Method(
        "worst_rank(ppl,ifd) src +div",
        "probe_linear",
        {"method": "worst_rank", "signals": PPL_IFD, "calibration": "source", "diversity": True},
    ),
)
CLEAN_ONLY_GATES = ("probe_linear",)
"""The clean-only base runs the methods on probe+linear scores only (baselines, the original
recipe, the combined methods): the condition exists to show how perplexity changes."""


@dataclass
class Settings:
    """Sizes and stage settings of one bench run (the defaults, or --tiny)."""

    n_pool: int = 20000
    n_target: int = 300
    n_test: int = 300
    n_pretrain: int = 4000
    hidden_size: int = 128
    num_layers: int = 4
    pretrain_epochs: int = 8
    warmup_steps: int = 300
    batch_size: int = 16
    max_length: int = 128
    finetune_steps: int = 300
    finetune_lr: float = 2e-3
    eval_limit: int | None = None
    clean_only: bool = True
    generalisation: bool = True
    downstream_top: int = 3
    parallel_gates: bool = False
    """Run the gate variants' warmup + scoring side by side (threads) instead of in turn."""
    head_negatives: int = 1000
    """Corrupted copies the contrast warmup writes for the gate head (qgate/gate_head.py)."""
    train_cpus: float = 0.5
    threads: int | None = None
    actors: int = 2
    actor_cpus: float | None = 1.0


def real_settings() -> Settings:
    """A real pretrained base (--base-model): no stand-in, one process uses both cores."""
    return Settings(
        n_pool=2000,
        n_target=100,
        n_test=200,
        n_pretrain=0,
        warmup_steps=200,
        batch_size=16,
        max_length=256,
        finetune_steps=150,
        finetune_lr=1e-3,
        clean_only=False,
        train_cpus=1.5,
        threads=2,
        actors=1,
        actor_cpus=None,
    )


def tiny_settings() -> Settings:
    """A run for CI: every method and stage, tiny sizes, one corpus, no downstream."""
    return Settings(
        n_pool=400,
        n_target=40,
        n_test=40,
        n_pretrain=300,
        hidden_size=32,
        num_layers=2,
        pretrain_epochs=1,
        warmup_steps=4,
        batch_size=8,
        max_length=96,
        finetune_steps=4,
        clean_only=False,
        generalisation=False,
        parallel_gates=True,
        head_negatives=64,
    )


# ----------------------------------------------------------------------------- stages


class Clock:
    """Wall seconds per named stage (summed over repeated calls)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


STAND_IN_DIRS = {"realistic": "base_realistic", "clean-only": "base_clean"}
"""Each stand-in condition's base model directory, under the corpus's output dir."""


def build_bases(corpus: dict, out: str, st: Settings, clock: Clock, seed: int) -> dict[str, str]:
    """The stand-in pretrained on the realistic pretrain split, and on its clean rows only."""
    import ray

    from qgate.stand_in import build_stand_in
    from qgate.synthetic import read_rows

    rows = read_rows(corpus["pretrain"])
    kw = dict(
        hidden_size=st.hidden_size,
        num_layers=st.num_layers,
        epochs=st.pretrain_epochs,
        seed=seed,
        log_every=0,
    )
    jobs = {"realistic": (os.path.join(out, STAND_IN_DIRS["realistic"]), rows)}
    if st.clean_only:
        clean = [r for r in rows if r["noise"] == "clean"]
        jobs["clean-only"] = (os.path.join(out, STAND_IN_DIRS["clean-only"]), clean)
    # One single-threaded Ray task per base, side by side: on 2 shared cores one torch
    # process with 2 threads is many times slower than two with 1 thread each.
    task = ray.remote(num_cpus=1)(build_stand_in)
    t0 = time.perf_counter()
    done = ray.get([task.remote(path, r, **kw) for path, r in jobs.values()])
    clock.seconds["pretrain"] = clock.seconds.get("pretrain", 0.0) + time.perf_counter() - t0
    return dict(zip(jobs, done, strict=True))


def warmup_and_score(
    variant: GateVariant, base: str, corpus: dict, run_dir: str, st: Settings, seed: int
) -> dict:
    """Warmup (Ray Train) then scoring (Ray Data) for one gate variant; returns dirs + times."""
    from qgate import warmup as warmup_job
    from qgate.batch_scoring import run_scoring
    from qgate.config import Actors, Scaling, ScoreConfig, WarmupConfig

    shutil.rmtree(run_dir, ignore_errors=True)  # never resume a stale Ray Train run
    wcfg = WarmupConfig(
        run_dir=run_dir,
        base_model=base,
        corpus=[corpus["pool"]],
        subset_count=st.warmup_steps * st.batch_size,
        mode=variant.mode,
        loss=variant.loss,
        target=[corpus["target"]] if variant.loss == "target_balanced" else [],
        target_fraction=0.5 if variant.loss == "contrast" else 0.25,
        **({"corruptions": list(variant.corruptions)} if variant.corruptions else {}),
        balance=0.2,
        alpha=variant.alpha,
        quality_weight=1.0,
        lr=variant.lr,
        max_steps=st.warmup_steps,
        batch_size=st.batch_size,
        max_length=st.max_length,
        seed=seed,
        head_negatives=st.head_negatives if variant.loss == "contrast" else 0,
        scaling=Scaling(num_workers=1, resources_per_worker={"CPU": st.train_cpus}),
        device_threads=st.threads,
        checkpoint_every=st.warmup_steps,
        report_every=max(1, st.warmup_steps // 4),
        max_failures=0,
    )
    t0 = time.perf_counter()
    summary = warmup_job.run(wcfg)
    t_warm = time.perf_counter() - t0
    scfg = ScoreConfig(
        run_dir=run_dir,
        base_model=base,
        corpus=[corpus["pool"]],
        max_length=st.max_length,
        alpha=variant.alpha,
        ifd=variant.mode == "probe",  # probe logits are the base's: nll and IFD are too
        actors=Actors(min_size=1, max_size=st.actors, num_cpus=st.actor_cpus),
        batch_rows=256,
        rows_per_shard=5000,
    )
    t0 = time.perf_counter()
    manifest = run_scoring(scfg)
    t_score = time.perf_counter() - t0
    return {
        "scores": manifest["output"],
        "warmup_s": t_warm,
        "score_s": t_score,
        "warmup_last": {k: summary["last"].get(k) for k in ("lm_loss", "quality_loss")},
        "tokens_per_s": manifest.get("tokens_per_s"),
    }


def target_share(table, family: dict[str, str], targets: set[str]) -> float | None:
    """Share of the selection whose family is one of the target families."""
    ids = table.column("sample_id").to_pylist()
    sel = table.column("selected").to_pylist()
    chosen = [family.get(i) for i, s in zip(ids, sel, strict=True) if s]
    return sum(f in targets for f in chosen) / len(chosen) if chosen else None


def family_distance(table, family: dict[str, str], labels: dict[str, str]) -> float | None:
    """Total variation distance between the task-family mix of the selection's clean rows and
    that of the pool's clean rows: 0 keeps every family's share, 1 keeps none of the pool's
    families. Removing noise should not move it; a ranking that favours easy families does."""
    ids = table.column("sample_id").to_pylist()
    sel = table.column("selected").to_pylist()
    clean = [(family.get(i), s) for i, s in zip(ids, sel, strict=True) if labels.get(i) == "clean"]
    pool = Counter(f for f, _ in clean)
    chosen = Counter(f for f, s in clean if s)
    if not chosen or len(pool) < 2:
        return None
    n_pool, n_chosen = sum(pool.values()), sum(chosen.values())
    return 0.5 * sum(abs(chosen[f] / n_chosen - pool[f] / n_pool) for f in pool)


def select_and_measure(
    method: Method,
    scores: str,
    corpus: dict,
    budgets: list[float],
    labels: dict,
    family: dict,
    targets: set[str],
    k_cache: dict,
) -> dict:
    """AUROC (budget-independent) and, per budget, noise shares and time of one method.

    With diversity, k is chosen by silhouette (the default) on the first selection from a
    scores directory and passed on to the others: same k-means sample and seed, so the same
    clusters, without repeating the search.
    """
    from qgate.config import SelectConfig
    from qgate.report import label_metrics
    from qgate.selection import compute_selection

    row: dict = {"method": method.name, "gate": method.gate, "select": method.select}
    row["budgets"], kinds = {}, noise_kinds(labels)
    for b in budgets:
        cfg = SelectConfig(
            scores=scores, corpus=[corpus["pool"]], budget_ratio=b, report=False, **method.select
        )
        if cfg.use_diversity and cfg.k is None and scores in k_cache:
            cfg.k = k_cache[scores]
        t0 = time.perf_counter()
        result = compute_selection(cfg)
        seconds = time.perf_counter() - t0
        if cfg.use_diversity:
            k_cache.setdefault(scores, result.reference.k)
        m = label_metrics(result.table, labels)
        row["auroc"], row["auroc_by_type"] = m["auroc"], m["auroc_by_type"]
        row["budgets"][str(b)] = {
            "noise_share": m["noise_share_selected"],
            "type_share": {t: m["selected_share"].get(t, 0.0) for t in kinds},
            "target_family_share": target_share(result.table, family, targets),
            "family_distance": family_distance(result.table, family, labels),
            "selected": int(result.order.size),
            "k": result.reference.k,
            "select_s": seconds,
        }
    return row


def _scores_variant(method: Method, runs: dict) -> str | None:
    """Whose scores a method reads: its own gate variant's; a method that uses no gate signal
    reads any probe variant's when its own did not run (probe gates leave the base's logits,
    so nll and IFD are the same); None: skip the method."""
    if method.gate in runs:
        return method.gate
    select = method.select
    uses_gate = select.get("method") == "quality_gate" or "gate" in select.get("signals", [])
    probes = [g for g in runs if GATES[g].mode == "probe"]
    return None if uses_gate or not probes else probes[0]


def run_condition(
    name: str,
    corpus: dict,
    base: str,
    gates: tuple[str, ...],
    out: str,
    st: Settings,
    budgets: list[float],
    seed: int,
    targets: set[str],
    measure_only: bool = False,
) -> dict:
    """All gate variants and methods on one (corpus, base) pair (``measure_only``: on the
    scores an earlier run left in ``out``, nothing trained or scored)."""
    from qgate.report import read_labels

    print(f"\n=== {name}: warmup + scoring for {', '.join(gates)}", flush=True)
    args = {g: (GATES[g], base, corpus, os.path.join(out, g), st, seed) for g in gates}
    if measure_only:
        none = {"warmup_s": None, "score_s": None}
        runs = {g: {"scores": os.path.join(out, g, "scores"), **none} for g in gates}
    elif st.parallel_gates:  # side by side: hides Ray start-up latency on tiny runs
        # transformers resolves its lazy attributes on first use, which is not thread-safe
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        import jobs.warmup  # noqa: F401
        import qgate.batch_scoring  # noqa: F401
        import qgate.training  # noqa: F401

        with ThreadPoolExecutor(len(gates)) as pool:
            futures = {g: pool.submit(warmup_and_score, *a) for g, a in args.items()}
            runs = {g: f.result() for g, f in futures.items()}
    else:
        runs = {g: warmup_and_score(*a) for g, a in args.items()}
    for g, r in runs.items():
        if not measure_only:
            print(f"[{name}] {g}: warmup {r['warmup_s']:.1f}s score {r['score_s']:.1f}s")
    labels = read_labels([corpus["pool"]], "noise")
    family = read_labels([corpus["pool"]], "family")
    pool_share = {t: 0.0 for t in noise_kinds(labels)}
    for lab in labels.values():
        if lab in pool_share:
            pool_share[lab] += 1 / len(labels)
    pool_targets = sum(f in targets for f in family.values()) / len(family)
    rows, k_cache = [], {}
    for method in METHODS:
        gate = _scores_variant(method, runs)
        if gate is None:
            continue
        r = select_and_measure(
            method, runs[gate]["scores"], corpus, budgets, labels, family, targets, k_cache
        )
        r["warmup_s"], r["score_s"] = runs[gate]["warmup_s"], runs[gate]["score_s"]
        rows.append(r)
        top = r["budgets"][str(budgets[-1])]
        print(
            f"[{name}] {method.name:32s} AUROC {r['auroc']:.3f} "
            f"noise@{budgets[-1]:g} {100 * top['noise_share']:.1f}%",
            flush=True,
        )
    return {
        "condition": name,
        "base": base,
        "runs": runs,
        "rows": rows,
        "pool_noise_share": sum(pool_share.values()),
        "pool_type_share": pool_share,
        "pool_target_family_share": pool_targets,
    }


# ----------------------------------------------------------------------------- dedup

DEDUP_METHODS = (
    "random",
    "perplexity",
    "ifd",
    "worst_rank(ppl,ifd) src",
    "worst_rank(contrast gate,ppl,ifd) src",
    "worst_rank(contrast gate,ppl,ifd) src&pool",
    "worst_rank(gate head,ifd) src",
)
"""The methods whose selections are measured with and without dedup."""


def dedup_effect(cond: dict, corpus: dict, out: str, budget: float) -> dict:
    """Dedup the pool (jobs/configs/dedup.yaml settings), then select each method's budget
    with and without the copies as candidates; noise shares overall and per kind."""
    import pyarrow.parquet as pq

    from qgate.config import DedupConfig, SelectConfig
    from qgate.config_io import load_config
    from qgate.dedup import run_dedup
    from qgate.report import label_metrics, read_labels
    from qgate.selection import compute_selection

    dd = os.path.join(out, "dedup")
    shutil.rmtree(dd, ignore_errors=True)
    dcfg = load_config(
        DedupConfig,
        os.path.join(REPO, "jobs", "configs", "dedup.yaml"),
        [f"corpus=[{corpus['pool']}]", f"output={dd}"],
    )
    t0 = time.perf_counter()
    m = run_dedup(dcfg)
    labels = read_labels([corpus["pool"]], "noise")
    removed = pq.read_table(os.path.join(dd, "rejects", "dedup.parquet"), columns=["sample_id"])
    removed_kinds = Counter(labels.get(i) for i in removed.column(0).to_pylist())
    result = {
        "condition": cond["condition"],
        "budget": budget,
        "dedup_s": time.perf_counter() - t0,
        "removed": m["rejects_by_reason"],
        "removed_by_kind": dict(sorted((str(k), v) for k, v in removed_kinds.items())),
        "methods": {},
    }
    names = {r["method"] for r in cond["rows"]}
    for name in (n for n in DEDUP_METHODS if n in names):
        method = next(x for x in METHODS if x.name == name)
        scores = cond["runs"][_scores_variant(method, cond["runs"])]["scores"]
        per = {}
        for variant, extra in (("without", {}), ("with", {"dedup": dd})):
            cfg = SelectConfig(
                scores=scores,
                corpus=[corpus["pool"]],
                budget_ratio=budget,
                report=False,
                **method.select,
                **extra,
            )
            lm = label_metrics(compute_selection(cfg).table, labels)
            per[variant] = {
                "noise_share": lm["noise_share_selected"],
                "type_share": {t: lm["selected_share"].get(t, 0.0) for t in noise_kinds(labels)},
            }
        result["methods"][name] = per
    return result


def dedup_table(results: list[dict]) -> str:
    """Noise share of each method's selection without and with dedup, per kind with it."""
    kinds = _union_kinds(
        per["with"]["type_share"] for res in results for per in res["methods"].values()
    )
    head = ["condition", "method", "noise without dedup", "noise with dedup"]
    head += [f"{t} (with)" for t in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for name, per in res["methods"].items():
            cells = [res["condition"], name, _pct(per["without"]["noise_share"])]
            cells.append(_pct(per["with"]["noise_share"]))
            cells += [_pct(per["with"]["type_share"].get(t)) for t in kinds]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"{r['condition']}: dedup removed {sum(r['removed'].values())} rows {r['removed']}"
        f" ({r['dedup_s']:.0f}s); by noise kind {r['removed_by_kind']}"
        for r in results
    ]
    return "\n".join(lines + [""] + notes)


def run_dedup_only(args, argv, budget: float) -> int:
    """The dedup table alone, on every condition of an earlier run's quality.json."""
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"$ {command.strip()}\nmachine: {machine()}", flush=True)
    with open(args.dedup_from) as f:
        earlier = json.load(f)
    t0 = time.perf_counter()
    results = []
    for cond in earlier["conditions"]:
        corpus = _condition_corpus(cond)
        out = os.path.join(args.out, cond["condition"].replace(" ", "_"))
        results.append(dedup_effect(cond, corpus, out, budget))
    text = "\n".join(
        [
            f"$ {command.strip()}",
            f"scores from: {args.dedup_from}",
            "",
            dedup_table(results),
            "",
            f"wall time {time.perf_counter() - t0:.0f}s; machine after: {machine()}",
        ]
    )
    _write_outputs(args.out, "dedup", text, results)
    return 0


def _write_outputs(out: str, name: str, text: str, obj) -> None:
    """Print the table text and write OUT/<name>.md and OUT/<name>.json."""
    print("\n" + text, flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _condition_corpus(cond: dict) -> dict:
    """The corpus files of a condition of an earlier run (beside its scores)."""
    scores = next(iter(cond["runs"].values()))["scores"]
    cdir = os.path.dirname(os.path.dirname(os.path.dirname(scores)))
    return {split: os.path.join(cdir, "data", f"{split}.jsonl") for split in ("pool", "test")}


# ----------------------------------------------------------------------------- downstream


def finetune_and_eval(
    data: str, base: str, test: str, run_dir: str, st: Settings, seed: int
) -> dict:
    """LoRA-finetune the stand-in on ``data`` and score exact match on ``test`` (lm-eval)."""
    from qgate import finetune as finetune_job
    from qgate.config import EvaluateConfig, FinetuneConfig, Lora, Scaling
    from qgate.evaluation import evaluate

    shutil.rmtree(run_dir, ignore_errors=True)
    fcfg = FinetuneConfig(
        run_dir=run_dir,
        target_model=base,
        data=[data],
        lr=st.finetune_lr,
        schedule="cosine",
        warmup_ratio=0.05,
        max_steps=st.finetune_steps,
        batch_size=st.batch_size,
        max_length=st.max_length,
        seed=seed,
        lora=Lora(r=16, alpha=32.0, dropout=0.05, target_modules=["all-linear"]),
        scaling=Scaling(num_workers=1, resources_per_worker={"CPU": st.train_cpus}),
        device_threads=st.threads,
        checkpoint_every=st.finetune_steps,
        report_every=max(1, st.finetune_steps // 4),
        max_failures=0,
    )
    t0 = time.perf_counter()
    summary = finetune_job.run(fcfg)
    t_ft = time.perf_counter() - t0
    ecfg = EvaluateConfig(
        run_dir=run_dir,
        model=base,
        adapter=summary["adapter"],
        test_data=test,
        batch_size=32,
        max_gen_toks=32,
        limit=st.eval_limit,
        device="cpu",
        seed=seed,
        log_samples=False,
    )
    t0 = time.perf_counter()
    res = evaluate(ecfg)
    t_ev = time.perf_counter() - t0
    return {
        "exact_match": res["tasks"]["qgate_synth"]["exact_match"],
        "n_docs": res["tasks"]["qgate_synth"].get("n_docs"),
        "finetune_s": t_ft,
        "eval_s": t_ev,
        "lm_loss": summary["last"].get("lm_loss"),
    }


def base_exact_match(base: str, test: str, out: str, st: Settings) -> float:
    """Exact match of the stand-in before finetuning (reference line)."""
    from qgate.config import EvaluateConfig
    from qgate.evaluation import evaluate

    cfg = EvaluateConfig(
        run_dir=out,
        model=base,
        adapter=None,
        test_data=test,
        output=os.path.join(out, "eval_base"),
        batch_size=32,
        max_gen_toks=32,
        limit=st.eval_limit,
        device="cpu",
        log_samples=False,
    )
    return evaluate(cfg)["tasks"]["qgate_synth"]["exact_match"]


def pick_downstream(rows: list[dict], budget: float, top: int, default: str | None) -> list[str]:
    """The ``top`` non-random methods with the lowest noise share at ``budget`` (AUROC breaks
    ties), plus the package default's row when it is not among them."""
    key = str(budget)
    ranked = sorted(
        (r for r in rows if r["method"] != "random"),
        key=lambda r: (r["budgets"][key]["noise_share"], -(r["auroc"] or 0.0)),
    )
    names = [r["method"] for r in ranked[:top]]
    if default and default not in names and any(r["method"] == default for r in rows):
        names.append(default)
    return names


REDRAWN = "random, redrawn per seed"
"""A downstream-only arm: random at the budget, the selection's seed following the finetune
seed, so its spread includes the draw of the rows (the other arms keep one selection)."""
ORACLE = "oracle: clean rows only"
"""A downstream-only ceiling: the budget's rows drawn at random from the rows the corpus labels
clean. No score can filter noise better, so it bounds what selection against noise can gain."""
FULL_POOL = Method("full pool", "probe_linear", {"method": "random"})


def run_downstream(
    cond: dict,
    corpus: dict,
    out: str,
    st: Settings,
    budget: float,
    seeds: list[int],
    methods: list[str] | None = None,
    reference_arms: bool = True,
) -> dict:
    """Finetune + exact match for the best methods (or ``methods``), and (``reference_arms``)
    random and the full pool, per seed."""
    base = cond["base"]
    default = default_method_name()
    names = methods or pick_downstream(cond["rows"], budget, st.downstream_top, default)
    if reference_arms:
        names = [*(n for n in names if n != "random"), "random", "full pool"]
    by_name = {r["method"]: r for r in cond["rows"]}
    print(f"\n=== downstream at {budget:g}: {names}, seeds {seeds}", flush=True)
    results: dict = {"budget": budget, "seeds": seeds, "methods": {}}
    results["base_exact_match"] = base_exact_match(base, corpus["test"], out, st)
    for name in names:
        redraw = name == REDRAWN
        if name in ("full pool", REDRAWN, ORACLE):
            # the full pool: every scored row (the score stage rejects a few rows finetune
            # would refuse too); REDRAWN: random at the budget, drawn again for every seed
            m, noise = Method(name, "probe_linear", {"method": "random"}), None
            ratio = 1.0 if name == "full pool" else budget
        else:
            m, ratio = next(m for m in METHODS if m.name == name), budget
            # a method the earlier run did not measure: its noise share from its selection
            row = by_name.get(name)
            noise = row["budgets"][str(budget)]["noise_share"] if row else None
        if name == ORACLE:
            s = _oracle_arm(cond, corpus, out, budget)
        elif not redraw:
            s = _select_arm(cond, corpus, out, m, ratio, None)
        per_seed, noises = [], []
        for seed in seeds:
            if redraw:
                s = _select_arm(cond, corpus, out, m, ratio, seed)
            noises.append(s["label_metrics"]["noise_share_selected"])
            run_dir = os.path.join(out, "finetune", f"{_slug(name)}-s{seed}")
            per_seed.append(finetune_and_eval(s["data"], base, corpus["test"], run_dir, st, seed))
            print(
                f"[downstream] {name:32s} seed {seed}: EM {per_seed[-1]['exact_match']:.3f} "
                f"(finetune {per_seed[-1]['finetune_s']:.0f}s, eval {per_seed[-1]['eval_s']:.0f}s)",
                flush=True,
            )
        ems = [p["exact_match"] for p in per_seed]
        results["methods"][name] = {
            "rows": s["selected"],
            "noise_share": noise if noise is not None else sum(noises) / len(noises),
            "per_seed": per_seed,
            "mean": sum(ems) / len(ems),
            "min": min(ems),
            "max": max(ems),
        }
    return results


def _select_arm(cond: dict, corpus: dict, out: str, m: Method, ratio: float, seed: int | None):
    """One downstream arm's selection (``seed``: the selection's own seed, for a redrawn
    arm); returns run_selection's summary with ``data``, the selected rows' JSONL."""
    from qgate.config import SelectConfig
    from qgate.selection import run_selection

    sel_dir = os.path.join(out, "selections", _slug(m.name) + ("" if seed is None else f"-s{seed}"))
    cfg = SelectConfig(
        scores=cond["runs"][_scores_variant(m, cond["runs"])]["scores"],
        corpus=[corpus["pool"]],
        output=sel_dir,
        budget_ratio=ratio,
        report=False,
        **m.select,
        **({} if seed is None else {"seed": seed}),
    )
    summary = run_selection(cfg)
    summary["data"] = os.path.join(sel_dir, "selected.jsonl")
    return summary


def _oracle_arm(cond: dict, corpus: dict, out: str, budget: float) -> dict:
    """The ORACLE arm: of the scored rows (the full pool's selection), ``budget`` of them
    drawn with a fixed seed from those the pool labels clean; the summary as _select_arm's."""
    import random

    from qgate import data
    from qgate.budget import budget_rows
    from qgate.config import SelectConfig
    from qgate.report import read_labels

    full = _select_arm(cond, corpus, out, FULL_POOL, 1.0, None)
    labels = read_labels([corpus["pool"]], "noise") or {}
    with open(full["data"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    clean = [r for r in rows if labels.get(r["sample_id"]) == "clean"]
    k = budget_rows(SelectConfig(budget_ratio=budget), len(rows))  # the selections' own rule
    if len(clean) < k:
        raise ValueError(f"the oracle arm needs {k} clean rows, the pool has {len(clean)}")
    picked = random.Random(0).sample(clean, k)
    path = os.path.join(out, "selections", _slug(ORACLE), "selected.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.write_jsonl(path, picked)
    return {"data": path, "selected": k, "label_metrics": {"noise_share_selected": 0.0}}


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in name)
    return "_".join(p for p in keep.split("_") if p)


def default_method_name() -> str | None:
    """The table row that equals the package default: SelectConfig()'s method, signals and
    calibration (for combined methods) and diversity, on the default warmup (probe+linear)."""
    from qgate.config import SelectConfig, WarmupConfig

    def key(cfg: SelectConfig) -> tuple:
        combined = cfg.method in ("worst_rank", "rank_mean")
        return (
            cfg.method,
            tuple(cfg.signals) if combined else (),
            cfg.calibration if combined else None,
            cfg.use_diversity,
        )

    default = key(SelectConfig())
    w = WarmupConfig.__dataclass_fields__
    gate = GateVariant("", w["mode"].default, w["loss"].default)
    for m in METHODS:
        v = GATES[m.gate]
        if key(SelectConfig(**m.select)) == default and (v.mode, v.loss) == (gate.mode, gate.loss):
            return m.name
    return None


# ----------------------------------------------------------------------------- tables


def _f(v, fmt="{:.3f}") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _pct(v) -> str:
    return _f(None if v is None else 100 * v, "{:.1f}")


def selection_table(conditions: list[dict], budgets: list[float]) -> str:
    """The one markdown table: every condition and method."""
    kinds = _union_kinds(cond["pool_type_share"] for cond in conditions)
    short = [SHORT.get(t, t) for t in kinds]
    types = " / ".join(short)
    head = ["condition", "method", "AUROC", *[f"AUROC {s}" for s in short]]
    for b in budgets:
        head += [f"noise @{b:g}", f"by type @{b:g} ({types}), %"]
    head += [f"target fam @{budgets[-1]:g}", f"family TV @{budgets[-1]:g}"]
    head += ["warmup s", "score s", "select s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cond in conditions:
        lines.append(
            f"| {cond['condition']} | *pool* | – |"
            + " – |" * len(kinds)
            + "".join(
                f" {_pct(cond['pool_noise_share'])} | "
                + " ".join(_pct(cond["pool_type_share"].get(t)) for t in kinds)
                + " |"
                for _ in budgets
            )
            + f" {_pct(cond['pool_target_family_share'])} | 0 | | | |"
        )
        for r in cond["rows"]:
            cells = [cond["condition"], r["method"], _f(r["auroc"])]
            cells += [_f(r["auroc_by_type"].get(t)) for t in kinds]
            for b in budgets:
                bb = r["budgets"][str(b)]
                cells.append(_pct(bb["noise_share"]))
                cells.append(" ".join(_pct(bb["type_share"].get(t)) for t in kinds))
            top = r["budgets"][str(budgets[-1])]
            cells.append(_pct(top["target_family_share"]))
            cells.append(_f(top.get("family_distance"), "{:.2f}"))
            cells += [_f(r["warmup_s"], "{:.0f}"), _f(r["score_s"], "{:.0f}")]
            cells.append("/".join(_f(r["budgets"][str(b)]["select_s"], "{:.1f}") for b in budgets))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def downstream_table(ds: dict) -> str:
    """Exact match on the test split per training set (mean, min..max over seeds)."""
    seeds = ds["seeds"]
    head = ["training data", "rows", "noise share", "exact match (mean)", "min..max"]
    head += [f"seed {s}" for s in seeds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(
        "| base model, no finetune | – | – | "
        + _pct(ds["base_exact_match"])
        + " | – |"
        + " – |" * len(seeds)
    )
    for name, r in ds["methods"].items():
        cells = [
            name,
            str(r["rows"]),
            _pct(r["noise_share"]),
            _pct(r["mean"]),
            f"{_pct(r['min'])}..{_pct(r['max'])}",
            *[_pct(p["exact_match"]) for p in r["per_seed"]],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """CPU count, RAM and load (other work on the machine skews wall times)."""
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs (nproc), {mem} RAM, {platform.machine()}, "
        f"Python {platform.python_version()}; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-pool", type=int, help="pool rows (default 20000; --tiny 400)")
    ap.add_argument("--seed", type=int, default=0, help="main corpus and model seed")
    ap.add_argument("--families", nargs="+", default=list(MAIN_FAMILIES))
    ap.add_argument("--gen-seed", type=int, default=1, help="generalisation corpus seed")
    ap.add_argument(
        "--warmup-seed",
        type=int,
        help="the gates' warmup seed on every corpus (default: that corpus's seed); what a"
        " second warmup on the same corpus and scores says about the warmup's own variance",
    )
    ap.add_argument("--gen-families", nargs="+", default=list(GEN_FAMILIES))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--steps", type=int, help="warmup steps (default 300; --tiny 4)")
    ap.add_argument("--finetune-steps", type=int, help="LoRA steps downstream (default 300)")
    ap.add_argument("--downstream", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="finetune seeds")
    ap.add_argument("--no-clean-only", action="store_true", help="skip the clean-only base")
    ap.add_argument("--no-generalisation", action="store_true", help="skip the second corpus")
    ap.add_argument(
        "--corpora",
        nargs="+",
        choices=["A", "B", "C", "D", "E", "F"],
        default=["A", "B"],
        help="which corpora to run (A: --seed/--families, B: --gen-seed/--gen-families, C:"
        " bench/heldout_corpus.py with --heldout-seed, D: bench/heldout_corpus_d.py with"
        " --heldout-d-seed, E: bench/heldout_corpus_e.py with --heldout-e-seed, F:"
        " bench/heldout_corpus_f.py with --heldout-f-seed; C-F need --base-model)",
    )
    ap.add_argument("--heldout-seed", type=int, default=2, help="corpus C's seed")
    ap.add_argument("--heldout-d-seed", type=int, default=3, help="corpus D's seed")
    ap.add_argument("--heldout-e-seed", type=int, default=4, help="corpus E's seed")
    ap.add_argument("--heldout-f-seed", type=int, default=5, help="corpus F's seed")
    ap.add_argument(
        "--measure-only",
        action="store_true",
        help="train and score nothing: measure every method again on the corpora and scores an"
        " earlier run left in --out (the --gates it trained)",
    )
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_quality"))
    ap.add_argument("--tiny", action="store_true", help="CI size: tiny, no downstream")
    ap.add_argument(
        "--downstream-from",
        metavar="QUALITY_JSON",
        help="run only the downstream track, on the scores of an earlier run's main condition "
        "(its quality.json); the selection table is taken from there",
    )
    ap.add_argument(
        "--dedup-from",
        metavar="QUALITY_JSON",
        help="run only the dedup table (noise share with and without dedup), on the scores of"
        " an earlier run's conditions (its quality.json)",
    )
    ap.add_argument(
        "--downstream-methods",
        nargs="+",
        help="the selection methods finetuned downstream (default: the best few by noise share,"
        f" plus the package default); random and the full pool are always added; {REDRAWN!r}"
        f" redraws random's rows for every seed; {ORACLE!r} draws them from the clean rows",
    )
    ap.add_argument(
        "--no-reference-arms",
        action="store_true",
        help="finetune only --downstream-methods (which may name random), not random and the"
        " full pool added to them (with --downstream-from, and in a full run)",
    )
    ap.add_argument(
        "--gates",
        nargs="+",
        choices=list(GATES),
        help="train only these gate variants (methods that use no gate read any probe"
        f" variant's scores); {', '.join(OPT_IN_GATES)} only when named here",
    )
    ap.add_argument(
        "--base-model",
        help="a real pretrained HF model dir (e.g. from `qgate import-model smollm2`) used as "
        "the base instead of the stand-ins: no pretraining, one 'real' condition per corpus",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; returns 0. ``argv`` as for the command line (the CI test calls this)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    args = parse_args(argv)
    st = tiny_settings() if args.tiny else real_settings() if args.base_model else Settings()
    if args.n_pool:
        st.n_pool = args.n_pool
    if args.steps:
        st.warmup_steps = args.steps
    if args.finetune_steps:
        st.finetune_steps = args.finetune_steps
    st.clean_only = st.clean_only and not args.no_clean_only
    st.generalisation = st.generalisation and not args.no_generalisation
    downstream = (not args.tiny) if args.downstream is None else args.downstream
    budgets = sorted(args.budgets)

    import ray
    import ray.data
    import torch

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # One thread per process: on 2 shared cores, torch with 2 threads in one process is many
    # times slower than 1 (its threads wait on each other while the other core is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if args.downstream_from:
            return run_downstream_only(args, argv, st, budgets[-1])
        if args.dedup_from:
            return run_dedup_only(args, argv, budgets[-1])
        return run(args, argv, st, downstream, budgets)
    finally:
        torch.set_num_threads(threads)


def run_downstream_only(args, argv, st: Settings, budget: float) -> int:
    """The downstream track alone, on the main condition of an earlier run's quality.json
    (its scores and corpus files are reused, nothing is rescored)."""
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"$ {command.strip()}\nmachine: {machine()}", flush=True)
    with open(args.downstream_from) as f:
        earlier = json.load(f)
    cond = earlier["conditions"][0]
    corpus = _condition_corpus(cond)
    t0 = time.perf_counter()
    result = run_downstream(
        cond,
        corpus,
        os.path.join(args.out, "downstream"),
        st,
        budget,
        args.seeds,
        args.downstream_methods,
        not args.no_reference_arms,
    )
    wall = time.perf_counter() - t0
    text = "\n".join(
        [
            f"$ {command.strip()}",
            f"machine: {machine()}",
            f"scores from: {args.downstream_from} (condition {cond['condition']})",
            f"settings: {json.dumps(st.__dict__)}",
            "",
            downstream_table(result),
            "",
            f"wall time {wall:.0f}s",
        ]
    )
    _write_outputs(
        args.out, "downstream", text, {"command": command, "downstream": result, "wall_s": wall}
    )
    return 0


def run(args, argv, st: Settings, downstream: bool, budgets: list[float]) -> int:
    """The bench proper (main sets up Ray and threads)."""
    from bench.heldout_corpus import HELDOUT_FAMILIES, generate_heldout
    from bench.heldout_corpus_d import HELDOUT_D_FAMILIES, generate_heldout_d
    from bench.heldout_corpus_e import HELDOUT_E_FAMILIES, generate_heldout_e
    from bench.heldout_corpus_f import HELDOUT_F_FAMILIES, generate_heldout_f
    from qgate.synthetic import SPLITS, generate_corpus

    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = [f"$ {command.strip()}", f"machine: {machine()}"]
    print("\n".join(header), flush=True)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    clock = Clock()
    corpora = [("A", args.seed, args.families)]
    if st.generalisation:
        corpora.append(("B", args.gen_seed, args.gen_families))
    corpora = [c for c in corpora if c[0] in args.corpora]
    held_out = {
        "C": (args.heldout_seed, HELDOUT_FAMILIES, generate_heldout),
        "D": (args.heldout_d_seed, HELDOUT_D_FAMILIES, generate_heldout_d),
        "E": (args.heldout_e_seed, HELDOUT_E_FAMILIES, generate_heldout_e),
        "F": (args.heldout_f_seed, HELDOUT_F_FAMILIES, generate_heldout_f),
    }
    for tag in sorted(set(args.corpora) & set(held_out)):
        if not args.base_model:
            raise SystemExit(f"--corpora {tag} needs --base-model (it has no pretrain split)")
        corpora.append((tag, *held_out[tag][:2]))
    conditions, downstream_result, corpus_info, dedups, main = [], None, {}, [], None
    for tag, seed, families in corpora:
        cdir = os.path.join(args.out, f"corpus_{tag}")
        if args.measure_only:  # the earlier run's corpus, as it wrote it
            corpus = {s: os.path.join(cdir, "data", f"{s}.jsonl") for s in SPLITS}
        else:
            shutil.rmtree(cdir, ignore_errors=True)
            corpus = clock.run(
                f"corpus {tag}",
                held_out[tag][2] if tag in held_out else generate_corpus,
                os.path.join(cdir, "data"),
                seed=seed,
                n_pool=st.n_pool,
                n_target=st.n_target,
                n_test=st.n_test,
                families=families,
                **({} if tag in held_out else {"n_pretrain": st.n_pretrain}),
            )
        targets = set(families[:3])
        corpus_info[tag] = {"seed": seed, "families": list(families), "targets": sorted(targets)}
        if args.base_model:
            bases = {"real": os.path.abspath(args.base_model)}
        elif args.measure_only:  # the stand-ins the earlier run built
            bases = {c: os.path.join(cdir, d) for c, d in STAND_IN_DIRS.items()}
            bases = {c: d for c, d in bases.items() if os.path.isdir(d)}
        else:
            bases = build_bases(corpus, cdir, st, clock, seed)
        for cname, base in bases.items():
            gates = {"realistic": tuple(g for g in GATES if g not in OPT_IN_GATES)}.get(
                cname, REAL_GATES if cname == "real" else CLEAN_ONLY_GATES
            )
            if args.gates:
                gates = tuple(g for g in gates + OPT_IN_GATES if g in args.gates)
            name = f"{tag} {cname}"
            cond = clock.run(
                f"selection {name}",
                run_condition,
                name,
                corpus,
                base,
                gates,
                os.path.join(cdir, cname),
                st,
                budgets,
                seed if args.warmup_seed is None else args.warmup_seed,
                targets,
                measure_only=args.measure_only,
            )
            conditions.append(cond)
            if cname in ("realistic", "real"):
                dedups.append(
                    clock.run(
                        f"dedup {name}",
                        dedup_effect,
                        cond,
                        corpus,
                        os.path.join(cdir, cname),
                        budgets[-1],
                    )
                )
            if main is None and cname in ("realistic", "real"):  # the first corpus run
                main = (cond, corpus, cdir)
    if downstream:  # last: the selection table is complete even if this is cut short
        main_cond, main_corpus, main_dir = main
        downstream_result = clock.run(
            "downstream",
            run_downstream,
            main_cond,
            main_corpus,
            os.path.join(main_dir, "downstream"),
            st,
            budgets[-1],
            args.seeds,
            args.downstream_methods,
            not args.no_reference_arms,
        )
    wall = time.perf_counter() - t_start

    parts = [
        *header,
        "",
        f"corpora: {json.dumps(corpus_info)}",
        f"settings: {json.dumps(st.__dict__)}",
        f"default: SelectConfig() = {default_method_name()}",
        "",
        selection_table(conditions, budgets),
    ]
    if dedups:
        parts += ["", dedup_table(dedups)]
    if downstream_result:
        parts += ["", downstream_table(downstream_result)]
    stage_s = ", ".join(f"{k} {v:.0f}s" for k, v in clock.seconds.items())
    parts += ["", f"wall time {wall:.0f}s ({stage_s})"]
    text = "\n".join(parts) + "\n"
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(
            {
                "command": command,
                "machine": machine(),
                "settings": st.__dict__,
                "corpora": corpus_info,
                "default": default_method_name(),
                "conditions": conditions,
                "dedup": dedups,
                "downstream": downstream_result,
                "wall_s": wall,
                "stage_s": clock.seconds,
            },
            f,
            indent=1,
            default=str,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
