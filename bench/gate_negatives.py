"""Which corrupted copies teach a gate something that holds on noise it never saw? (issue 13)

    python bench/gate_negatives.py --base-model models/smollm2 [--n-pool 2000] [--seed 0]
        [--per-kind 400] [--readouts mean last] [--out runs/bench_gate_negatives]

A contrast gate is a linear read-out of each decoder layer's MLP input, trained to open on
real pool rows and close on corrupted copies of them. Which copies it is trained on decides
what it learns: copies that are not language (shuffled words, character noise) can teach
"fluent is real", which then ranks fluent noise (a boilerplate refusal) among the best rows.
The bench also prints each kind's mean answer length in tokens, the confound a set of
copies can teach by accident.

This bench asks that question cheaply, on the real model, without training the model's gates
once per candidate set: one forward pass over the labelled pool and over corrupted copies of
every kind gives each row's per-layer MLP input (what a gate reads), averaged over its answer
tokens (``mean``) and at its last answer token (``last``, which has attended to the prompt
and the whole answer: a read-out of the row, as a reward model's). Then, per candidate set
of corruptions, per-layer logistic probes (the gate's own form: one linear unit per layer, on
the layer's input) are fitted to tell pool rows from those copies, with 2-fold cross-fitting
over source rows so no row is scored by a probe that saw it, and their layer-mean decision
value ranks the pool. The report is AUROC clean vs
noisy for every noise kind of the synthetic generator, with the kinds no corruption of the
set builds marked: what the gate learns beyond its own negatives.

A probe here is a proxy of a trained gate (fitted on pooled features, not per token through
the sigmoid), so the bench decides between negative sets; the real warmup and the score
stage confirm the choice (bench/quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qgate.corruption import CORRUPTIONS, DONOR_KINDS, corrupt  # noqa: E402
from qgate.synthetic import NOISE_TYPES as NOISE  # noqa: E402

RESEMBLES = {  # the noise kinds a corruption builds (or nearly builds)
    "swap": {"copied"},
    "truncate": {"truncated"},
    "repeat": {"repetition"},
    "shuffle": set(),
    "char_noise": {"gibberish"},
    "extend": set(),
    "prompt": {"copied"},  # the generator's copied rows take a donor's answer or its prompt
}


def features(model, tok, rows: list[dict], max_length: int, batch_tokens: int = 8192):
    """Per row and layer, the MLP input averaged over the row's scored answer tokens and the
    MLP input at its last scored token (both (n, L, H)), and (n,) answer tokens."""
    from qgate.chat import tokenize_messages
    from qgate.model import decoder_layers
    from qgate.scoring import micro_batches

    layers = decoder_layers(model)
    encs = [tokenize_messages(tok, r["messages"], max_length) for r in rows]
    n, L, H = len(rows), len(layers), model.config.hidden_size
    out = np.zeros((n, L, H), dtype=np.float32)
    last = np.zeros((n, L, H), dtype=np.float32)
    n_ans = np.zeros(n, dtype=np.int32)
    grabbed: list[torch.Tensor | None] = [None] * L

    def hook(i):
        def pre(_module, args):
            grabbed[i] = args[0].detach()

        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    pad = tok.pad_token_id
    try:
        groups = micro_batches([len(e["input_ids"]) for e in encs], batch_tokens)
        with torch.inference_mode():
            for g in groups:
                width = max(len(encs[i]["input_ids"]) for i in g)
                ids = torch.full((len(g), width), pad, dtype=torch.long)
                att = torch.zeros((len(g), width), dtype=torch.long)
                mask = torch.zeros((len(g), width), dtype=torch.bool)
                for b, i in enumerate(g):
                    e = encs[i]
                    ids[b, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
                    att[b, : len(e["input_ids"])] = 1
                    lab = torch.tensor(e["labels"]) != -100
                    lab[0] = False
                    mask[b, : len(lab)] = lab
                model.model(input_ids=ids, attention_mask=att)
                m = mask.unsqueeze(-1).float()  # (B, T, 1)
                cnt = m.sum(1).clamp(min=1)  # (B, 1)
                pos = torch.arange(width) * mask  # the last scored position, 0 if none
                end = pos.max(1).values
                rows_b = torch.arange(len(g))
                for li in range(L):
                    pooled = (grabbed[li].float() * m).sum(1) / cnt  # (B, H)
                    out[g, li] = pooled.numpy()
                    last[g, li] = grabbed[li][rows_b, end].float().numpy()
                n_ans[g] = mask.sum(1).numpy()
    finally:
        for h in handles:
            h.remove()
    return out, last, n_ans


def make_copies(rows: list[dict], kinds: list[str], per_kind: int, seed: int):
    """``per_kind`` corrupted copies per kind, of random source rows; returns (copies, src idx, kind)."""
    rng = random.Random(seed)
    copies, src, kind = [], [], []
    for k in kinds:
        for i in rng.sample(range(len(rows)), min(per_kind, len(rows))):
            d = rows[rng.randrange(len(rows))]
            while d is rows[i]:
                d = rows[rng.randrange(len(rows))]
            copies.append(corrupt(rows[i], k, rng, d if k in DONOR_KINDS else None))
            src.append(i)
            kind.append(k)
    return copies, np.array(src), np.array(kind)


def probe_scores(Xp, Xn, neg_src, folds: int = 2, c: float = 0.05, seed: int = 0):
    """Cross-fitted layer-mean probe decision for every pool row (higher = more real)."""
    from sklearn.linear_model import LogisticRegression

    n, L, _ = Xp.shape
    fold = np.random.default_rng(seed).integers(0, folds, n)
    out = np.zeros(n)
    for f in range(folds):
        tr_p, te_p = fold != f, fold == f
        tr_n = fold[neg_src] != f
        acc = np.zeros(te_p.sum())
        for li in range(L):
            X = np.vstack([Xp[tr_p, li], Xn[tr_n, li]])
            y = np.r_[np.ones(tr_p.sum()), np.zeros(tr_n.sum())]
            mu, sd = X.mean(0), X.std(0) + 1e-6
            clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
            clf.fit((X - mu) / sd, y)
            acc += clf.decision_function((Xp[te_p, li] - mu) / sd)
        out[te_p] = acc / L
    return out


def aurocs(score, labels) -> dict:
    """AUROC clean vs all noise and clean vs each kind (higher score = cleaner)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    clean = labels == "clean"
    res = {"all": roc_auc_score(clean, score)}
    for k in NOISE:
        sel = clean | (labels == k)
        if (labels == k).any():
            res[k] = roc_auc_score(clean[sel], score[sel])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-model", required=True)
    ap.add_argument("--n-pool", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--per-kind", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_gate_negatives")
    ap.add_argument("--sets", nargs="*", help="corruption sets, comma-separated kinds")
    ap.add_argument(
        "--readouts",
        nargs="+",
        choices=("mean", "last"),
        default=["mean", "last"],
        help="what a probe reads per layer: the MLP input averaged over the answer tokens, or"
        " at the last answer token (which has attended to the whole row)",
    )
    a = ap.parse_args(argv)

    from qgate.model import load_base
    from qgate.synthetic import generate_corpus, read_rows

    print(f"load average before: {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    paths = generate_corpus(
        os.path.join(a.out, "data"),
        seed=a.seed,
        n_pool=a.n_pool,
        n_target=10,
        n_test=10,
        n_pretrain=0,
        families=a.families,
    )
    raw = read_rows(paths["pool"])
    rows = [{"sample_id": r["id"], "source": r["source"], "messages": r["messages"]} for r in raw]
    labels = [r["noise"] for r in raw]
    kinds = list(CORRUPTIONS)
    copies, neg_src, neg_kind = make_copies(rows, kinds, a.per_kind, a.seed + 1)
    model, tok = load_base(a.base_model, dtype=torch.float32)
    model.eval()
    cache = os.path.join(a.out, "features.npz")
    z = dict(np.load(cache)) if os.path.exists(cache) else {}
    if "Xp_last" not in z:  # none yet, or one from before the last-token read-out
        z = {}
        z["Xp"], z["Xp_last"], z["np_ans"] = features(model, tok, rows, a.max_length)
        print(f"pool features {z['Xp'].shape} in {time.perf_counter() - t0:.0f}s", flush=True)
    # copies are made kind by kind (make_copies), so a kind added to CORRUPTIONS after the
    # cache was written only appends copies: their features are computed and added
    have = len(z.get("nn_ans", ()))
    if have < len(copies):
        new = features(model, tok, copies[have:], a.max_length)
        for key, part in zip(("Xn", "Xn_last", "nn_ans"), new):
            z[key] = np.concatenate([z[key], part]) if have else part
        print(f"copy features {z['Xn'].shape} in {time.perf_counter() - t0:.0f}s", flush=True)
        np.savez(cache, **z)
    X = {"mean": (z["Xp"], z["Xn"]), "last": (z["Xp_last"], z["Xn_last"])}
    np_ans, nn_ans = z["np_ans"], z["nn_ans"]
    sets = (
        [s.split(",") for s in a.sets]
        if a.sets
        else [
            ["swap", "truncate", "repeat", "shuffle", "char_noise"],
            list(CORRUPTIONS),
            ["swap", "repeat", "shuffle", "char_noise", "extend"],
            ["swap", "shuffle", "char_noise"],
            ["swap"],
            ["swap", "extend"],
        ]
    )
    lab = np.array(labels)
    print(
        f"answer tokens, mean: clean {np_ans[lab == 'clean'].mean():.1f}; "
        + ", ".join(f"{k} {nn_ans[neg_kind == k].mean():.1f}" for k in kinds),
        flush=True,
    )
    results = []
    print("| corruptions | read-out | AUROC | " + " | ".join(NOISE) + " |")
    for s in sets:
        take = np.isin(neg_kind, s)
        built = set().union(*(RESEMBLES.get(k, set()) for k in s))
        for readout in a.readouts:
            Xp, Xn = X[readout]
            r = aurocs(probe_scores(Xp, Xn[take], neg_src[take]), labels)
            cells = [f"{r[k]:.3f}{'' if k in built else '*'}" for k in NOISE]
            line = f"| {'+'.join(s)} | {readout} | {r['all']:.3f} | " + " | ".join(cells) + " |"
            print(line, flush=True)
            results.append({"set": s, "readout": readout, "auroc": r})
    # the length baseline beside them: the confound a gate can learn from its negatives
    r = aurocs(np_ans.astype(float), labels)
    print(
        "| (answer length alone) | – | "
        + f"{r['all']:.3f} | "
        + " | ".join(f"{r[k]:.3f}" for k in NOISE)
        + " |"
    )
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wall {time.perf_counter() - t0:.0f}s; load average after: {os.getloadavg()}")
    print("* a kind no corruption of the set builds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
