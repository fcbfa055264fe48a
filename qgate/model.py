"""The quality gate and the one model loader.

A gate is ``Linear(hidden, 1)`` on the input of each decoder layer's MLP (whatever enters
it: the post-attention-normed hidden state in Llama/Qwen, the pre-feedforward norm in Gemma3); ``g = sigmoid(gate(x))`` per token. It is installed by
wrapping each layer's ``mlp`` (composition, no copied modeling code):

- ``probe``: the MLP output is unchanged, so logits equal the base model's exactly;
- ``mix``: the layer adds ``g * mlp(x)``; a high bias init makes g close to 1 at step 0.

Train, score and serve all load through :func:`load_gated_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

MODES = ("probe", "mix")
DEFAULT_BIAS = {"probe": 0.0, "mix": 4.0}
GATES_FILE = "gates.safetensors"
META_FILE = "qgate.json"


class UnsupportedModelError(ValueError):
    """The model is not a decoder LM whose ``model.model.layers[i]`` each have an ``mlp`` module.

    The gate wraps ``layer.mlp``, so its input is whatever enters the MLP, whatever the
    norm before it is called (``post_attention_layernorm`` in Llama/Qwen,
    ``pre_feedforward_layernorm`` in Gemma3).
    """


@dataclass
class GateMeta:
    """What is saved beside the gate weights (qgate.json) to rebuild a gated model."""

    mode: str
    num_layers: int
    hidden_size: int
    base_model: str
    bias_init: float
    init_std: float = 0.02
    model_type: str = ""
    version: int = 1
    extra: dict | None = None
    bias: bool = True
    """Whether each gate has a bias (the original project's gate had none)."""


class GatedMLP(nn.Module):
    """Wraps a decoder layer's MLP: computes the per-token gate and applies it in mix mode."""

    def __init__(self, mlp: nn.Module, hidden_size: int, mode: str, bias: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"gate mode must be one of {MODES}, got {mode!r}")
        self.mlp = mlp
        self.mode = mode
        self.qgate = nn.Linear(hidden_size, 1, bias=bias)  # kept in fp32 whatever the model dtype
        self.last_gate: torch.Tensor | None = None  # (B, T) from the latest forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the gate runs in fp32, always
            g = torch.sigmoid(self.qgate(x.float())).squeeze(-1)  # (B, T)
        self.last_gate = g
        out = self.mlp(x)
        if self.mode == "mix":
            out = out * g.unsqueeze(-1).to(out.dtype)
        return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM, checked to have the parts a gate needs."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"{model_type!r} is not a supported decoder LM: expected model.model.layers "
            "(Qwen3, Qwen2, Llama, Mistral and similar decoders are supported)"
        )
    for i, layer in enumerate(layers):
        if not isinstance(getattr(layer, "mlp", None), nn.Module):
            raise UnsupportedModelError(
                f"{model_type!r} layer {i} has no 'mlp' module: qgate gates the input of each "
                "decoder layer's MLP (model.model.layers[i].mlp, as in Qwen3, Llama, Gemma3)"
            )
    return layers


def gated_mlps(model: nn.Module) -> list[GatedMLP]:
    """The installed GatedMLP modules in layer order (empty if none are installed)."""
    return [m for m in model.modules() if isinstance(m, GatedMLP)]


def install_gates(
    model: nn.Module,
    mode: str = "probe",
    bias_init: float | None = None,
    init_std: float = 0.02,
    seed: int = 0,
    bias: bool = True,
) -> GateMeta:
    """Wrap every decoder layer's MLP with a gate, initialised N(0, init_std) with bias_init.

    ``bias=False`` gives the original project's ``Linear(hidden, 1, bias=False)`` gate.
    """
    if gated_mlps(model):
        raise ValueError("gates are already installed in this model")
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    bias_init = DEFAULT_BIAS[mode] if bias_init is None else float(bias_init)
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        device = next(layer.mlp.parameters()).device
        gated = GatedMLP(layer.mlp, hidden, mode, bias=bias)
        with torch.no_grad():
            gated.qgate.weight.copy_(torch.randn(1, hidden, generator=gen) * init_std)
            if bias:
                gated.qgate.bias.fill_(bias_init)
        layer.mlp = gated.to(device)
    return GateMeta(
        mode=mode,
        num_layers=len(layers),
        hidden_size=hidden,
        base_model=str(getattr(model.config, "_name_or_path", "")),
        bias_init=bias_init if bias else 0.0,
        init_std=init_std,
        model_type=getattr(model.config, "model_type", ""),
        bias=bias,
    )


def gate_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable gate parameters, keyed ``gate.{layer}.{weight|bias}``.

    One naming used both to pick what trains in warmup and what is saved.
    """
    params = {}
    for i, m in enumerate(gated_mlps(model)):
        params[f"gate.{i}.weight"] = m.qgate.weight
        if m.qgate.bias is not None:
            params[f"gate.{i}.bias"] = m.qgate.bias
    if not params:
        raise ValueError("model has no gates installed")
    return params


def base_digest(model: nn.Module) -> str:
    """sha256 of every non-gate parameter: proves the base stayed frozen through training."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if ".qgate." not in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def collect_gates(model: nn.Module) -> torch.Tensor:
    """Gate values of the latest forward, stacked (B, L, T) in fp32."""
    gates = [m.last_gate for m in gated_mlps(model)]
    if any(g is None for g in gates):
        raise RuntimeError("no gate values recorded: run a forward pass first")
    return torch.stack(gates, dim=1)


def forward(
    model: nn.Module,
    input_ids,
    attention_mask,
    return_gates: bool = True,
    body_only: bool = False,
    **kw,
):
    """One forward pass of a gated model; returns ``(outputs, gates (B, L, T) | None)``.

    ``body_only`` runs the decoder without the LM head and returns its final-normed hidden
    state (B, T, H) as ``outputs``: scoring applies the head itself, only where it is needed.
    Right padding is assumed, and position ids count real tokens, so a sample's outputs do
    not depend on its batch-mates.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    net = model.get_decoder() if body_only else model
    out = net(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
    if body_only:
        out = out.last_hidden_state
    gates = collect_gates(model) if return_gates else None
    for m in gated_mlps(model):
        m.last_gate = None
    return out, gates


def save_gates(model: nn.Module, out_dir: str, meta: GateMeta) -> str:
    """Write gates.safetensors and qgate.json into out_dir; returns out_dir."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in gate_parameters(model).items()}
    save_file(tensors, os.path.join(out_dir, GATES_FILE))
    from qgate.atomic import write_text

    write_text(os.path.join(out_dir, META_FILE), json.dumps(asdict(meta), indent=2, sort_keys=True))
    return out_dir


def read_meta(gates_dir: str) -> GateMeta:
    """Read qgate.json from a gates directory."""
    path = os.path.join(gates_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {META_FILE} in {gates_dir}: not a qgate gates directory")
    with open(path) as f:
        return GateMeta(**json.load(f))


def load_gates(model: nn.Module, gates_dir: str) -> None:
    """Load saved gate weights into a model whose gates are installed (shapes checked)."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(gates_dir, GATES_FILE))
    params = gate_parameters(model)
    if set(saved) != set(params):
        raise ValueError(
            f"gates in {gates_dir} do not fit this model: saved {sorted(saved)[:4]}..., "
            f"the model has {sorted(params)[:4]}... ({len(saved)} vs {len(params)} tensors)"
        )
    with torch.no_grad():
        for k, p in params.items():
            if saved[k].shape != p.shape:
                raise ValueError(
                    f"gate {k}: saved shape {tuple(saved[k].shape)} != {tuple(p.shape)}"
                )
            p.copy_(saved[k])


def resolve_base(path: str) -> str:
    """The HF model directory behind ``path`` (a converted gated directory points at one)."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return read_meta(path).base_model
    return path


def causal_lm_config(path: str, what: str = "base model"):
    """The HF config of a causal LM directory; clear errors for anything else (no weights read)."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory not found: {path}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path} is not a HF model directory: {e}") from None
    if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        raise UnsupportedModelError(
            f"{path} holds a {config.model_type!r} model ({config.architectures}), "
            "not a decoder causal LM"
        )
    return config


def check_base(path: str) -> str:
    """Fail fast (no weights loaded) unless ``path`` holds a gateable decoder causal LM.

    Returns the model type. Builds the architecture on the meta device to check its layers.
    """
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(resolve_base(path))
    with torch.device("meta"):
        decoder_layers(AutoModelForCausalLM.from_config(config))
    return config.model_type


def load_base(path: str, device="cpu", dtype: torch.dtype | None = None):
    """Load a HF causal LM and its tokenizer from a local directory, offline."""
    from transformers import AutoModelForCausalLM

    from qgate.chat import load_tokenizer
    from qgate.hardware import resolve_dtype

    causal_lm_config(path)  # clear errors for a missing or non-causal-LM directory
    dtype = dtype or resolve_dtype("auto", device)  # the one precision rule
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, load_tokenizer(path)


def load_gated_model(
    base: str,
    gates: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mode: str = "probe",
    bias_init: float | None = None,
    seed: int = 0,
    bias: bool = True,
):
    """The one loader: base model + installed gates, in eval mode, base frozen.

    ``base`` is a HF model directory, or a gated directory written by :func:`convert`.
    ``gates`` is a gates directory (gates.safetensors + qgate.json); when given, its mode
    wins and its weights are loaded. Without it, fresh gates are initialised (``mode``,
    ``bias_init``, ``seed``). Returns ``(model, tokenizer, meta)``.
    """
    if gates is None and os.path.isfile(os.path.join(base, META_FILE)):
        gates = base
    meta = read_meta(gates) if gates else None
    base = resolve_base(base)
    model, tokenizer = load_base(base, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if meta is None:
        meta = install_gates(model, mode=mode, bias_init=bias_init, seed=seed, bias=bias)
    else:
        install_gates(
            model, mode=meta.mode, bias_init=meta.bias_init, init_std=meta.init_std, bias=meta.bias
        )
        load_gates(model, gates)
    meta.base_model = os.path.abspath(base)
    model.eval()
    return model, tokenizer, meta


def convert(base: str, out_dir: str, mode: str = "probe", bias_init=None, seed: int = 0) -> str:
    """Write a gated model directory (fresh gates + qgate.json pointing at ``base``)."""
    model, _, meta = load_gated_model(base, mode=mode, bias_init=bias_init, seed=seed)
    return save_gates(model, out_dir, meta)


def file_digest(paths: list[str]) -> str:
    """sha256 over files' names, sizes and contents (first and last MiB of large files).

    Cheap enough for multi-GB checkpoints, and changes when any weight file changes size or
    its leading/trailing bytes (safetensors headers sit at the start).
    """
    h = hashlib.sha256()
    for p in sorted(paths):
        size = os.path.getsize(p)
        h.update(f"{os.path.basename(p)}:{size}".encode())
        with open(p, "rb") as f:
            if size <= 4 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def model_digest(model_dir: str) -> str:
    """Digest of a HF model directory's config and weight files."""
    names = [n for n in os.listdir(model_dir) if n.endswith((".json", ".safetensors", ".bin"))]
    return file_digest([os.path.join(model_dir, n) for n in names])
