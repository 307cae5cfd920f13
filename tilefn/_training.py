"""Training-loop bookkeeping that Lightning does itself under automatic optimization, but
not under the manual optimization :class:`tilefn.lightning.StreamedModule` uses: gradient
accumulation and learning-rate scheduler stepping. Plain PyTorch, no Lightning: each helper
takes plain values and is unit-tested without a Trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._errors import OptionError

__all__ = ["GradAccumulator", "scheduler_config", "scheduler_is_due", "step_scheduler"]


class GradAccumulator:
    """Counts backward passes; the caller steps the optimizer when a method returns True.

    :meth:`record_backward` is True when a group of ``every`` passes is complete, :meth:`flush`
    when a partial group is pending (at the end of an epoch); both then restart the count.
    """

    def __init__(self) -> None:
        self.pending = 0  # backward passes accumulated since the last optimizer step

    def record_backward(self, every: int) -> bool:
        """Count one backward pass; True when that completes a group of ``every``."""
        self.pending += 1
        if self.pending != every:
            return False
        self.pending = 0
        return True

    def flush(self) -> bool:
        """True when backward passes are pending (a partial group): step them too."""
        pending, self.pending = self.pending, 0
        return pending > 0


def scheduler_config(scheduler: Any) -> tuple[dict[str, Any], tuple[str, bool] | None]:
    """Lightning's scheduler dict for what ``lr_scheduler`` returned, and ``(monitor, strict)``.

    ``"interval"`` defaults to ``"epoch"``. Under manual optimization Lightning ignores (and
    warns about) ``"monitor"``, so it and ``"strict"`` (default True) are taken out of the dict
    and returned, to be used by :func:`step_scheduler`; None when there is no monitor.
    """
    config = dict(scheduler) if isinstance(scheduler, Mapping) else {"scheduler": scheduler}
    config.setdefault("interval", "epoch")
    monitor = config.pop("monitor", None)
    if monitor is None:
        return config, None
    return config, (monitor, config.pop("strict", True))


def scheduler_is_due(interval: str, frequency: int, boundary: str, count: int) -> bool:
    """Whether a scheduler with this ``interval`` and ``frequency`` steps at ``boundary``:
    ``"step"`` after an optimizer step (``count``: optimizer steps done, ``global_step``) or
    ``"epoch"`` at the end of a training epoch (``count``: epochs done)."""
    return interval == boundary and count % frequency == 0


def step_scheduler(
    scheduler: Any, monitor: str | None, strict: bool, metrics: Mapping[str, Any]
) -> None:
    """Step one scheduler, with ``metrics[monitor]`` (``callback_metrics``) if it has a monitor.

    ``ReduceLROnPlateau`` without a monitor raises :class:`~tilefn.OptionError`; a missing
    metric raises RuntimeError when ``strict`` and skips the step otherwise.
    """
    if monitor is None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise OptionError(
                "StreamedModule: ReduceLROnPlateau needs a metric: return "
                '{"scheduler": scheduler, "monitor": "val_loss"} from lr_scheduler.'
            )
        scheduler.step()
        return
    value = metrics.get(monitor)
    if value is None:
        if strict:
            raise RuntimeError(
                f"StreamedModule: the scheduler monitors {monitor!r}, which has not been "
                f"logged; logged so far: {sorted(metrics)}."
            )
        return
    scheduler.step(value)
