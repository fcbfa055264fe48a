"""Every shipped YAML parses; every entry point it names exists; job configs validate."""

from __future__ import annotations

import glob
import importlib
import os
import re

import pytest
import yaml

from qgate import config as C
from qgate.config_io import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {
    "warmup": C.WarmupConfig,
    "score": C.ScoreConfig,
    "select": C.SelectConfig,
    "finetune": C.FinetuneConfig,
    "evaluate": C.EvaluateConfig,
    "dedup": C.DedupConfig,
    "extend": C.ExtendConfig,
}
ALL_YAML = sorted(
    glob.glob(os.path.join(REPO, "jobs/configs/*.yaml"))
    + glob.glob(os.path.join(REPO, "cluster/**/*.yaml"), recursive=True)
    + glob.glob(os.path.join(REPO, "serve/*.yaml"))
)
JOB_RE = re.compile(r"python -m (jobs\.\w+) --config (jobs/configs/\S+\.yaml)((?:\s+[\w.]+=\S+)*)")


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: os.path.relpath(p, REPO))
def test_yaml_parses(path):
    """Guards against a shipped config that is not even valid YAML."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(REPO, "jobs/configs/*.yaml"))), ids=os.path.basename
)
def test_job_configs_validate_and_name_their_command(path):
    """Guards against a job config drifting from its config class or its header command."""
    with open(path) as f:
        first = f.readline()
    m = JOB_RE.search(first)
    assert m, f"{path} must start with '# python -m jobs.<stage> --config {path}'"
    module, cfg_path = m.group(1), m.group(2)
    assert os.path.relpath(path, REPO) == cfg_path
    stage = module.split(".")[1]
    importlib.import_module(module).main  # noqa: B018 - the entry point exists
    load_config(CLASSES[stage], path, m.group(3).split())


def test_cluster_entrypoints_exist_and_validate():
    """Guards against cluster manifests naming a stage, config or key that does not exist."""
    seen = 0
    for path in glob.glob(os.path.join(REPO, "cluster/**/*.yaml"), recursive=True):
        text = open(path).read()  # noqa: SIM115
        for m in JOB_RE.finditer(text):
            module, cfg_path, overrides = m.group(1), m.group(2), m.group(3).split()
            importlib.import_module(module)
            assert os.path.isfile(os.path.join(REPO, cfg_path)), f"{path}: {cfg_path} missing"
            stage = module.split(".")[1]
            load_config(CLASSES[stage], os.path.join(REPO, cfg_path), overrides)
            seen += 1
    assert seen >= 5


def test_ray_version_pinned_everywhere():
    """Guards against cluster configs running a different Ray than the project pins."""
    pyproject = open(os.path.join(REPO, "pyproject.toml")).read()  # noqa: SIM115
    pinned = re.search(r"ray\[[^\]]+\]==([\d.]+)", pyproject).group(1)
    for path in glob.glob(os.path.join(REPO, "cluster/**/*.yaml"), recursive=True):
        text = open(path).read()  # noqa: SIM115
        versions = set(re.findall(r"ray[:=\[][^\s\"']*?(2\.\d+\.\d+)", text))
        assert versions <= {pinned}, f"{path} names Ray {versions}, project pins {pinned}"


@pytest.mark.parametrize(
    "override, says",
    [
        (
            "calibration={ifd: bth}",
            "expected one of 'pool', 'source', 'both', 'cluster' or a mapping of str",
        ),
        ("budget_count=abc", "budget_count: expected int or None, got 'abc'"),
        ("ppl_band=x", "ppl_band: expected a list of float or None"),
    ],
)
def test_a_wrong_type_names_the_key_and_what_it_takes(override, says):
    """Guards against type errors that print the annotation's internals (Union[...])
    instead of what the key accepts."""
    with pytest.raises(C.ConfigError) as e:
        load_config(C.SelectConfig, None, [override])
    assert says in str(e.value)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"ppl_band": [0.9, 0.1]}, "ppl_band"),
        ({"source_quotas": {"web": 2.0}}, "source_quotas.web"),
        ({"calibration": {"ppl": "both"}}, "calibration"),
        ({"signals": ["gate", "loss"]}, "signals"),
    ],
)
def test_select_config_checks_every_value(kw, key):
    """Guards against a SelectConfig check that no longer runs (a bad band, quota, signal or
    calibration must fail before anything is read)."""
    with pytest.raises(C.ConfigError, match=key):
        C.SelectConfig(**kw)
