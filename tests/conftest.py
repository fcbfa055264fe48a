"""Shared fixtures: a small synthetic corpus, a tiny random Qwen3, one Ray session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# dtype auto follows the CPU (bf16 where it is native): pin fp32 so results do not depend on
# the machine; the bf16 path has its own tests that ask for it explicitly.
os.environ.setdefault("QGATE_CPU_BF16", "0")
# entry points called in-process keep their output on sys.stdout for capsys; the quiet
# terminal has its own tests (tests/test_console.py, which turns this off)
os.environ.setdefault("QGATE_VERBOSE", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, str]:
    """Synthetic labelled corpus: pool (with noise), target, test, pretrain JSONL paths."""
    from qgate.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    return generate_corpus(out, seed=0, n_pool=240, n_target=40, n_test=40, n_pretrain=300)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus) -> str:
    """A tiny random Qwen3 (2 layers, hidden 32) with a BPE tokenizer, saved in HF format."""
    from qgate.stand_in import build_tiny_model, row_texts
    from qgate.synthetic import read_rows

    out = tmp_path_factory.mktemp("tiny_model")
    texts = row_texts(read_rows(corpus["pretrain"]))
    return build_tiny_model(out, texts, vocab_size=512, hidden_size=32, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole suite (starting Ray costs seconds)."""
    import ray

    # "local": a new embedded cluster, never one that another process on this machine runs
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _metric_total(ray, name: str, timeout_s: float = 40.0, at_least: float = 1.0) -> float:
    """Sum of a Ray metric over its label sets on the local node's Prometheus endpoint;
    waits (up to ``timeout_s``) for Ray's periodic export to reach ``at_least``."""
    import time
    import urllib.request

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, total = time.time() + timeout_s, 0.0
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.decode().splitlines()
            if line.startswith((name + "{", name + " "))
        )
        if total >= at_least:
            return total
        time.sleep(1.0)
    return total


@pytest.fixture()
def metric_total():
    """The metrics reader: ``metric_total(ray, name, at_least=...)``."""
    return _metric_total
