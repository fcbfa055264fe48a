"""The one training loop, run inside Ray Train (gates in warmup, LoRA in finetune).

The driver (:func:`fit`) turns canonical rows into one Ray Dataset per worker rank (the
assignment of rows to ranks is fixed, so a restarted worker sees the same data), tokenizes
them with Ray Data, and starts a ``TorchTrainer``. Each worker builds its model through the
stage's builder, trains only the parameters the builder names, and reports metrics and
checkpoints with ``ray.train.report``.

Resume is exact: the data order of every epoch is a seeded permutation, so the position in
the data follows from the step counter, which is restored from the checkpoint with the
optimizer, scheduler and metric history. A re-launch with the same run name and storage
path, or a worker replaced after a failure, continues from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from qgate import losses
from qgate.config import FinetuneConfig, TrainConfig, WarmupConfig
from qgate.config_io import to_dict
from qgate.lora import build_finetune, export_finetune

ARTIFACT_DIR = "artifact"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """How many rows each rank holds and how many optimizer steps the run takes."""

    rows_per_rank: list[int]
    targets_per_rank: list[int]
    pool_per_batch: int
    target_per_batch: int
    micro_per_epoch: int
    total_steps: int


def make_plan(
    cfg: TrainConfig, n_rows: int, n_target: int = 0, target_fraction: float = 0.0
) -> Plan:
    """Split rows over ranks and derive the step count (every rank runs the same count)."""
    world = cfg.scaling.num_workers
    if n_rows < world:
        raise ValueError(f"{n_rows} training rows cannot feed {world} workers")
    per_rank = [len(range(r, n_rows, world)) for r in range(world)]
    tgt_rank = [len(range(r, n_target, world)) for r in range(world)]
    t_batch = max(1, round(cfg.batch_size * target_fraction)) if n_target else 0
    if n_target and min(tgt_rank) == 0:
        raise ValueError(f"{n_target} target rows cannot feed {world} workers")
    p_batch = cfg.batch_size - t_batch
    if p_batch < 1:
        raise ValueError("batch_size too small for the target fraction")
    micro = math.ceil(max(per_rank) / p_batch)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro / cfg.grad_accum))
    return Plan(per_rank, tgt_rank, p_batch, t_batch, micro, total)


def assign_ranks(rows: list[dict], world: int, seed: int) -> list[dict]:
    """Deterministic shuffle (by seed, over rows sorted by sample_id) and round-robin ranks."""
    rows = sorted(rows, key=lambda r: r["sample_id"])
    random.Random(seed).shuffle(rows)
    return [dict(r, order=i, rank=i % world) for i, r in enumerate(rows)]


def _perm(n: int, seed: int, rank: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, rank, epoch]).permutation(n)


def micro_batch_indices(
    plan: Plan, rank: int, seed: int, micro: int
) -> tuple[list[int], list[int]]:
    """Row and target indices (into the rank's sorted lists) of micro-batch number ``micro``."""
    n = plan.rows_per_rank[rank]
    epoch, pos = divmod(micro, plan.micro_per_epoch)
    perm = _perm(n, seed, rank, epoch)
    idx = [int(perm[(pos * plan.pool_per_batch + j) % n]) for j in range(plan.pool_per_batch)]
    tidx = []
    if plan.target_per_batch:
        nt = plan.targets_per_rank[rank]
        for j in range(micro * plan.target_per_batch, (micro + 1) * plan.target_per_batch):
            tidx.append(int(_perm(nt, seed + 1, rank, j // nt)[j % nt]))
    return idx, tidx


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Learning-rate multiplier per step: linear warm-up, then constant/linear/cosine."""
    warm = int(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total_steps - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1 - frac)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    return f


# ----------------------------------------------------------------------------- tokenizing


def tokenize_batch(batch: dict, tokenizer_path: str, max_length: int, loss_on: str) -> dict:
    """Ray Data UDF: canonical rows -> input_ids / labels (object arrays of int lists)."""
    from qgate.chat import load_tokenizer, tokenize_messages

    tok = load_tokenizer(tokenizer_path)
    ids, labels = [], []
    for messages in batch["messages"]:
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        enc = tokenize_messages(tok, msgs, max_length, loss_on)
        ids.append(np.asarray(enc["input_ids"], dtype=np.int64))
        labels.append(np.asarray(enc["labels"], dtype=np.int64))
    out = {k: batch[k] for k in ("sample_id", "order", "is_target")}
    out["input_ids"] = np.array(ids + [None], dtype=object)[:-1]
    out["labels"] = np.array(labels + [None], dtype=object)[:-1]
    return out


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows into tensors."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    is_target = torch.tensor([bool(r["is_target"]) for r in rows])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "is_target": is_target}


# ----------------------------------------------------------------------------- stages


def build_warmup(cfg: WarmupConfig, device):
    """Gated base model; only the gates train. Returns (model, tokenizer, trainable, meta)."""
    from qgate.hardware import resolve_dtype
    from qgate.model import gate_parameters, load_gated_model

    model, tok, meta = load_gated_model(
        cfg.base_model,
        device=device,
        dtype=resolve_dtype(cfg.dtype, device),  # the base is frozen: no fp32 masters needed
        mode=cfg.mode,
        bias_init=cfg.bias_init,
        seed=cfg.seed,
        bias=cfg.gate_bias,
    )
    meta.extra = {"loss": cfg.loss, "quality_weight": cfg.quality_weight, "balance": cfg.balance}
    if cfg.loss == "contrast":
        meta.extra |= {"corruptions": list(cfg.corruptions), "alpha": cfg.alpha}
    trainable = gate_parameters(model)
    for p in trainable.values():
        p.requires_grad_(True)
    return model, tok, trainable, meta


def export_warmup(model, meta, out_dir: str) -> None:
    """Write gates.safetensors + qgate.json (with a digest of the frozen base weights)."""
    from qgate.model import base_digest, save_gates

    meta.extra = dict(meta.extra or {}, base_digest=base_digest(model))
    save_gates(model, out_dir, meta)


STAGES = {
    "warmup": (WarmupConfig, build_warmup, export_warmup),
    "finetune": (FinetuneConfig, build_finetune, export_finetune),
}


# ----------------------------------------------------------------------------- worker loop


def _save_checkpoint(path, model, meta, trainable, optimizer, scheduler, step, history, export):
    os.makedirs(path, exist_ok=True)
    state = {
        "step": step,
        "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(state, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in history)
    export(model, meta, os.path.join(path, ARTIFACT_DIR))


def _gated_step(model, batch: dict, cfg: WarmupConfig):
    """Warmup forward: the decoder body with gates, nll only at the scored positions.

    Returns (summed nll, gates (B, L, T), scored mask (B, T), token weights (B, T)): the same
    token selection and ppl weights as the score stage, and no (B, T, V) logits.
    """
    from qgate.model import forward
    from qgate.scoring import scored_token_nll, token_weights

    hidden, gates = forward(model, batch["input_ids"], batch["attention_mask"], body_only=True)
    nll, mask = scored_token_nll(model, hidden, batch["labels"])  # grads flow in mix mode
    weights = token_weights(nll.detach(), mask, cfg.alpha, 1e-8) if cfg.loss == "contrast" else None
    return (nll * mask).sum(), gates.float(), mask, weights


def _lm_sum(model, batch: dict) -> torch.Tensor:
    """Finetune forward: the decoder body, then the LM head only at the labelled positions;
    returns the summed nll, with no (B, T, V) logits built for prompt or padding tokens."""
    from qgate.model import forward
    from qgate.scoring import scored_token_nll

    hidden, _ = forward(
        model, batch["input_ids"], batch["attention_mask"], return_gates=False, body_only=True
    )
    nll, mask = scored_token_nll(model, hidden, batch["labels"])
    return (nll * mask).sum()


def length_groups(rows: list[dict], device) -> list[list[int]]:
    """A micro-batch's rows cut into groups of similar length (qgate.scoring.micro_batches,
    the scoring stage's partition), none padded wider than the micro-batch's longest row.

    Padding every row to the batch's longest made a 16-row batch of the synthetic pool about
    half padding (SmolLM2's tokenizer); the groups keep only the padding that saves a call."""
    from qgate.scoring import device_call_tokens, micro_batches

    lengths = [len(r["input_ids"]) for r in rows]
    return micro_batches(lengths, len(rows) * max(lengths), device_call_tokens(device))


def _all_reduce_grads(params: list, world: int) -> None:
    """Average gradients over ranks in one flat all-reduce (what DDP would do, for a model
    that is not wrapped: both stages train a few million weights at most)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def train_loop(loop_cfg: dict) -> None:
    """Ray Train worker entry: build, restore, train, report. Runs on every rank."""
    import ray.train
    import ray.train.torch

    from qgate.config_io import build
    from qgate.hardware import resolve_dtype, set_cpu_threads

    stage = loop_cfg["stage"]
    cfg_cls, builder, export = STAGES[stage]
    cfg = build(cfg_cls, loop_cfg["cfg"])
    plan = Plan(**loop_cfg["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    set_cpu_threads(device, loop_cfg["threads"])
    torch.manual_seed(cfg.seed + rank)
    pool, targets = _rank_rows(rank)

    model, tok, trainable, meta = builder(cfg, device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, plan.total_steps))
    step, history = _restore(trainable, optimizer, scheduler)
    resumed_from = step
    if step and rank == 0:
        print(f"[{stage}] resumed from checkpoint at step {step}/{plan.total_steps}", flush=True)

    # Both stages train few weights (gates, LoRA adapters): their gradients are all-reduced
    # by hand (below), so the model keeps its body-only forward (DDP needs its own forward).
    model = model.to(device)
    use_amp = resolve_dtype(cfg.dtype, device) == torch.bfloat16  # bf16 autocast, fp32 masters
    if rank == 0:
        print(f"[{stage}] compute dtype: {'bfloat16' if use_amp else 'float32'}", flush=True)
    fault = loop_cfg.get("fault") or {}

    window = _Window(start_step=step)
    while step < plan.total_steps:
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + rank)  # resume-exact dropout
        for a in range(cfg.grad_accum):
            idx, tidx = micro_batch_indices(plan, rank, cfg.seed, step * cfg.grad_accum + a)
            rows = [pool[i] for i in idx] + [targets[i] for i in tidx]
            _micro_step(
                model, rows, tok.pad_token_id, device, cfg, use_amp, window, stage == "warmup"
            )
        if world > 1:
            _all_reduce_grads(params, world)
        optimizer.step()
        scheduler.step()
        step += 1
        _maybe_fault(fault, stage, step, rank, world)

        last = step == plan.total_steps
        if step % cfg.report_every and step % cfg.checkpoint_every and not last:
            continue
        metrics = window.metrics(cfg, plan, step, world, scheduler.get_last_lr()[0])
        metrics["resumed_from"] = resumed_from
        history.append(metrics)
        if rank == 0:
            window.print_progress(stage, metrics, plan.total_steps)
        window = _Window(start_step=step)
        report = {k: v for k, v in metrics.items() if k != "gate_mean"}
        if step % cfg.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                ck = None
                if rank == 0:
                    _save_checkpoint(
                        d, model, meta, trainable, optimizer, scheduler, step, history, export
                    )
                    ck = ray.train.Checkpoint.from_directory(d)
                ray.train.report(report, checkpoint=ck)
        else:
            ray.train.report(report)


def _rank_rows(rank: int) -> tuple[list[dict], list[dict]]:
    """This rank's (pool rows, target rows) from its Ray Data shard, in the driver's order."""
    import ray.data
    import ray.train

    ray.data.DataContext.get_current().enable_progress_bars = False  # rank logs stay readable
    shard = ray.train.get_dataset_shard(f"rank_{rank}")
    rows = sorted(shard.iter_rows(), key=lambda r: r["order"])
    return [r for r in rows if not r["is_target"]], [r for r in rows if r["is_target"]]


def _restore(trainable: dict, optimizer, scheduler) -> tuple[int, list[dict]]:
    """(step, metrics history) from Ray Train's latest checkpoint, restoring the trainable
    weights, optimizer and schedule in place; (0, []) on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, []
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        history = _read_history(os.path.join(d, METRICS_FILE))
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(state["trainable"][k])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], history


class _Window:
    """Running sums of the steps since the last report: losses, tokens, per-layer gate means."""

    def __init__(self, start_step: int):
        self.lm = self.q = 0.0
        self.n = self.tokens = 0
        self.gate = None
        self.t0, self.start_step = time.time(), start_step

    def metrics(self, cfg, plan: Plan, step: int, world: int, lr: float) -> dict:
        """The report for this window (tokens/s summed over ranks)."""
        tokens = torch.tensor([self.tokens], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(tokens)
        n = max(self.n, 1)
        metrics = {
            "step": step,
            "epoch": round(step * cfg.grad_accum / plan.micro_per_epoch, 4),
            "lm_loss": self.lm / n,
            "lr": lr,
            "tokens_per_s": float(tokens.item()) / max(time.time() - self.t0, 1e-9),
        }
        if self.gate is not None:
            metrics["quality_loss"] = self.q / n
            metrics["gate_mean"] = [round(float(g) / n, 6) for g in self.gate]
        return metrics

    def print_progress(self, stage: str, metrics: dict, total: int) -> None:
        """One progress line: step, losses, throughput and the time left."""
        step = metrics["step"]
        done = step - self.start_step
        eta = (total - step) * (time.time() - self.t0) / max(done, 1)
        extra = f" q {metrics['quality_loss']:.4f}" if "quality_loss" in metrics else ""
        print(
            f"[{stage}] step {step}/{total} lm {metrics['lm_loss']:.4f}{extra} "
            f"{metrics['tokens_per_s']:.0f} tok/s eta {eta:.0f}s",
            flush=True,
        )


def _micro_step(model, rows, pad_id, device, cfg, use_amp, window: _Window, quality) -> None:
    """Forward and backward of one micro-batch in length groups (length_groups): LM loss,
    plus the gate quality loss in warmup (``quality``); adds its figures to the window.

    Both losses are means over the micro-batch, the LM loss over its labelled tokens and the
    quality loss over its rows (losses.quality_terms). Each group adds its sums over the
    micro-batch's counts, so the accumulated gradient is the one of the micro-batch padded
    as one (equal within float rounding; dropout draws differ)."""
    n_tokens = max(1, sum(int((np.asarray(r["labels"][1:]) != -100).sum()) for r in rows))
    n_rows = len(rows)
    lm = q = 0.0
    gate_sum = None
    for group in length_groups(rows, device):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in group], pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            if quality:
                lm_sum, gates, mask, weights = _gated_step(model, batch, cfg)
            else:
                lm_sum = _lm_sum(model, batch)
        loss = lm_sum / n_tokens
        if quality:
            terms = losses.quality_terms(
                gates, mask, cfg.loss, batch["is_target"], cfg.balance, weights
            )
            loss = loss + cfg.quality_weight * terms.sum() / n_rows
            q += terms.sum().item()
            g = losses.gate_means(gates.detach(), mask).sum(0)
            gate_sum = g if gate_sum is None else gate_sum + g
        (loss / cfg.grad_accum).backward()
        lm += lm_sum.item()
        window.tokens += int(batch["attention_mask"].sum())
    window.lm += lm / n_tokens
    window.n += 1
    if quality:
        window.q += q / n_rows
        g_layer = gate_sum / n_rows
        window.gate = g_layer if window.gate is None else window.gate + g_layer


def _maybe_fault(fault: dict, stage: str, step: int, rank: int, world: int) -> None:
    """Tests only: ``{kill_at_step, marker}`` makes the last rank exit once at that step."""
    if fault.get("kill_at_step") != step or rank != world - 1:
        return
    if not os.path.exists(fault["marker"]):
        open(fault["marker"], "w").close()
        print(f"[{stage}] fault injection: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


# ----------------------------------------------------------------------------- driver

RUN_CONTROL = {
    "name",
    "storage_path",
    "max_failures",
    "num_to_keep",
    "report_every",
    "device_threads",
}
FINGERPRINT_FILE = "qgate_fingerprint.json"


def fingerprint(cfg: TrainConfig, rows: list[dict]) -> str:
    """Digest of what defines a training run: its config (less run control) and its data."""
    import hashlib

    conf = {k: v for k, v in to_dict(cfg).items() if k not in RUN_CONTROL}
    ids = [(r["sample_id"], r["rank"], r["is_target"]) for r in rows]
    blob = json.dumps([conf, ids], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _claim_run(storage: str, name: str, digest: str) -> None:
    """Refuse to resume a run name that holds a different run (other config or data)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(storage)
    path = f"{root.rstrip('/')}/{name}/{FINGERPRINT_FILE}"
    if fs.exists(path):
        with fs.open(path) as f:
            old = json.load(f)["fingerprint"]
        if old != digest:
            raise ValueError(
                f"run {name!r} under {storage} holds a different run (config or data changed); "
                "set name=<new run name>, or delete that directory to start over"
            )
        return
    fs.makedirs(f"{root.rstrip('/')}/{name}", exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump({"fingerprint": digest}, f)


def fit(
    stage: str,
    cfg: TrainConfig,
    rows: list[dict],
    targets: list[dict] | None = None,
    tokenizer_path: str | None = None,
    fault: dict | None = None,
) -> dict:
    """Train on Ray Train and write RUN/<stage>/ (artifact files, metrics.jsonl, config).

    ``rows`` (and optional ``targets``) are canonical rows. Returns a summary dict.
    ``fault`` is for tests only: ``{kill_at_step: N, marker: PATH}`` makes the last rank
    exit once at step N.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from qgate.watchdog import Watchdog

    targets = targets or []
    world = cfg.scaling.num_workers
    _check_fits(stage, world, cfg.scaling.resources_per_worker, ray.cluster_resources().get("CPU"))
    frac = getattr(cfg, "target_fraction", 0.0) if targets else 0.0
    plan = make_plan(cfg, len(rows), len(targets), frac)
    pool = assign_ranks([dict(r, is_target=False) for r in rows], world, cfg.seed)
    tgt = assign_ranks([dict(r, is_target=True) for r in targets], world, cfg.seed + 1)

    out_dir = getattr(cfg, "output", None) or os.path.join(cfg.run_dir, stage)
    os.makedirs(out_dir, exist_ok=True)
    storage = cfg.storage_path or os.path.join(cfg.run_dir, "ray_train")
    storage = storage if "://" in storage else os.path.abspath(storage)  # s3://, gs:// stay URIs
    name = cfg.name or f"{stage}-{os.path.basename(os.path.abspath(cfg.run_dir))}"

    _claim_run(storage, name, fingerprint(cfg, pool + tgt))

    datasets = _rank_datasets(cfg, pool + tgt, world, tokenizer_path)
    res = dict(cfg.scaling.resources_per_worker)
    threads = cfg.device_threads or max(1, int(res.get("CPU", 1)))
    loop_cfg = {
        "stage": stage,
        "cfg": to_dict(cfg),
        "plan": plan.__dict__,
        "threads": threads,
        "fault": fault,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=world, use_gpu=cfg.scaling.use_gpu, resources_per_worker=res
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    t0 = time.time()
    with Watchdog(stage, ticks=False):  # speaks if the worker group waits for resources
        result = trainer.fit()
    wall = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: training finished without a checkpoint")
    history = _export(result.checkpoint, out_dir)
    return {
        "stage": stage,
        "out_dir": out_dir,
        "steps": plan.total_steps,
        "rows": len(rows),
        "targets": len(targets),
        "wall_s": wall,
        "last": history[-1] if history else {},
        "history": history,
    }


TOKENIZE_CPUS = 0.25
"""CPUs each Ray Data tokenizing task of a training stage asks for."""


def _check_fits(stage: str, world: int, res: dict, cluster_cpus: float) -> None:
    """Fail fast when the workers would take every CPU: Ray Data's tokenizing tasks, which
    feed them, would then wait forever (the run would hang, not fail)."""
    need = world * float(res.get("CPU", 1.0))
    if cluster_cpus and need + TOKENIZE_CPUS > cluster_cpus:
        raise ValueError(
            f"{stage}: {world} worker(s) x {res.get('CPU', 1.0)} CPU take {need:g} of the "
            f"cluster's {cluster_cpus:g} CPUs, leaving less than the {TOKENIZE_CPUS} CPU that "
            "tokenizing their rows needs: the run would hang. Lower "
            "scaling.resources_per_worker.CPU (fractions work) or scaling.num_workers"
        )


def _rank_datasets(cfg: TrainConfig, rows: list[dict], world: int, tokenizer_path) -> dict:
    """One Ray Dataset per rank (``rank_<r>``) of its rows, tokenized by Ray Data tasks."""
    import ray.data

    # the datasets run inside Ray Train, whose progress bars would print from every worker
    ray.data.DataContext.get_current().enable_progress_bars = False
    cols = ("sample_id", "messages", "order", "is_target")
    kwargs = {"tokenizer_path": tokenizer_path, "max_length": cfg.max_length}
    kwargs["loss_on"] = cfg.loss_on
    datasets = {}
    for r in range(world):
        mine = [{k: row[k] for k in cols} for row in rows if row["rank"] == r]
        datasets[f"rank_{r}"] = ray.data.from_items(mine).map_batches(
            tokenize_batch, fn_kwargs=kwargs, batch_size=64, num_cpus=TOKENIZE_CPUS
        )
    return datasets


def _export(checkpoint, out_dir: str) -> list[dict]:
    """Copy the final checkpoint's artifact files and metrics into out_dir; returns the
    metrics history."""
    with checkpoint.as_directory() as d:
        for name in os.listdir(os.path.join(d, ARTIFACT_DIR)):
            src = os.path.join(d, ARTIFACT_DIR, name)
            dst = os.path.join(out_dir, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)
        shutil.copy2(os.path.join(d, METRICS_FILE), os.path.join(out_dir, METRICS_FILE))
    return _read_history(os.path.join(out_dir, METRICS_FILE))


def _read_history(path: str) -> list[dict]:
    """The metrics.jsonl lines of a run, one dict per report."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
