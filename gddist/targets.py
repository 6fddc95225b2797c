"""User code named in the config by a dotted path (`model._target_`, `loss._target_`,
`metrics.extra.NAME._target_`): imported here, or one line saying why not."""

from __future__ import annotations

import importlib
from typing import Any

from gddist.config import UserError


def import_target(key: str, path: str, wants: str) -> Any:
    """The object at dotted `path` (module.attr); a UserError naming `key`, the path, the cause
    (its first line) and `wants` (what the key takes, with an example) when it cannot be had."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{key}={path} cannot be imported ({cause}); give the dotted path of {wants}"
        ) from None
