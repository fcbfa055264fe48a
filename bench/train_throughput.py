"""Training throughput: warmup (gates) and LoRA finetune tokens/s, float32 against bfloat16.

    python bench/train_throughput.py [--steps 20] [--batch-size 8] [--max-length 256]
    python bench/train_throughput.py --model-dir models/smollm2-135m   # real weights
    python bench/train_throughput.py --lengths 64,256                  # longer rows
    python bench/train_throughput.py --quick --steps 3                 # smoke run, minutes
    python bench/train_throughput.py --model-dir models/smollm2-135m --stages finetune \
        --batch-size 16 --lora-targets all-linear     # the quality bench's LoRA shape

Each stage runs the way its job does: ``qgate.warmup.run`` and ``qgate.finetune.run`` with a
``WarmupConfig`` / ``FinetuneConfig`` built by ``qgate.config_io.build``, on Ray Train with one
worker that gets every CPU (``--cpus``, torch threads to match), on an embedded local Ray
(``ray.init(num_cpus=--cpus + 1)``: the extra logical CPU holds the 0.25-CPU tokenize tasks
beside the worker). For each stage the dtypes of ``--dtypes`` run one after the other
(``TrainConfig.dtype``: ``bfloat16`` is autocast with fp32 master weights, ``float32`` is
plain fp32), ``--steps`` optimizer steps each, in a fresh run directory.

The finetune runs once per ``--dropout-impls`` value (``lora.dropout_impl``: torch's
``nn.Dropout`` against ``qgate.lora.IndexDropout``, the default on CPU), side by side.

tokens/s is read back from the stage's own ``metrics.jsonl``: the loop reports every
``report_every`` steps (here ``max(1, steps // 4)``) the real (non-pad) tokens of that window
over its wall time. The first window (model warm-up, first-call kernel selection) is
printed but left out; the figure is the mean over the other windows. Checkpoints are only
written at the last step, after the last window is timed. The stage's wall time (Ray Train
start-up, dataset tokenization and the final checkpoint included) is printed beside it.

The model: the SmolLM2-135M shape with random weights and the bench's BPE tokenizer
(``--shape smollm2``, the default; the shape is bench/score_throughput.py's), a small Qwen3
(``--shape qwen3`` with ``--hidden`` etc.; ``--quick`` uses a tiny one), or ``--model-dir DIR``
(an existing HF directory with its own tokenizer, e.g. from ``qgate import-model smollm2``).
The rows: the synthetic generator's pool (``qgate.synthetic.generate_corpus``, ``--pool``
rows: short single-turn conversations, as in the demo), or with ``--lengths LO,HI``
multi-turn conversations of log-uniform target length in [LO, HI] tokens, built from the
same pairs (bench/score_throughput.py's corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/score_throughput.py

import numpy as np  # noqa: E402
import score_throughput as st  # noqa: E402
import torch  # noqa: E402

STAGES = ("warmup", "finetune")


def parse_args(argv=None) -> argparse.Namespace:
    from qgate.hardware import cpu_native_bf16

    nproc = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per (stage, dtype)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per step (one worker)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--shape", choices=("smollm2", "qwen3"), default="smollm2")
    ap.add_argument("--model-dir", default=None, help="an existing HF model directory")
    ap.add_argument("--hidden", type=int, default=512, help="--shape qwen3")
    ap.add_argument("--layers", type=int, default=8, help="--shape qwen3")
    ap.add_argument("--heads", type=int, default=8, help="--shape qwen3")
    ap.add_argument("--kv-heads", type=int, default=4, help="--shape qwen3")
    ap.add_argument("--intermediate", type=int, default=1536, help="--shape qwen3")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE tokenizer vocab to train")
    ap.add_argument("--pool", type=int, default=1000, help="rows of the synthetic pool")
    ap.add_argument("--lengths", default=None, help="LO,HI: multi-turn rows of LO-HI tokens")
    ap.add_argument(
        "--dtypes",
        default=None,
        help="comma list (default float32,bfloat16 on CUDA and on CPUs with native bf16, "
        "else float32)",
    )
    ap.add_argument("--stages", default=",".join(STAGES), help="subset of warmup,finetune")
    ap.add_argument(
        "--dropout-impls",
        default="torch,indices",
        help="finetune: lora.dropout_impl values run side by side (torch's nn.Dropout against "
        "qgate.lora.IndexDropout)",
    )
    ap.add_argument(
        "--lora-targets", default=None, help="finetune: lora.target_modules, e.g. all-linear"
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--cpus", type=int, default=nproc, help="CPUs (and torch threads) of the worker"
    )
    ap.add_argument("--work", default=None, help="working dir (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="a tiny model and pool: smoke run")
    ap.add_argument("--seed", type=int, default=0)
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # smaller defaults; flags win
        ap.set_defaults(shape="qwen3", hidden=64, layers=2, heads=4, kv_heads=2)
        ap.set_defaults(intermediate=192, vocab=1024, pool=200, steps=4, batch_size=4)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if a.dtypes is None:
        bf16 = a.device == "cuda" or cpu_native_bf16()
        a.dtypes = "float32,bfloat16" if bf16 else "float32"
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not a.dtypes or set(a.dtypes) - set(st.SHORT) or len(set(a.dtypes)) != len(a.dtypes):
        ap.error(f"--dtypes takes distinct values of float32,bfloat16; got {a.dtypes}")
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    a.dropout_impls = [s.strip() for s in a.dropout_impls.split(",") if s.strip()]
    if not a.stages or set(a.stages) - set(STAGES):
        ap.error(f"--stages takes a subset of {','.join(STAGES)}; got {a.stages}")
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    if a.lengths:
        lo, hi = (int(x) for x in a.lengths.split(","))
        a.lengths = (lo, hi)
    return a


def build_model(a, work: str, pairs) -> tuple[str, str]:
    """(model directory, description): --model-dir, else random weights of --shape."""
    from qgate.stand_in import row_texts

    if a.model_dir:
        return os.path.abspath(a.model_dir), f"{a.model_dir} (its own weights)"
    m = argparse.Namespace(**vars(a))  # what score_throughput.build_model reads
    m.model_vocab, m.head_dim, m.max_tokens, m.save_dtype = None, None, a.max_length, torch.float32
    texts = row_texts({"messages": p} for p in pairs)
    return st.build_model(os.path.join(work, "model"), texts, m), f"random weights, {a.shape} shape"


def training_rows(a, work: str, pairs, tok) -> str:
    """The training file: the synthetic pool, or --lengths conversations; only valid rows."""
    from qgate.data import read_corpus
    from qgate.synthetic import generate_corpus

    if a.lengths:
        src = os.path.join(work, "conversations.jsonl")
        st.write_corpus(src, a.pool, pairs, tok, a.lengths[0], a.lengths[1], a.seed)
    else:
        src = generate_corpus(
            os.path.join(work, "data"), seed=a.seed, n_pool=a.pool, n_target=1, n_test=1,
            n_pretrain=1,
        )["pool"]  # fmt: skip
    rows, rejects = read_corpus(src)
    path = os.path.join(work, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["sample_id"], "messages": r["messages"]}) + "\n")
    if rejects:
        print(f"rows: {len(rejects)} invalid rows of {src} left out")
    return path


def variant_label(stage: str, impl: str) -> str:
    """A run's name in the tables: the stage, and for finetune its LoRA dropout impl."""
    return f"finetune/{impl}" if stage == "finetune" else stage


def stage_config(
    a, stage: str, dtype: str, model_dir: str, data: str, run_dir: str, impl: str = "auto"
):
    from qgate.config import FinetuneConfig, WarmupConfig
    from qgate.config_io import build

    common = {
        "run_dir": run_dir,
        "max_steps": a.steps,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "report_every": max(1, a.steps // 4),
        "checkpoint_every": a.steps,  # only at the end: no checkpoint inside a timed window
        "seed": a.seed,
        "dtype": dtype,
        "device_threads": a.cpus,
        "scaling": {
            "num_workers": 1,
            "use_gpu": a.device == "cuda",
            "resources_per_worker": {"CPU": 1.0 if a.device == "cuda" else float(a.cpus)},
        },
    }
    if stage == "warmup":
        return build(WarmupConfig, {**common, "base_model": model_dir, "corpus": [data]})
    lora = {"dropout_impl": impl}
    if a.lora_targets:
        lora["target_modules"] = a.lora_targets.split(",")
    return build(
        FinetuneConfig, {**common, "target_model": model_dir, "data": [data], "lora": lora}
    )


def run_stage(
    a, stage: str, dtype: str, model_dir: str, data: str, work: str, impl: str = "auto"
) -> dict:
    """One (stage, dtype[, dropout impl]) run through its job's runner; tokens/s from its
    metrics.jsonl."""
    from qgate import finetune as finetune_job
    from qgate import warmup as warmup_job
    from qgate.training import METRICS_FILE

    run_dir = os.path.join(work, f"run-{stage}-{dtype}-{impl}")
    cfg = stage_config(a, stage, dtype, model_dir, data, run_dir, impl)
    job = warmup_job if stage == "warmup" else finetune_job
    log = io.StringIO()  # the stage's own output and its workers' (log_to_driver)
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            summary = job.run(cfg)
    except Exception:
        sys.stderr.write(log.getvalue()[-6000:])
        raise
    finally:
        with open(os.path.join(work, f"{stage}-{dtype}-{impl}.log"), "w") as f:
            f.write(log.getvalue())
    wall = time.perf_counter() - t
    out = summary.get("out_dir") or os.path.join(run_dir, stage)
    with open(os.path.join(out, METRICS_FILE)) as f:
        hist = [json.loads(line) for line in f if line.strip()]
    tps = [h["tokens_per_s"] for h in hist]
    if not tps:
        raise RuntimeError(f"{stage} [{dtype}]: no metrics in {out}/{METRICS_FILE}")
    rest = tps[1:] or tps  # leave the first window out when there is another
    said = [ln.split("] ", 1)[-1] for ln in log.getvalue().splitlines() if "compute dtype" in ln]
    return {
        "tokens_per_s": float(np.mean(rest)),
        "first_window_tokens_per_s": tps[0],
        "windows": len(tps),
        "steps": summary["steps"],
        "report_every": cfg.report_every,
        "lm_loss_last": hist[-1].get("lm_loss"),
        "wall_s": wall,
        "compute_dtype_line": said[-1].strip() if said else None,
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    import ray
    import ray.data
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"machine: nproc={os.cpu_count()} torch={torch.__version__} device={a.device} "
        f"worker cpus/threads={a.cpus} dtypes={','.join(a.dtypes)}; {st.load()}"
    )
    tmp_ctx = tempfile.TemporaryDirectory(prefix="qgate-train-bench-") if a.work is None else None
    work = a.work or tmp_ctx.name
    os.makedirs(work, exist_ok=True)
    pairs = st.pair_pool(os.path.join(work, "pairs"), a.seed)
    model_dir, origin = build_model(a, work, pairs)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = training_rows(a, work, pairs, tok)
    from qgate.chat import tokenize_messages
    from qgate.data import read_corpus

    rows = read_corpus(data)[0]
    lens = np.array(
        [
            len(tokenize_messages(tok, r["messages"], a.max_length, "assistant")["input_ids"])
            for r in rows
        ]
    )
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    print(
        f"model: {cfg.architectures[0]} {origin}: hidden={cfg.hidden_size} "
        f"layers={cfg.num_hidden_layers} vocab={cfg.vocab_size} (tokenizer {len(tok)})"
    )
    what = f"conversations of {a.lengths[0]}-{a.lengths[1]} tokens" if a.lengths else "pool"
    print(
        f"rows: synthetic {what}, {len(rows)} rows, tokens per row (max_length {a.max_length}) "
        f"mean {lens.mean():.0f} p50/p95/max {np.percentile(lens, 50):.0f}/"
        f"{np.percentile(lens, 95):.0f}/{lens.max()}; {a.steps} steps x {a.batch_size} rows, "
        f"report_every {max(1, a.steps // 4)}"
    )
    os.environ.setdefault("RAY_worker_niceness", "0")  # workers at the caller's priority
    ray.init(
        address="local",  # a fresh embedded Ray, even when a head is running on this machine
        num_cpus=a.cpus + 1,
        num_gpus=1 if a.device == "cuda" else 0,
        include_dashboard=False,
        log_to_driver=True,  # the workers' lines (e.g. "compute dtype") go to each stage's log
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {"argv": sys.argv, "load_start": os.getloadavg(), "runs": {}}
    variants = [
        (stage, impl)
        for stage in a.stages
        for impl in (a.dropout_impls if stage == "finetune" else ["auto"])
    ]
    try:
        for stage, impl in variants:
            label = variant_label(stage, impl)
            for dt in a.dtypes:
                r = run_stage(a, stage, dt, model_dir, data, work, impl)
                results["runs"][f"{label}/{dt}"] = r
                print(
                    f"{label:<18} [{st.SHORT[dt]}] {r['tokens_per_s']:9.0f} tok/s (mean of "
                    f"{max(r['windows'] - 1, 1)} windows of {r['report_every']} steps; first "
                    f"window {r['first_window_tokens_per_s']:.0f} tok/s); stage wall "
                    f"{r['wall_s']:.0f}s; last lm loss {r['lm_loss_last']:.3f}; "
                    f"{r['compute_dtype_line']}; {st.load()}"
                )
    finally:
        ray.shutdown()
    runs = results["runs"]
    labels = [variant_label(stage, impl) for stage, impl in variants]
    print(f"\n{'stage':<19}" + "".join(f"{st.SHORT[dt] + ' tok/s':>14}" for dt in a.dtypes))
    for label in labels:
        cells = "".join(f"{runs[f'{label}/{dt}']['tokens_per_s']:>14.0f}" for dt in a.dtypes)
        print(f"{label:<19}{cells}")
    if set(a.dtypes) == {"float32", "bfloat16"}:
        for label in labels:
            ratio = (
                runs[f"{label}/bfloat16"]["tokens_per_s"] / runs[f"{label}/float32"]["tokens_per_s"]
            )
            results[f"{label}_bf16_over_fp32"] = ratio
            print(f"ratio bf16/fp32 {label}: {ratio:.2f}")
    if {"torch", "indices"} <= set(a.dropout_impls) and "finetune" in a.stages:
        for dt in a.dtypes:
            ratio = (
                runs[f"finetune/indices/{dt}"]["tokens_per_s"]
                / runs[f"finetune/torch/{dt}"]["tokens_per_s"]
            )
            results[f"finetune_indices_over_torch_{dt}"] = ratio
            print(f"ratio finetune dropout indices/torch [{st.SHORT[dt]}]: {ratio:.2f}")
    print(f"end: {st.load()}")
    results["load_end"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    if tmp_ctx is not None:
        tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
