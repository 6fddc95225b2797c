"""Tier 1: the real conf/ composes for every option, and validation errors name key, value, fix."""

import pytest
from helpers import CONF, compose

from gddist.config import Config, UserError

GROUPS = ["data", "model", "optimizer", "scheduler", "trainer"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in GROUPS
        for o in options(g)
        if (g, o)
        not in {("data", "csv"), ("data", "npy"), ("data", "dataset"), ("model", "custom")}
    ],
)
def test_every_group_option_composes_and_validates(override):
    cfg = Config.from_dict(compose(override))
    group, option = override.split("=")
    assert group == "trainer" or getattr(cfg, group).name == option


def test_csv_and_custom_model_compose_with_their_required_keys():
    cfg = Config.from_dict(compose("data=csv", "data.path=x.csv", "data.target=y"))
    assert (cfg.data.name, cfg.data.path, cfg.data.target) == ("csv", "x.csv", "y")
    cfg = Config.from_dict(compose("data=npy", "data.path=d"))
    assert (cfg.data.name, cfg.data.path, cfg.data.uses_dataloader) == ("npy", "d", True)
    cfg = Config.from_dict(compose("model=custom", "model._target_=a.B", "+model.width=3"))
    assert (cfg.model.name, cfg.model.target, cfg.model.kwargs) == ("custom", "a.B", {"width": 3})
    cfg = Config.from_dict(
        compose(
            "data=dataset",
            "data.train._target_=a.D",
            "+data.train.split=x",
            "model=custom",
            "model._target_=a.B",
            "loss=mse",
        )
    )
    assert (cfg.data.train, cfg.data.val, cfg.data.uses_dataloader) == (
        {"_target_": "a.D", "split": "x"},
        None,
        True,
    )


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_preset_composes(name):
    Config.from_dict(compose(f"experiment={name}"))


def test_defaults_are_the_purchase_example():
    cfg = Config.from_dict(compose())
    assert (cfg.data.name, cfg.model.name, cfg.optimizer.name) == ("purchase", "linear", "sgd")
    assert cfg.data.num_samples == 1000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.lr=0"], "optimizer.lr=0.0 must be a positive number"),
        (["optimizer.lr=-0.5"], "optimizer.lr=-0.5 must be a positive number"),
        (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps=0 must be > 0"),
        (
            ["trainer.on_nonfinite=ignore"],
            "trainer.on_nonfinite='ignore' is not one of: stop, skip",
        ),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be between 0 and 1"),
        (["data=csv"], "data.path is required for data=csv"),
        (["data=npy"], "data.path is required for data=npy"),
        (["data.loader=disk"], "data.loader='disk' is not one of: auto, memory, dataloader"),
        (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
        (["trainer.max_steps=null", "trainer.max_epochs=null"], "set trainer.max_steps or"),
        (
            ["scheduler=warmup_cosine", "scheduler.warmup_steps=0"],
            "needs scheduler.warmup_steps > 0",
        ),
        (["optimizer.nesterov=true", "optimizer.momentum=0"], "nesterov=true needs"),
        (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be an integer"),
        (["model=mlp", "model.hidden_sizes=[]"], "model.hidden_sizes=[] must be a non-empty list"),
        (["regularization.l1=-1"], "regularization.l1=-1.0 must be a number >= 0"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Config.from_dict(compose(*overrides))


def test_unknown_key_in_a_dict_config_is_rejected():
    d = compose()
    d["trainer"]["max_step"] = 3
    with pytest.raises(UserError, match="unknown config key 'trainer.max_step'"):
        Config.from_dict(d)


def test_batch_size_must_divide_by_world_times_accumulation():
    cfg = Config.from_dict(compose("data.batch_size=60", "trainer.grad_accum_steps=4"))
    cfg.check_world(1)
    cfg.check_world(3)
    with pytest.raises(UserError) as e:
        cfg.check_world(2)
    assert "data.batch_size=60" in str(e.value)
    assert "world_size (2)" in str(e.value) and "grad_accum_steps (4)" in str(e.value)
    assert "= 8" in str(e.value)
