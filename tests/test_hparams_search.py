"""Hyperparameter search (conf/hparams_search/, gddist/hparams.py): docs/hparams-search.md's
commands run as written, an Optuna search on lr_sweep that survives a diverged trial, the report
of its trials, the objective contract and the refusal under torchrun."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import CONF, ROOT, check, clean_env, compose, train
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from gddist.cli import check_overrides
from gddist.config import Config, UserError
from gddist.hparams import objective
from gddist.keys import identity
from gddist.report import load_jobs

DOC = ROOT / "docs" / "hparams-search.md"
STABLE_LR = 2 / 1.17  # lr_sweep's stability limit (conf/experiment/lr_sweep.yaml)


def doc_commands() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)]


def run_doc(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A doc command as written, from a folder holding train.py and conf/ like the repo root."""
    env = clean_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return check(proc)


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "train.py").symlink_to(ROOT / "train.py")
    (tmp_path / "conf").symlink_to(CONF)
    return tmp_path


def table(report_md: str) -> list[dict[str, str]]:
    lines = [ln for ln in report_md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, [c.strip() for c in ln.strip("|").split("|")], strict=True))
        for ln in lines[2:]
    ]


def test_optuna_search_on_lr_sweep_finds_a_stable_lr_and_survives_divergence(project):
    search, report = doc_commands()[:2]
    proc = run_doc(search, project)  # exit 0 although a trial diverged
    sweep = project / "multirun" / "lr_search"
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = load_jobs(sweep)
    assert len(jobs) == 6 and all(j.summary is not None for j in jobs)
    lrs = [float(j.overrides["optimizer.lr"]) for j in jobs]
    diverged = [j for j in jobs if j.summary["diverged"]]
    # The seeded sampler's first random trials include an lr past the limit: it diverged, its
    # trial returned +inf, and the search went on to the next trials.
    assert diverged and all(float(j.overrides["optimizer.lr"]) > STABLE_LR for j in diverged)
    assert int(diverged[0].dir.name) < len(jobs) - 1
    assert "objective val/loss (minimize): inf" in proc.stdout
    # Optuna's best is the lowest val/loss of the trials that did not diverge, in the stable range.
    finite = {j.dir.name: j.summary["val/loss"] for j in jobs if not j.summary["diverged"]}
    best = min(finite, key=finite.get)
    assert results["best_value"] == pytest.approx(finite[best], rel=1e-12)
    assert results["best_params"]["optimizer.lr"] == pytest.approx(lrs[int(best)], rel=1e-12)
    assert 1e-3 <= results["best_params"]["optimizer.lr"] < STABLE_LR
    # The report (written by the sweep's callback, and again by hand): one row per trial.
    by_hand = run_doc(report, project).stdout
    assert by_hand.rstrip("\n") == (sweep / "report.md").read_text().rstrip("\n")
    rows = table(by_hand)
    assert [r["trial"] for r in rows] == [j.dir.name for j in jobs]
    assert {"lr", "data.batch_size", "objective (val/loss)", "diverged"} <= set(rows[0])
    for row, job in zip(rows, jobs, strict=True):
        assert float(row["lr"]) == pytest.approx(float(job.overrides["optimizer.lr"]), rel=1e-3)
        if job.summary["diverged"]:
            assert row["objective (val/loss)"] == "inf" and row["diverged"].startswith("yes")
        else:
            assert float(row["objective (val/loss)"]) == pytest.approx(
                job.summary["val/loss"], rel=1e-3
            )
        assert (row["best trial"] == "✓") == (job.dir.name == best)
    assert f"Best trial: {best} (" in by_hand


@pytest.mark.slow  # 4 runs of 300 steps and a contour plot: the lr search above is the fast check
def test_restarts_search_draws_random_seeds_and_finds_the_global_minimum(project):
    run_doc(doc_commands()[2], project)
    sweep = project / "multirun" / "restarts"
    jobs = load_jobs(sweep)
    seeds = [int(j.overrides["seed"]) for j in jobs]
    assert len(jobs) == 4 and len(set(seeds)) == 4  # four random starts, no other key searched
    assert {k for j in jobs for k in j.overrides} == {
        "seed", "hparams_search", "experiment", "logger.progress", "logger.plots"
    }  # fmt: skip
    finals = {j.summary["train/loss"] for j in jobs}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # Styblinski-Tang's global minimum in 2-D is -78.33; the four starts end in several basins.
    assert results["best_value"] == min(finals) == pytest.approx(-78.33233, abs=1e-3)
    assert len({round(v, 1) for v in finals}) > 1


def hydra_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


def test_presets_compose_with_their_experiments():
    cfg = hydra_config("hparams_search=optuna", "experiment=lr_sweep")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler.seed == 0
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    # The preset's search space replaces lr_sweep's five-value list of the same key.
    assert dict(sweeper.params) == {
        "optimizer.lr": "tag(log, interval(0.001, 10))",
        "data.batch_size": "choice(32, 64, 128)",
    }
    assert cfg.optimized_metric == "val/loss" and sweeper.direction == "minimize"
    cfg = hydra_config("hparams_search=restarts", "experiment=restarts")
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.RandomSampler"
    assert dict(cfg.hydra.sweeper.params) == {"seed": "int(interval(0, 9999))"}
    assert cfg.optimized_metric == "train/loss" and cfg.model.function == "styblinski_tang"
    for name in ("optuna", "restarts"):
        Config.from_dict(compose(f"hparams_search={name}"))


def test_objective_is_the_metric_or_the_worst_value_never_nan():
    summary = {"val/loss": 0.25, "train/loss": 0.5, "diverged": False}
    assert objective(summary, "val/loss") == 0.25
    assert objective(summary, "train/loss", "maximize") == 0.5
    diverged = {"train/loss": 1e30, "diverged": True}
    assert objective(diverged, "val/loss") == math.inf
    assert objective(diverged, "val/accuracy", "maximize") == -math.inf
    assert objective({"val/loss": math.nan, "diverged": False}, "val/loss") == math.inf


def test_optuna_keeps_an_infinite_value_and_rejects_nan():
    """Why a diverged trial returns +-inf rather than NaN (gddist/hparams.py)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for value in (math.inf, 0.5):
        trial = study.ask()
        trial.suggest_float("lr", 1e-3, 10, log=True)
        study.tell(trial, value)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.best_value == 0.5
    trial = study.ask()
    with pytest.raises(ValueError, match="returned nan"):  # the sweeper then marks it FAIL
        study.tell(trial, math.nan)


def test_optimized_metric_is_checked_and_not_part_of_the_run_identity(tmp_path):
    base = compose()
    assert identity({**base, "optimized_metric": "val/loss"}) == identity(base)
    with pytest.raises(UserError, match=r"optimized_metric='loss' must be train/loss or"):
        Config.from_dict({**base, "optimized_metric": "loss"})
    with pytest.raises(UserError, match=r"optimized_metric='val/r2' is not a metric of this run"):
        train(tmp_path / "run", "optimized_metric=val/r2", "trainer.max_steps=1")  # classifier
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_search_under_torchrun_is_refused_in_one_line(tmp_path):
    env = clean_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna",
         "experiment=lr_sweep", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "sweep").exists()  # refused before Hydra started any sweeper
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "error: a hyperparameter search runs in one driver process, not under torchrun "
        "(rank 0 of 2 here"
    ), proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "hparams_search=optuna", "experiment=lr_sweep", "optimizer.lr=0.1,1"],
        ["hparams_search=restarts"],  # hydra.mode: MULTIRUN, no -m
        ["-m", "hydra/sweeper=optuna", "optimized_metric=val/loss"],
    ],
)
def test_every_rank_refuses_every_way_of_choosing_the_optuna_sweeper(monkeypatch, argv):
    # Rank 1's check, in this process: the command line exits through gddist.cli.fail, where a
    # rank other than 0 prints nothing and exits 2 after NONZERO_RANK_EXIT_DELAY_S.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"^a hyperparameter search .* \(rank 1 of 2 here"):
        check_overrides(argv, CONF)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a search is fine
    check_overrides(argv, CONF)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a plain multirun under torchrun is not refused here
    check_overrides(["-m", "optimizer.lr=0.1,1"], CONF)


def test_an_unknown_search_preset_is_one_line():
    with pytest.raises(UserError) as e:
        check_overrides(["hparams_search=nope"], CONF)
    assert str(e.value) == "unknown hparams_search option 'nope'; choose one of: optuna, restarts"
