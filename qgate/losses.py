"""Training losses: masked LM cross-entropy and the gate quality losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUALITY_LOSSES = ("linear", "target_balanced", "contrast")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token nll (B, T) and its mask (B, T), aligned to the label positions.

    Position t holds ``-log p(labels[t] | tokens < t)``; position 0 and positions with label
    -100 are masked out. Computed in fp32.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != -100
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        target.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(target)
    zero = torch.zeros_like(nll[:, :1])
    nll = torch.cat([zero, nll * mask], dim=1)
    mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
    return nll, mask


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over labelled tokens; returns (loss, token count)."""
    nll, mask = token_nll(logits, labels)
    n = mask.sum()
    return nll.sum() / n.clamp(min=1), n


def gate_means(gates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-layer masked mean of the gate g_bar (B, L); mask is (B, T)."""
    m = mask.to(gates.dtype).unsqueeze(1)  # (B, 1, T)
    return (gates * m).sum(-1) / m.sum(-1).clamp(min=1)


def weighted_gates(gates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-layer ``s_l = sum_t w_t g_{l,t}`` (B, L): the score stage's gate score."""
    return (gates * weights.unsqueeze(1)).sum(-1)


def quality_terms(
    gates: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "linear",
    is_target: torch.Tensor | None = None,
    balance: float = 0.2,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's term of the gate quality loss of DESIGN.md (plus ``contrast``), as (B,):
    a mean over layers. A batch's loss is their mean; a batch cut into row groups sums its
    groups' terms over its row count (qgate.training).

    ``linear``: g_bar (pushes gates down).
    ``target_balanced``: pool rows contribute ``balance * g_bar`` and target rows
    ``(2 - balance) * (1 - g_bar)``, so gates open on target-like data.
    ``contrast``: binary cross-entropy of each layer's score ``s_l`` (token weights
    ``weights``, exactly as scoring computes it) against 1 for real rows and 0 for corrupted
    copies (``is_target`` marks the corrupted rows), so a gate's score is its estimate that
    a row is real. Padding and unscored tokens never count (``mask``).
    """
    if kind == "contrast":
        if is_target is None or weights is None:
            raise ValueError("contrast needs is_target (the corrupted rows) and token weights")
        s = weighted_gates(gates, weights).clamp(1e-6, 1 - 1e-6)  # (B, L)
        y = (~is_target.bool()).to(s.dtype).unsqueeze(-1).expand_as(s)
        return F.binary_cross_entropy(s, y, reduction="none").mean(-1)
    g_bar = gate_means(gates, mask)  # (B, L)
    if kind == "linear":
        return g_bar.mean(-1)
    if kind == "target_balanced":
        if is_target is None:
            raise ValueError("target_balanced needs is_target per row")
        t = is_target.to(g_bar.dtype).unsqueeze(-1)  # (B, 1)
        per = (1 - t) * balance * g_bar + t * (2 - balance) * (1 - g_bar)
        return per.mean(-1)
    raise ValueError(f"quality loss must be one of {QUALITY_LOSSES}, got {kind!r}")
