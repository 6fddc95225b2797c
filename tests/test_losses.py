"""The loss= group: the default is today's task loss bit for bit, every option trains, val/loss is
the trained loss, loss=model reads the model's own loss, and a bad loss is one line, exit 2."""

import re
from pathlib import Path

import pytest
import torch
from helpers import cli, compose, load_model, train, train_losses
from models_for_tests import huber

from gddist import data as data_mod
from gddist import keys, losses
from gddist.config import Config, LossConfig, UserError

SHORT = ["trainer.max_steps=24", "trainer.log_every=1", "trainer.eval_every=12"]


def weights(run_dir: Path) -> list[torch.Tensor]:
    """The final weights in order (their names differ between model=linear and a wrapper)."""
    return list(load_model(run_dir).values())


def assert_same_run(a: Path, b: Path, sa: dict, sb: dict) -> None:
    """Bit-identical per-step losses, final weights and val/loss."""
    assert train_losses(a) == train_losses(b)
    wa, wb = weights(a), weights(b)
    assert len(wa) == len(wb) and all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True))
    assert sa["val/loss"] == sb["val/loss"]


@pytest.fixture(scope="module")
def multiclass_csv(tmp_path_factory) -> str:
    """300 rows, 2 features, 3 classes that follow the features (cheap, learnable)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    path = tmp_path_factory.mktemp("mc") / "mc.csv"
    body = [f"{a:.4f},{b:.4f},{c}" for (a, b), c in zip(x.tolist(), y.tolist(), strict=True)]
    lines = ["a,b,label", *body]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("case", ["purchase-bce", "regression-mse", "multiclass-cross_entropy"])
def test_auto_is_bit_identical_to_the_tasks_own_loss(tmp_path, case, multiclass_csv):
    data, loss = case.split("-")
    if data == "multiclass":
        source = ["data=csv", f"data.path={multiclass_csv}", "data.target=label"]
    else:
        source = [f"data={data}"]
    auto = train(tmp_path / "auto", *source, *SHORT)
    named = train(tmp_path / loss, *source, *SHORT, f"loss={loss}")
    assert_same_run(tmp_path / "auto", tmp_path / loss, auto, named)
    assert named["train/loss"] < train_losses(tmp_path / loss)[1]  # it trained


def val_rows(*overrides: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = Config.from_dict(compose(*overrides))
    data = data_mod.build(cfg.data, cfg.seed)
    return data.x_val, data.y_val


def test_a_custom_loss_trains_and_val_loss_is_that_loss(tmp_path):
    fn = ["data=regression", "loss=custom", "loss._target_=models_for_tests.huber"]
    summary = train(tmp_path / "fn", *fn, "+loss.delta=0.5", *SHORT)
    # val/loss is the Huber loss of the final model on the validation rows (one eval batch).
    w, b = weights(tmp_path / "fn")
    x, y = val_rows("data=regression")
    expected = huber(torch.nn.functional.linear(x, w, b).squeeze(-1), y, delta=0.5).item()
    assert summary["val/loss"] == pytest.approx(expected, rel=1e-6)
    mse = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, w, b).squeeze(-1), y)
    assert summary["val/loss"] != pytest.approx(mse.item(), rel=1e-3)  # not auto's loss
    # A class is built once with the other loss.* keys: torch's own Huber loss, same run.
    cls = ["data=regression", "loss=custom", "loss._target_=torch.nn.HuberLoss"]
    other = train(tmp_path / "cls", *cls, "+loss.delta=0.5", *SHORT)
    assert other["val/loss"] == pytest.approx(summary["val/loss"], rel=1e-5)
    assert Config.from_dict(compose(*cls, "+loss.delta=0.5")).loss == LossConfig(
        "custom", "torch.nn.HuberLoss", {"delta": 0.5}
    )


@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "object"])
def test_loss_model_trains_on_the_loss_the_model_returns(tmp_path, as_object):
    """LossInOutput returns mean(logits^2) as {"loss", "logits"} or an object with .loss: the
    same run as model=linear with that loss written as a custom loss."""
    model = ["model=custom", "model._target_=models_for_tests.LossInOutput"]
    own = train(tmp_path / "own", *model, f"+model.as_object={as_object}", "loss=model", *SHORT)
    ref = ["loss=custom", "loss._target_=models_for_tests.square_mean"]
    custom = train(tmp_path / "ref", *ref, *SHORT)
    assert_same_run(tmp_path / "own", tmp_path / "ref", own, custom)
    assert own["val/accuracy"] == custom["val/accuracy"]  # metrics read output["logits"]


def test_first_call_checks_and_later_calls_go_straight_through():
    device = torch.device("cpu")
    ce = losses.build(LossConfig("cross_entropy"), "multiclass", device)
    logits, y = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    # Whole-number float targets are class indices.
    assert torch.equal(ce(logits, y.float()), torch.nn.functional.cross_entropy(logits, y))
    assert ce.checked
    bad = losses.build(LossConfig("cross_entropy"), "multiclass", device)
    with pytest.raises(UserError, match=r"class indices span \[0, 3\], outside \[0, 2\]"):
        bad(logits, torch.tensor([0, 3, 1, 1, 0, 2]))
    with pytest.raises(UserError, match="not whole numbers"):
        bad(logits, y.float() + 0.5)
    model = losses.build(LossConfig("model"), "binary", device)
    with pytest.raises(UserError, match=r"loss=model: the model's output \(a dict with keys"):
        model({"logits": logits}, y)
    with pytest.raises(UserError, match=r"output \(float32\[6, 3\]\) is not a scalar loss"):
        model(logits, y)  # predictions, not a loss
    assert model(torch.tensor(2.0), y).item() == 2.0  # a scalar output is the loss
    with pytest.raises(UserError, match="no predictions"):
        losses.predictions(torch.tensor(2.0))


def test_changing_the_loss_on_resume_is_refused(tmp_path):
    assert keys.kind("loss.name") == "refused" and keys.kind("loss.kwargs.delta") == "refused"
    train(tmp_path, "trainer.max_steps=6")
    with pytest.raises(UserError, match=r"loss.name: 'auto' -> 'mse'.*allow_changes"):
        train(tmp_path, "trainer.max_steps=12", "loss=mse")


@pytest.mark.parametrize("name", ["auto", "cross_entropy", "bce", "mse", "model"])
def test_every_loss_option_composes(name):
    assert Config.from_dict(compose(f"loss={name}")).loss.name == name


BAD = {
    "missing _target_": (
        ["loss=custom"],
        r"loss\._target_ is required for loss=custom; pass loss\._target_=",
    ),
    "not importable": (
        ["loss=custom", "loss._target_=no_such_pkg.loss"],
        r"loss\._target_=no_such_pkg\.loss cannot be imported \(No module named 'no_such_pkg'\)",
    ),
    "factory raises": (
        ["loss=custom", "loss._target_=torch.nn.HuberLoss", "+loss.deltta=1"],
        r"loss\._target_=torch\.nn\.HuberLoss could not be built: TypeError: .*'deltta'",
    ),
    "target does not fit": (
        ["loss=cross_entropy"],
        r"loss=cross_entropy: output float32\[64, 1\] and target float32\[64\] do not fit .*"
        r"cross_entropy wants logits \[B, C\]",
    ),
    "model output without a loss": (
        [
            "loss=model",
            "model=custom",
            "model._target_=models_for_tests.LossInOutput",
            "+model.with_loss=false",
        ],  # fmt: skip
        r"loss=model: the model's output \(a dict with keys \['logits'\]\) has no loss",
    ),
    "non-scalar first loss": (
        ["loss=custom", "loss._target_=torch.nn.functional.mse_loss", "+loss.reduction=none"],
        r"loss=custom \(torch\.nn\.functional\.mse_loss\): the first loss is float32\[64\], "
        "not a scalar",
    ),
    "non-finite first loss": (
        ["loss=custom", "loss._target_=models_for_tests.nan_loss"],
        r"loss=custom \(models_for_tests\.nan_loss\): the first loss is nan",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_loss_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    args, message = BAD[case]
    run = tmp_path / "run"
    proc = cli(*args, "trainer.max_steps=5", "checkpoint.every_steps=1", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert re.search(message, lines[0]), lines[0]
    assert not (run / "model.pt").exists()
    ckpts = run / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir()), list(ckpts.iterdir())
