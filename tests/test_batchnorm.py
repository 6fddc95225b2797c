"""model.sync_batchnorm (BatchNorm over the global batch) and engine.find_unused_parameters."""

import pytest
import torch
from helpers import compose, load_model, max_weight_diff, spawn, torchrun, train, train_losses
from torch import nn

from gddist.batchnorm import GlobalBatchNorm, convert
from gddist.config import Config
from gddist.dist import detect_launch, init

BN = ["model=custom", "model._target_=models_for_tests.BatchNormNet", "trainer.max_steps=20",
      "trainer.log_every=1", "trainer.eval_every=0"]  # fmt: skip
UNUSED = ["model=custom", "model._target_=models_for_tests.UnusedBranchNet",
          "trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=0"]  # fmt: skip


def _train_worker(rank, init_method, run_dir, overrides):
    return train(run_dir, *overrides, init_method=init_method)


def _max_loss_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert list(a) == list(b)
    return max(abs(a[s] - b[s]) for s in a)


@pytest.fixture(scope="module")
def one_process_bn(tmp_path_factory):
    """The 1-process reference: plain BatchNorm on the whole global batch."""
    run_dir = tmp_path_factory.mktemp("bn") / "one"
    train(run_dir, *BN, "model.sync_batchnorm=true")
    return train_losses(run_dir), load_model(run_dir)


def test_sync_batchnorm_is_gddists_key_not_the_models_constructor_argument():
    cfg = Config.from_dict(
        compose(
            "model=custom", "model._target_=m.Net", "model.sync_batchnorm=true", "+model.width=4"
        )
    )
    assert cfg.model.sync_batchnorm is True
    assert cfg.model.kwargs == {"width": 4}
    assert Config.from_dict(compose("model=mlp", "+model.sync_batchnorm=true")).model.sync_batchnorm


def test_a_world_of_one_with_sync_batchnorm_trains_like_plain_batchnorm(tmp_path, one_process_bn):
    train(tmp_path / "plain", *BN)
    losses, weights = one_process_bn
    assert train_losses(tmp_path / "plain") == losses
    plain = load_model(tmp_path / "plain")
    assert plain.keys() == weights.keys() and "body.1.running_var" in plain
    assert all(torch.equal(plain[k], weights[k]) for k in plain)


@pytest.mark.slow
def test_sync_batchnorm_two_processes_equal_one_process_buffers_included(tmp_path, one_process_bn):
    losses, weights = one_process_bn
    spawn(_train_worker, 2, tmp_path, tmp_path / "sync", [*BN, "model.sync_batchnorm=true"])
    assert _max_loss_diff(train_losses(tmp_path / "sync"), losses) < 1e-5
    synced = load_model(tmp_path / "sync")
    assert synced.keys() == weights.keys()  # SyncBatchNorm keeps BatchNorm's state_dict keys
    assert max_weight_diff(synced, weights) < 1e-5  # running_mean / running_var included
    assert torch.equal(synced["body.1.num_batches_tracked"], torch.tensor(20))
    # Teeth: per-rank BatchNorm (each rank's half of the batch) is another optimization.
    spawn(_train_worker, 2, tmp_path, tmp_path / "local", BN)
    local = load_model(tmp_path / "local")
    assert _max_loss_diff(train_losses(tmp_path / "local"), losses) > 1e-4
    assert (local["body.1.running_var"] - weights["body.1.running_var"]).abs().max() > 1e-4


def _layer_worker(rank, init_method):
    """One training step of a BatchNorm2d layer converted for 2 processes, on this rank's half
    of a fixed batch: outputs, input gradients and running statistics as the full batch gives."""
    cfg = Config.from_dict(compose())
    cfg.dist.init_method = init_method
    dist = init(cfg.dist, detect_launch())
    try:
        torch.manual_seed(0)
        x, w = torch.randn(8, 3, 4, 5) * 3 + 1, torch.randn(8, 3, 4, 5)
        layer, count = convert(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
        half = slice(4 * rank, 4 * rank + 4)
        xs = x[half].clone().requires_grad_()
        out = layer(xs)
        (out * w[half]).sum().backward()
        layer.eval()
        evaluated = layer(x[half])  # running statistics, no collective
        grads = [p.grad.clone() for p in layer.parameters()]
        return dict(count=count, kind=type(layer[0]), out=out.detach(), xgrad=xs.grad,
                    grads=grads, state=layer.state_dict(), evaluated=evaluated)  # fmt: skip
    finally:
        dist.close()


@pytest.mark.slow
def test_converted_batchnorm2d_on_cpu_gives_the_full_batch_outputs_and_gradients(tmp_path):
    ranks = spawn(_layer_worker, 2, tmp_path)
    torch.manual_seed(0)
    x, w = torch.randn(8, 3, 4, 5) * 3 + 1, torch.randn(8, 3, 4, 5)
    full = nn.BatchNorm2d(3)
    x.requires_grad_()
    out = full(x)
    (out * w).sum().backward()
    full.eval()
    evaluated = full(x.detach())
    assert ranks[0]["count"] == 1 and ranks[0]["kind"] is GlobalBatchNorm
    for rank, r in enumerate(ranks):
        half = slice(4 * rank, 4 * rank + 4)
        assert (r["out"] - out[half]).abs().max() < 1e-5
        assert (r["xgrad"] - x.grad[half]).abs().max() < 1e-5
        assert (r["evaluated"] - evaluated[half]).abs().max() < 1e-5
        assert (
            max_weight_diff(r["state"], {f"0.{k}": v for k, v in full.state_dict().items()}) < 1e-6
        )
    # Affine gradients are per rank (DDP averages them): their sum is the full batch's.
    for mine, theirs, ref in zip(
        ranks[0]["grads"], ranks[1]["grads"], full.parameters(), strict=True
    ):
        assert (mine + theirs - ref.grad).abs().max() < 1e-4


@pytest.fixture(scope="module")
def one_process_unused(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unused") / "one"
    train(run_dir, *UNUSED)
    return train_losses(run_dir), load_model(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "accelerate"])
def test_find_unused_parameters_trains_a_model_with_an_unused_branch(
    tmp_path, engine, one_process_unused
):
    args = [*UNUSED, f"engine={engine}", "engine.find_unused_parameters=true"]
    spawn(_train_worker, 2, tmp_path, tmp_path / "two", args)
    losses, one = one_process_unused
    assert _max_loss_diff(train_losses(tmp_path / "two"), losses) < 1e-5
    two = load_model(tmp_path / "two")
    assert max_weight_diff(two, one) < 1e-5
    assert torch.equal(two["spare.weight"], one["spare.weight"])  # untouched: no gradient


@pytest.mark.slow
def test_unused_parameters_without_the_key_fail_in_one_line_naming_them(tmp_path):
    proc = torchrun(2, *UNUSED, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: the model has parameters that got no gradient at the previous step "
        "(spare.weight, spare.bias on rank 0), so DDP could not all-reduce them; pass "
        "engine.find_unused_parameters=true (DDP then finds them at each step), or make every "
        "parameter take part in the loss"
    ], proc.stderr[-4000:]
    # torchrun's agent prints its own report; no traceback comes from gddist's code.
    assert "UserError" not in proc.stderr and "gddist/" not in proc.stderr
