"""`gddist.fit`: the trainer of `python train.py`, called from Python with Python objects.

    import gddist
    summary = gddist.fit(model=make_cnn, train=train_set, val=val_set, loss="cross_entropy",
                         overrides=["optimizer=adam", "optimizer.lr=1e-3"], run_dir="runs/cnn")

The config is composed from gddist's own conf/ exactly as the command line composes it
(`overrides` are the same Hydra overrides), then the objects stand in for config nodes:
`data=dataset` with the datasets, `model=custom` with the model, `loss=custom` with a callable
loss, `metrics.extra.NAME` with torchmetrics objects. The run is the command line's run: the same
run dir rules (a rerun resumes), checkpoints, resume checks and outputs; under torchrun each rank
calls `fit` in the script and the ranks train together.

What the resume checks compare for an object: the config names it by its qualified name
(`{"_object_": "my_pkg.data.Digits", "len": 1400}` for a dataset, `model._target_` for a model,
`loss._target_` for a loss), so resuming with another class, or a dataset of another length, is
refused like any other change of the run's data, model or loss. What an object holds beyond that
(a dataset's samples, a factory's code) is not fingerprinted: a resume with other contents under
the same name continues from the checkpoint. A model's parameter names and shapes are checked
when its checkpoint loads.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gddist.config import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def qualname(obj: Any) -> str:
    """module.Name of an object (of its class for an instance)."""
    kind = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', kind.__name__)}"


def compose(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config of `python train.py OVERRIDES` as a plain dict (no hydra node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if not (CONF_DIR / "config.yaml").is_file():
        raise UserError(
            f"gddist's config folder {CONF_DIR} is missing; install gddist from its repository "
            "(pip install -e .) so that conf/ sits next to the gddist package"
        )
    was = GlobalHydra.instance().is_initialized()
    if was:  # a caller's own Hydra app: compose beside it, then leave it as it was
        saved = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides))
    except Exception as e:
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            raise UserError(f"overrides {list(overrides)}: {' '.join(str(e).split())}") from None
        raise
    finally:
        if was:
            GlobalHydra.instance().initialize(saved)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return plain


def fit(
    model: Any,
    train: Any,
    val: Any = None,
    *,
    loss: str | Callable[..., Any] = "auto",
    metrics: str | Mapping[str, Any] = "auto",
    collate: Callable[[list[Any]], Any] | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train `model` on `train` (validated on `val`) and return the run's summary (val/* metrics).

    - `model`: an nn.Module, or a factory (class or function) called with no arguments.
    - `train`, `val`: map-style torch Datasets (`val=None`: `data.val_fraction` of train is
      held out by the seeded split). Samples as for data=dataset (gddist/data/dataset.py).
    - `loss`: a loss= name (auto, cross_entropy, bce, mse, model) or a callable
      `(output, target) -> scalar`.
    - `metrics`: a metrics= preset name, or {name: torchmetrics.Metric} logged as val/<name>
      (besides val/loss).
    - `overrides`: Hydra overrides as on the command line (optimizer=adam, trainer.max_steps=...).
    - `run_dir`: default outputs/<run name>, as `python train.py` names it.

    Raises `gddist.UserError` (one line naming the key and the fix) for bad input.
    """
    from gddist import run, rundir

    objects: dict[str, Any] = {}
    chosen = ["data=dataset", "model=custom"]
    if isinstance(loss, str):
        chosen.append(f"loss={loss}")
    else:
        chosen.append("loss=custom")
    preset = metrics if isinstance(metrics, str) else "none"
    chosen.append(f"metrics={preset}")
    cfg = compose([*chosen, *overrides])
    data = cfg["data"]
    data["train"] = _dataset_node("data.train", train, objects)
    data["val"] = None if val is None else _dataset_node("data.val", val, objects)
    if collate is not None:
        data["collate"] = {"_object_": qualname(collate)}
        objects["data.collate"] = collate
    # The model.* overrides stay: gddist's own (sync_batchnorm) and a factory's arguments.
    model_node = {k: v for k, v in cfg["model"].items() if k not in ("_target_", "name")}
    cfg["model"] = {"_target_": qualname(model), **model_node}
    objects["model"] = model
    if not isinstance(loss, str):
        cfg["loss"] = {"_target_": qualname(loss)}
        objects["loss"] = loss
    if not isinstance(metrics, str):
        extra = cfg["metrics"].setdefault("extra", {})
        for name, metric in metrics.items():
            extra[name] = {"_object_": qualname(metric)}
            objects[f"metrics.extra.{name}"] = metric
    cfg = _resolve(cfg)
    if run_dir is None:
        run_dir = Path("outputs") / rundir.run_name(cfg)
    _log_to_stderr()
    return run(cfg, Path(run_dir), objects)


def _dataset_node(key: str, ds: Any, objects: dict[str, Any]) -> dict[str, Any]:
    if isinstance(ds, Mapping) and "_target_" in ds:  # a config node, as in a yaml file
        return dict(ds)
    objects[key] = ds
    node: dict[str, Any] = {"_object_": qualname(ds)}
    with contextlib.suppress(TypeError):  # not sized: data.build names the problem
        node["len"] = len(ds)
    return node


def _resolve(cfg: dict[str, Any]) -> dict[str, Any]:
    """Resolve the config's interpolations (${...}) once its nodes are set."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True, throw_on_missing=True)


def _log_to_stderr() -> None:
    """gddist's INFO lines (run dir, resume) on rank 0's stderr, as the command line shows them,
    unless the caller configured logging itself."""
    from gddist.dist import detect_launch

    logger = logging.getLogger("gddist")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if detect_launch().rank == 0 else logging.WARNING)
