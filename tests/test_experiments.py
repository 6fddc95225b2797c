"""Every conf/experiment/* preset composes into a valid config for each of its sweep values, and
runs as `python train.py -m experiment=NAME` (shrunk to a few steps) to its sweep report."""

import copy
import functools
import itertools
import re

import pytest
import yaml
from helpers import CONF, check, cli, compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gddist.config import Config
from gddist.examples import EXAMPLES
from gddist.hydra_callbacks import SweepReport

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# smoke and the application presets (gddist.examples) are single runs.
SWEEPS = [name for name in PRESETS if name != "smoke" and name not in EXAMPLES]


def sweep_params(name: str) -> dict[str, list[str]]:
    """The preset's hydra.sweeper.params, each expanded to its list of values."""
    raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    params = OmegaConf.select(raw, "hydra.sweeper.params") or {}
    parser = OverridesParser.create()
    return {
        key: list(parser.parse_override(f"{key}={value}").sweep_string_iterator())
        for key, value in params.items()
    }


def test_the_presets_are_the_ones_the_readme_promises():
    assert set(SWEEPS) == {
        "lr_sweep", "gd_variants", "regularization", "optimizers", "restarts", "objective"
    }  # fmt: skip


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_and_its_swept_values_are_valid_configs(name):
    base = compose(f"experiment={name}")
    Config.from_dict(base)
    for key, values in sweep_params(name).items():
        if "/" in key:  # a config group: its options are composed in the test below
            assert set(values) <= VARIANTS[key.split("/")[1]], key
            continue
        for value in values:  # a plain value, e.g. optimizer.lr=10: validate it in place
            cfg = copy.deepcopy(base)
            *path, last = key.split(".")
            node = functools.reduce(dict.__getitem__, path, cfg)
            node[last] = yaml.safe_load(value)
            Config.from_dict(cfg)


VARIANTS = {
    "gd_variants": {"batch", "minibatch", "stochastic"},
    "regularization": {"none", "l1", "l2"},
    "optimizers": {"sgd", "momentum", "adam", "adagrad", "rmsprop"},
    "objective": {"sgd", "momentum", "adam", "adagrad", "rmsprop"},
}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_reports_itself(name):
    raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    callbacks = OmegaConf.to_container(OmegaConf.select(raw, "hydra.callbacks"))
    (options,) = [c for c in callbacks.values() if c["_target_"].endswith(".SweepReport")]
    SweepReport(**{k: v for k, v in options.items() if k != "_target_"})  # options are valid
    assert sweep_params(name), "a report needs a sweep"


def test_the_variant_presets_change_what_their_names_say():
    def cfg(*overrides):
        return Config.from_dict(compose(*overrides))

    for group, options in VARIANTS.items():  # every option file exists
        assert {p.stem for p in (CONF / "experiment" / group).glob("*.yaml")} == options
    batch = [cfg("experiment=gd_variants", f"experiment/gd_variants={v}").data.batch_size
             for v in ("batch", "minibatch", "stochastic")]  # fmt: skip
    assert batch == [800, 64, 1]
    reg = [cfg("experiment=regularization", f"experiment/regularization={v}").regularization
           for v in ("none", "l1", "l2")]  # fmt: skip
    assert [(r.l1 > 0, r.l2 > 0) for r in reg] == [(False, False), (True, False), (False, True)]
    for group in ("optimizers", "objective"):
        optims = {v: cfg(f"experiment={group}", f"experiment/{group}={v}").optimizer
                  for v in ("sgd", "momentum", "adam", "adagrad", "rmsprop")}  # fmt: skip
        assert [o.name for o in optims.values()] == ["sgd", "sgd", "adam", "adagrad", "rmsprop"]
        assert optims["sgd"].momentum == 0 and optims["momentum"].momentum == 0.9


def table_rows(report_md: str) -> list[list[str]]:
    lines = [ln for ln in report_md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln.strip("|"))] for ln in lines]


# Two jobs per sweep (a command-line sweep of a key replaces the preset's sweep of that key);
# every option of every preset is composed and validated by the tests above.
SHRINK = {
    "lr_sweep": {"optimizer.lr": ["0.1", "10"]},
    "gd_variants": {"experiment/gd_variants": ["batch", "stochastic"]},
    "regularization": {"experiment/regularization": ["none", "l1"]},
    "optimizers": {"experiment/optimizers": ["sgd", "adam"]},
    "restarts": {"seed": ["0", "3"]},
    "objective": {"experiment/objective": ["momentum", "adagrad"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_runs_shrunk_and_writes_its_report(tmp_path, name):
    sweep_dir = tmp_path / "sweep"
    shrink = SHRINK[name]
    args = ["-m", f"experiment={name}", "trainer.max_steps=20", "logger.plots=false"]
    args += [f"{key}={','.join(values)}" for key, values in shrink.items()]
    proc = check(cli(*args, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, timeout=300))
    jobs = len(list(itertools.product(*{**sweep_params(name), **shrink}.values())))
    header, _, *rows = table_rows((sweep_dir / "report.md").read_text())
    assert len(rows) == jobs == len(list(sweep_dir.glob("*/summary.json")))
    assert (sweep_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| steps |" in proc.stdout  # the table is printed too
    assert all(row[header.index("steps")] == "20" or "yes" in row[header.index("diverged")]
               for row in rows)  # fmt: skip
    if name == "lr_sweep":  # within 20 steps lr=10 has blown up, lr=0.1 has not
        diverged = {row[header.index("lr")]: row[header.index("diverged")] for row in rows}
        assert diverged == {"0.1": "no", "10": "yes (step 16)"}
