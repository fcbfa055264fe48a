"""Per-sample scoring: the one scoring function, used by the Ray Data job and by Serve.

For each sample it runs one forward pass of the gated model (plus one on the answer alone
when IFD is asked for) and returns:

- ``nll``: mean next-token nll over the scored tokens;
- ``gate``: per layer ``s_l = sum_t w_t g_{l,t}`` with ``w_t = ppl_t^alpha / (sum ppl^alpha + eps)``;
- ``gate_mean``: per layer unweighted mean of g over the scored tokens;
- ``embedding``: mean-pooled final hidden state, L2-normalised (optionally projected);
- ``prompt_embedding``: the same over the tokens before the first answer token only. In a
  causal model those states do not see the answer, so it says what was asked, not how it was
  answered: the groups that selection calibrates within (``calibration: cluster``);
- ``ifd``: ppl(answer | instruction) / ppl(answer alone), or None.

Samples are sorted by length and packed into token-capped micro-batches with right padding;
position ids count real tokens, so a sample's stats do not depend on its batch-mates.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from qgate import losses
from qgate.model import forward, gated_mlps


def projection_matrix(hidden: int, dim: int | None, seed: int) -> np.ndarray | None:
    """Fixed seeded Gaussian projection (hidden, dim) for embeddings; None keeps hidden size."""
    if dim is None or dim == hidden:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((hidden, dim)) / np.sqrt(dim)).astype(np.float32)


def token_weights(nll: torch.Tensor, mask: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """``w_t = ppl_t^alpha / (sum_u ppl_u^alpha + eps)`` over masked tokens, in log space."""
    a = (alpha * nll).masked_fill(~mask, float("-inf"))  # (B, T)
    m = a.max(-1, keepdim=True).values.clamp(min=0)  # keep exp(-m) * eps meaningful
    e = torch.exp(a - m)
    return e / (e.sum(-1, keepdim=True) + eps * torch.exp(-m))


CALL_TOKENS = {"cpu": 64, "cuda": 4096}
"""A forward call's fixed cost in token-equivalents, by device, for :func:`micro_batches`.
CPU, measured on SmolLM2's body (fp32, 2 cores): a call costs 31 ms plus 1.7 ms a token
over 16-4,096 tokens (18 tokens a call), a 16-token call 100 ms (about 50); 64 errs toward
fewer calls. CUDA: an estimate, not measured here (a small call is launch-bound, worth
thousands of tokens), so on a GPU the groups stay about as few as the token cap allows."""


def device_call_tokens(device) -> int:
    """:data:`CALL_TOKENS` for a torch device (or its name); other accelerators as CUDA."""
    return CALL_TOKENS.get(torch.device(device).type, CALL_TOKENS["cuda"])


def micro_batches(
    lengths: list[int], batch_tokens: int, call_tokens: int = CALL_TOKENS["cpu"]
) -> list[list[int]]:
    """Indices grouped longest-first, padded tokens per group <= batch_tokens (a longer row
    goes alone), with the least compute: the sum of each group's padded tokens plus
    ``call_tokens`` a group, for a forward call's fixed cost.

    Cutting greedily at the token cap padded a 64-row shard of 16-512-token rows to about 2x
    its tokens (1.16x at 1,000 rows; bench/micro_batches.py). This exact partition of the
    sorted rows (a shortest path over cut points, one vectorised step per row) keeps only
    the padding that saves calls."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    width = np.array([max(int(lengths[i]), 1) for i in order], dtype=np.float64)
    cost = np.full(n + 1, np.inf)
    cost[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):  # a group starting at sorted row i is padded to width[i]
        size = min(n - i, max(1, int(batch_tokens // width[i])))
        cand = cost[i] + width[i] * np.arange(1, size + 1) + call_tokens
        end = slice(i + 1, i + size + 1)
        better = cand < cost[end]
        cost[end] = np.where(better, cand, cost[end])
        start[end] = np.where(better, i, start[end])
    groups, j = [], n
    while j > 0:
        groups.append(order[start[j] : j])
        j = int(start[j])
    return groups[::-1]


def _pad(seqs: list, fill: int, device) -> torch.Tensor:
    """Right-pad int sequences with ``fill`` into one (B, T) long tensor."""
    rows = [torch.as_tensor(np.asarray(s, dtype=np.int64)) for s in seqs]
    return pad_sequence(rows, batch_first=True, padding_value=fill).to(device)


HEAD_CHUNK_ELEMENTS = 1 << 25
"""Logit elements computed at once by the LM head (128 MiB in fp32): caps scoring memory."""

HEAD_CHUNK_ROWS_CPU = 64
"""Scored positions per head chunk on CPU: a (64, V) block stays in cache through the fp32
cross-entropy. Measured on SmolLM2 (V = 49,152, bf16, 2 cores): head + cross-entropy over
4,096 positions took 0.65 s in chunks of 64 rows against 1.27 s in chunks of 682 (the
memory cap alone), 0.98 s at 128 and 0.93 s at 32."""


def head_chunk_rows(vocab: int, device) -> int:
    """Rows of hidden states projected by the LM head at once: cache-sized on CPU, else
    as many as the memory cap allows."""
    cap = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    return min(cap, HEAD_CHUNK_ROWS_CPU) if torch.device(device).type == "cpu" else cap


def scored_token_nll(model, hidden: torch.Tensor, labels: torch.Tensor):
    """Next-token nll (B, T) in fp32 at the scored positions (label != -100, t >= 1), else 0,
    and that mask of scored positions (B, T).

    Only the hidden states that predict a scored token go through the LM head: they are
    gathered into one (N, H) matrix and projected in chunks (``head_chunk_rows``), so
    (T, V) logits never exist per row and the head weight is never copied.
    """
    mask = labels != -100
    mask[:, 0] = False  # position 0 has no prediction
    b, t = mask.nonzero(as_tuple=True)
    h = hidden[b, t - 1]  # (N, H): the state that predicts token t
    target = labels[b, t]  # (N,)
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-style soft cap
    chunk = head_chunk_rows(head.weight.shape[0], h.device)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = F.linear(h[s : s + chunk], head.weight, head.bias).float()  # (C, V)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out[s : s + chunk] = F.cross_entropy(logits, target[s : s + chunk], reduction="none")
    nll = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
    nll[b, t] = out
    return nll, mask


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states (B, T, H) over the positions where mask (B, T) is 1, fp32."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).float().sum(1) / m.float().sum(1).clamp(min=1)


def prompt_length(sample: dict) -> int:
    """Tokens before the first answer token: ``n_prompt`` from tokenization, else (a sample
    built by hand) the position of the first scored label."""
    if sample.get("n_prompt") is not None:
        return int(sample["n_prompt"])
    return next((i for i, t in enumerate(sample["labels"]) if t != -100), len(sample["labels"]))


def _unit_rows(x: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """Rows projected (when a projection is set) and L2-normalised."""
    if projection is not None:
        x = x @ projection
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@torch.no_grad()
def _forward_stats(
    model, input_ids, labels, pad_id, alpha, eps, want_tokens=False, pool=True, n_prompt=None
):
    """One padded forward of the decoder body: per-sample nll, gate stats, pooled state (and,
    given ``n_prompt`` per sample, the state pooled over those first tokens)."""
    device = next(model.parameters()).device
    ids = _pad(input_ids, pad_id, device)
    lab = _pad(labels, -100, device)
    attn = _pad([[1] * len(s) for s in input_ids], 0, device)
    hidden, gates = forward(model, ids, attn, body_only=True)  # (B, T, H) final-normed
    nll, mask = scored_token_nll(model, hidden, lab)
    w = token_weights(nll, mask, alpha, eps)  # (B, T)
    gates = gates.float()  # (B, L, T)
    s = losses.weighted_gates(gates, w)  # (B, L)
    n_scored = mask.sum(-1)
    g_mean = losses.gate_means(gates, mask)
    mean_nll = (nll * mask).sum(-1) / n_scored.clamp(min=1)
    out = {"nll": mean_nll, "gate": s, "gate_mean": g_mean, "n_scored": n_scored}
    if pool:
        out["pooled"] = _mean_pool(hidden, attn)  # (B, H)
    if n_prompt is not None:
        n = torch.as_tensor(n_prompt, device=attn.device).clamp(min=1).unsqueeze(1)
        out["prompt_pooled"] = _mean_pool(
            hidden, attn * (torch.arange(attn.shape[1], device=attn.device) < n)
        )
    if want_tokens:
        out["token_nll"], out["token_gates"], out["mask"] = nll, gates, mask
    return out


def score_batch(
    model,
    samples: list[dict],
    *,
    pad_id: int,
    alpha: float = 1.0,
    eps: float = 1e-8,
    batch_tokens: int = 16384,
    projection: np.ndarray | None = None,
    ifd: bool = False,
    debug_tokens: bool = False,
    call_tokens: int | None = None,
) -> list[dict]:
    """Score tokenized samples with a gated model; returns one stats dict per sample, in order.

    Each sample needs ``input_ids`` and ``labels`` (-100 = not scored), and for IFD also
    ``answer_input_ids`` / ``answer_labels`` (the answer tokenized alone). Samples are
    grouped by :func:`micro_batches`; ``call_tokens`` overrides its per-call cost (default:
    the model's device's).
    """
    if not gated_mlps(model):
        raise ValueError("score_batch needs a gated model (load it with load_gated_model)")
    results: list[dict | None] = [None] * len(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    if call_tokens is None:
        call_tokens = device_call_tokens(next(model.parameters()).device)
    for group in micro_batches(lengths, batch_tokens, call_tokens):
        st = _forward_stats(
            model,
            [samples[i]["input_ids"] for i in group],
            [samples[i]["labels"] for i in group],
            pad_id,
            alpha,
            eps,
            debug_tokens,
            n_prompt=[prompt_length(samples[i]) for i in group],
        )
        emb = _unit_rows(st["pooled"].cpu().numpy(), projection)
        prompt_emb = _unit_rows(st["prompt_pooled"].cpu().numpy(), projection)
        for j, i in enumerate(group):
            r = {
                "nll": float(st["nll"][j]),
                "gate": st["gate"][j].cpu().numpy().astype(np.float32),
                "gate_mean": st["gate_mean"][j].cpu().numpy().astype(np.float32),
                "embedding": emb[j].astype(np.float32),
                "prompt_embedding": prompt_emb[j].astype(np.float32),
                "n_loss_tokens": int(st["n_scored"][j]),
                "ifd": None,
            }
            if debug_tokens:
                n = lengths[i]
                r["token_nll"] = st["token_nll"][j, :n].cpu().numpy()
                r["token_gates"] = st["token_gates"][j, :, :n].cpu().numpy()
            results[i] = r
    if ifd:
        lens = [len(s["answer_input_ids"]) for s in samples]
        for group in micro_batches(lens, batch_tokens, call_tokens):
            st = _forward_stats(
                model,
                [samples[i]["answer_input_ids"] for i in group],
                [samples[i]["answer_labels"] for i in group],
                pad_id,
                alpha,
                eps,
                pool=False,
            )
            for j, i in enumerate(group):
                if int(st["n_scored"][j]) > 0 and results[i]["n_loss_tokens"] > 0:
                    alone = float(st["nll"][j])
                    results[i]["ifd"] = float(np.exp(results[i]["nll"] - alone))
    return results


def tokenize_for_scoring(
    tokenizer, messages: list[dict], max_length: int, loss_on: str, ifd: bool
) -> dict:
    """Tokenize a canonical conversation for :func:`score_batch` (plus answer-alone for IFD).

    Raises ``RowError(no_answer_after_truncation)`` when truncation leaves nothing to score.
    """
    from qgate.chat import answer_only, tokenize_messages
    from qgate.data import NO_ANSWER_AFTER_TRUNCATION, RowError

    enc = tokenize_messages(tokenizer, messages, max_length, loss_on)
    if sum(1 for t in enc["labels"][1:] if t != -100) == 0:
        raise RowError(
            NO_ANSWER_AFTER_TRUNCATION,
            f"no scored token left within max_length={max_length} ({enc['n_tokens_full']} tokens)",
        )
    out = {
        "input_ids": enc["input_ids"],
        "labels": enc["labels"],
        "n_prompt": enc["n_prompt"],
        "truncated": enc["truncated"],
        "n_tokens": len(enc["input_ids"]),
    }
    if ifd:
        alone = tokenize_messages(tokenizer, answer_only(messages), max_length, "assistant")
        out["answer_input_ids"], out["answer_labels"] = alone["input_ids"], alone["labels"]
    return out
