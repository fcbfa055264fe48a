"""Gated model: parity with the base, parameter counts, save/load, conversion, loader."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from qgate import model as M


def _batch(n=3, t=12, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return ids, torch.ones_like(ids)


def test_probe_logits_equal_base(tiny_model):
    """Guards against the probe gate changing the model it only observes."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids, mask = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    gated, _, meta = M.load_gated_model(tiny_model, mode="probe")
    with torch.no_grad():
        out, gates = M.forward(gated, ids, mask)
    assert torch.equal(out.logits, ref)
    assert gates.shape == (3, meta.num_layers, 12)
    assert ((gates > 0) & (gates < 1)).all()


def test_mix_close_to_base_at_init(tiny_model):
    """Guards against a mix-mode init that starts far from the base (bias 8: g > 0.9996).

    Stated tolerance: max |logit difference| < 5e-3 on the tiny model.
    """
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids, mask = _batch(seed=1)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
        gated, _, _ = M.load_gated_model(tiny_model, mode="mix", bias_init=8.0)
        out, gates = M.forward(gated, ids, mask)
    diff = (out.logits - ref).abs().max().item()
    assert 0 < diff < 5e-3
    assert gates.min() > 0.999


def test_gate_param_count_and_only_gates_trainable(tiny_model):
    """Guards against extra trainable tensors or a wrong gate shape: L * (hidden + 1)."""
    gated, _, meta = M.load_gated_model(tiny_model)
    params = M.gate_parameters(gated)
    assert sum(p.numel() for p in params.values()) == meta.num_layers * (meta.hidden_size + 1)
    trainable = [n for n, p in gated.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * meta.num_layers
    assert all(".qgate." in n for n in trainable)


def test_save_load_roundtrip_bit_exact(tiny_model, tmp_path):
    """Guards against gate weights drifting through save/load (dtype casts, key mixups)."""
    gated, _, meta = M.load_gated_model(tiny_model, mode="mix", seed=3)
    with torch.no_grad():
        for p in M.gate_parameters(gated).values():
            p.add_(torch.randn_like(p))
    M.save_gates(gated, str(tmp_path), meta)
    saved = json.loads((tmp_path / "qgate.json").read_text())
    assert saved["mode"] == "mix" and saved["num_layers"] == 2 and saved["hidden_size"] == 32
    again, _, meta2 = M.load_gated_model(tiny_model, gates=str(tmp_path))
    assert meta2.mode == "mix"
    a, b = M.gate_parameters(gated), M.gate_parameters(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_convert_writes_loadable_dir(tiny_model, tmp_path):
    """Guards against `qgate convert` output that the one loader cannot read back."""
    out = M.convert(tiny_model, str(tmp_path / "gated"), mode="probe")
    assert os.path.isfile(os.path.join(out, M.GATES_FILE))
    model, tok, meta = M.load_gated_model(out)
    assert meta.base_model == os.path.abspath(tiny_model)
    assert tok.eos_token is not None and len(M.gated_mlps(model)) == 2


def test_convert_refuses_non_decoder(tmp_path):
    """Guards against silently 'gating' an encoder model."""
    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(M.UnsupportedModelError, match="not a decoder causal LM"):
        M.check_base(str(tmp_path / "bert"))
    with pytest.raises(M.UnsupportedModelError, match="not a decoder causal LM"):
        M.convert(str(tmp_path / "bert"), str(tmp_path / "out"))


def test_llama_shape_supported():
    """Guards against the gate only working for Qwen3 (Llama/Mistral share the layout)."""
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids, mask = _batch(2, 5, 64)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        M.install_gates(model, "probe")
        out, gates = M.forward(model, ids, mask)
    assert torch.equal(out.logits, ref) and gates.shape == (2, 3, 5)


def test_padding_does_not_change_outputs(tiny_model):
    """Guards against batch-mates leaking into a sample through padding or position ids."""
    gated, _, _ = M.load_gated_model(tiny_model)
    ids, mask = _batch(2, 10)
    mask[1, 6:] = 0
    with torch.no_grad():
        out, gates = M.forward(gated, ids, mask)
        alone, g1 = M.forward(gated, ids[1:, :6], mask[1:, :6])
    torch.testing.assert_close(out.logits[1, :6], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates[1, :, :6], g1[0], atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_keeps_gate_gradients(tiny_model):
    """Guards against checkpointed layers dropping or changing the gate's gradient."""
    from qgate import losses

    model, _, _ = M.load_gated_model(tiny_model, mode="mix")
    params = M.gate_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    ids, mask = _batch(2, 16)

    def grads():
        for p in params.values():
            p.grad = None
        model.train()
        out, gates = M.forward(model, ids, mask)
        loss = losses.lm_loss(out.logits, ids)[0] + losses.quality_terms(gates, mask.bool()).mean()
        loss.backward()
        return {k: p.grad.clone() for k, p in params.items()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads()
    assert all(plain[k].abs().sum() > 0 for k in plain)
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
