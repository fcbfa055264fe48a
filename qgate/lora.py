"""The LoRA stage's model side: the target check, the finetune rows, PEFT adapters on the
target (built, exported, reloaded and merged). The training loop itself is qgate.training.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings

import torch

from qgate.config import FinetuneConfig

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def check_target_model(path: str) -> str:
    """Fail fast (no weights loaded) unless ``path`` is a local HF causal LM directory.

    Returns the model type. Any ``*ForCausalLM`` architecture is accepted: the finetune
    target need not be a gateable decoder.
    """
    from qgate.model import causal_lm_config

    return causal_lm_config(path, "target model").model_type


def load_finetune_rows(cfg: FinetuneConfig, tokenizer) -> list[dict]:
    """Read and validate the training rows; raise ValueError naming every bad row.

    Rows must parse as canonical chat rows (qgate.data reject reasons) and keep at least one
    loss token after truncation to ``max_length``. A selection with any bad row is refused
    as a whole (a bad row in a selection means something upstream is broken, not noise to
    skip quietly); an empty selection is an error, not a no-op.
    """
    from qgate.chat import tokenize_messages
    from qgate.data import NO_ANSWER_AFTER_TRUNCATION, Reject, expand_paths, read_corpus

    try:
        paths = expand_paths(cfg.data_paths)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e} (finetune reads RUN/selection/selected.jsonl by default: run the select "
            "stage first, or set data=[...])"
        ) from None
    rows, rejects = read_corpus(paths)
    if not rejects:
        for row in rows:
            enc = tokenize_messages(tokenizer, row["messages"], cfg.max_length, cfg.loss_on)
            if all(t == -100 for t in enc["labels"][1:]):  # position 0 is never scored
                detail = (
                    f"{NO_ANSWER_AFTER_TRUNCATION}: no {cfg.loss_on} token left within "
                    f"max_length={cfg.max_length} ({enc['n_tokens_full']} tokens); "
                    "raise max_length or drop the row"
                )
                rejects.append(
                    Reject(row["sample_id"], row["source"], NO_ANSWER_AFTER_TRUNCATION, detail, "")
                )
    if rejects:
        shown = "\n".join(
            f"  - {r.sample_id or '?'} ({r.source}): "
            + (r.detail if r.detail.startswith(r.reason) else f"{r.reason}: {r.detail}")
            for r in rejects[:20]
        )
        more = f"\n  ... and {len(rejects) - 20} more" if len(rejects) > 20 else ""
        raise ValueError(
            f"{len(rejects)} bad row(s) in {', '.join(paths)}; fix or remove them:\n{shown}{more}"
        )
    if not rows:
        raise ValueError(
            f"no training rows in {', '.join(paths)}: the selection is empty "
            "(check the select stage's budget and its input)"
        )
    return rows


def lora_config(cfg: FinetuneConfig):
    """The PEFT LoraConfig of a finetune config."""
    from peft import LoraConfig

    modules = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if modules == ["all-linear"] else list(modules),
        task_type="CAUSAL_LM",
    )


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of a PEFT model: the only ones finetune trains and saves."""
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if not params:
        raise ValueError("no LoRA parameters: lora.target_modules matched no module")
    return params


class IndexDropout(torch.nn.Dropout):
    """Dropout that draws indices to drop instead of one random number per element.

    ``k = -n ln(1 - p)`` indices are drawn with replacement from the ``n`` elements and those
    elements are zeroed, the rest scaled by ``1 / (1 - p)`` as in ``nn.Dropout``. An element
    escapes all ``k`` draws with probability ``(1 - 1/n)^k = 1 - p + O(1/n)``: the keep rate
    and the expectation are torch's, while the draws fall to about 5% for ``p = 0.05``. On CPU
    torch's per-element RNG costs more than a LoRA step's matmuls (a quarter of a SmolLM2
    LoRA step in a profile); this makes the step 1.3-1.5x faster. Draws come from torch's
    global generator, so seeded runs (and resumes) repeat exactly. Small tensors (under
    ``MIN_ELEMENTS``), where the O(1/n) term would show, use torch's dropout.
    """

    MIN_ELEMENTS = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero about a fraction ``p`` of ``x`` in training; the identity in eval."""
        n = x.numel()
        if not self.training or self.p == 0 or n < self.MIN_ELEMENTS:
            return super().forward(x)
        k = round(-n * math.log1p(-self.p))
        keep = torch.full((n,), 1.0 / (1.0 - self.p), dtype=x.dtype, device=x.device)
        keep[torch.randint(n, (k,), device=x.device)] = 0
        return x * keep.view(x.shape)


def use_index_dropout(model, impl: str, device) -> None:
    """Swap the PEFT LoRA layers' ``nn.Dropout`` for ``IndexDropout`` when ``impl`` asks
    ("indices", or "auto" on CPU)."""
    if impl == "torch" or (impl == "auto" and device.type != "cpu"):
        return
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout:
                drops[name] = IndexDropout(drop.p)


def build_finetune(cfg: FinetuneConfig, device):
    """Target model with PEFT LoRA adapters; only the adapters train."""
    from peft import get_peft_model

    from qgate.model import load_base

    base, tok = load_base(
        cfg.target_model, device=device, dtype=torch.float32 if device.type == "cpu" else None
    )
    with warnings.catch_warnings():  # PEFT reads a property transformers 5 deprecated
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        model = get_peft_model(base, lora_config(cfg))  # freezes the base
    use_index_dropout(model, cfg.lora.dropout_impl, device)
    trainable = lora_parameters(model)
    stray = [n for n, p in model.named_parameters() if p.requires_grad and n not in trainable]
    if stray:
        raise ValueError(f"non-LoRA parameters would train: {stray[:5]}")
    return model, tok, trainable, None


def export_finetune(model, meta, out_dir: str) -> None:
    """Write the PEFT adapter directory to OUT/adapter (fit copies it to RUN/finetune/adapter)."""
    model.save_pretrained(os.path.join(out_dir, ADAPTER_DIR))


def load_adapter(model_dir: str, adapter_dir: str, device="cpu", dtype: torch.dtype | None = None):
    """Base model + trained adapter as a PeftModel in eval mode; returns (model, tokenizer)."""
    from peft import PeftModel

    from qgate.model import load_base

    base, tok = load_base(model_dir, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model, tok


def merge_adapter(model_dir: str, adapter_dir: str, out_dir: str) -> str:
    """Write base + adapter merged into plain weights (loads anywhere without PEFT).

    Merges on CPU in the checkpoint's own dtype, and saves the tokenizer beside it.
    """
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, tok = load_adapter(model_dir, adapter_dir, device="cpu", dtype=dtype)
    merged = model.merge_and_unload()
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # never mix a stale merge with this one
    merged.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
