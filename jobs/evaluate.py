"""Evaluate a model, with or without its LoRA adapter, on lm-eval tasks -> RUN/eval/results.json.

python -m jobs.evaluate --config jobs/configs/evaluate.yaml [key=value ...]

The default task, qgate_synth, is a local exact-match task built from the synthetic test
split; it runs offline. Hub tasks (mmlu, gsm8k, bbh_cot_fewshot) need offline=false and hub
access; see qgate/evaluation.py. The base alone: adapter=null.
"""

from __future__ import annotations

import os
import sys

from jobs.common import parse, stage_run
from qgate.config import EvaluateConfig
from qgate.config_io import write_config
from qgate.evaluation import OFFLINE_ENV


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(EvaluateConfig, argv, __doc__)
    if cfg.offline:  # before transformers / datasets / huggingface_hub are imported
        for key in OFFLINE_ENV:
            os.environ[key] = "1"
    from qgate.evaluation import evaluate

    try:
        with stage_run(cfg.run_dir, "evaluate"):
            r = evaluate(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    write_config(cfg, cfg.out_dir)
    what = r["model"] + (f" + adapter {r['adapter']}" if r["adapter"] else "")
    print(f"evaluated {what} in {r['wall_s']:.1f}s (limit {r['limit']})")
    for name, metrics in r["tasks"].items():
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k
        )
        print(f"  {name}: {shown} ({metrics.get('n_docs', '?')} docs)")
    print(f"-> {os.path.join(cfg.out_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
