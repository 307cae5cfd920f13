"""The manual-optimization helpers of tilefn.lightning (in tilefn._training, which needs no
Lightning), on plain values (no Trainer): the accumulation counter, which schedulers fall
due, and stepping one scheduler with its metric."""

from __future__ import annotations

import pytest
import torch

import tilefn
from tilefn._training import (
    GradAccumulator,
    scheduler_config,
    scheduler_is_due,
    step_scheduler,
)


def optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lr_of(opt: torch.optim.Optimizer) -> float:
    return opt.param_groups[0]["lr"]


class CountingScheduler:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def step(self, *args: object) -> None:
        self.calls.append(args)


# --- accumulation ---------------------------------------------------------------------------


def test_accumulation_k1_steps_after_every_backward():
    acc = GradAccumulator()
    assert [acc.record_backward(1) for _ in range(4)] == [True] * 4
    assert not acc.flush()  # nothing left at the end of the epoch


def test_accumulation_k3_with_a_partial_group_at_epoch_end():
    acc = GradAccumulator()
    steps = [acc.record_backward(3) for _ in range(7)]
    assert steps == [False, False, True, False, False, True, False]
    assert acc.pending == 1
    assert acc.flush()  # the 7th batch is stepped at the end of the epoch
    assert acc.pending == 0
    assert not acc.flush()  # flushing twice steps once
    # The next epoch starts a fresh group.
    assert [acc.record_backward(3) for _ in range(3)] == [False, False, True]


# --- which schedulers are due -----------------------------------------------------------------


def test_step_interval_with_frequency_2():
    due = [scheduler_is_due("step", 2, "step", n) for n in range(1, 7)]
    assert due == [False, True, False, True, False, True]
    assert not any(scheduler_is_due("step", 2, "epoch", n) for n in range(1, 7))


def test_epoch_interval_with_frequency_2():
    due = [scheduler_is_due("epoch", 2, "epoch", n) for n in range(1, 7)]
    assert due == [False, True, False, True, False, True]
    assert not any(scheduler_is_due("epoch", 2, "step", n) for n in range(1, 7))


def test_frequency_1_is_due_at_every_boundary_of_its_interval():
    assert all(scheduler_is_due("epoch", 1, "epoch", n) for n in range(1, 5))
    assert all(scheduler_is_due("step", 1, "step", n) for n in range(1, 5))


# --- the scheduler config returned by lr_scheduler --------------------------------------------


def test_scheduler_config_of_a_bare_scheduler_defaults_to_epochs():
    s = CountingScheduler()
    assert scheduler_config(s) == ({"scheduler": s, "interval": "epoch"}, None)


def test_scheduler_config_takes_out_monitor_and_strict():
    s = CountingScheduler()
    config, monitor = scheduler_config(
        {"scheduler": s, "interval": "step", "frequency": 2, "monitor": "val_loss", "strict": False}
    )
    assert config == {"scheduler": s, "interval": "step", "frequency": 2}
    assert monitor == ("val_loss", False)
    assert scheduler_config({"scheduler": s, "monitor": "val_acc"})[1] == ("val_acc", True)


# --- stepping one scheduler -------------------------------------------------------------------


def test_scheduler_without_monitor_is_stepped_plainly():
    opt = optimizer(0.1)
    s = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step()  # as after an optimizer step (torch warns otherwise)
    step_scheduler(s, None, True, {"val_loss": torch.tensor(1.0)})
    assert lr_of(opt) == pytest.approx(0.05)


def test_reduce_lr_on_plateau_gets_the_metric_value():
    s = CountingScheduler()
    value = torch.tensor(0.25)
    step_scheduler(s, "val_loss", True, {"val_loss": value, "train_loss": torch.tensor(9.0)})
    assert len(s.calls) == 1 and s.calls[0][0] is value

    opt = optimizer(0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for loss in (1.0, 0.5, 0.7):  # improves, improves, then gets worse: one reduction
        step_scheduler(plateau, "val_loss", True, {"val_loss": torch.tensor(loss)})
    assert lr_of(opt) == pytest.approx(0.05)


def test_missing_metric_strict_raises():
    s = CountingScheduler()
    with pytest.raises(RuntimeError) as info:
        step_scheduler(s, "val_loss", True, {"train_loss": torch.tensor(1.0)})
    assert str(info.value) == (
        "StreamedModule: the scheduler monitors 'val_loss', which has not been logged; "
        "logged so far: ['train_loss']."
    )
    assert s.calls == []


def test_missing_metric_non_strict_skips_the_step():
    s = CountingScheduler()
    step_scheduler(s, "val_loss", False, {"train_loss": torch.tensor(1.0)})
    step_scheduler(s, "val_loss", False, {})
    assert s.calls == []


def test_reduce_lr_on_plateau_without_a_monitor_raises_option_error():
    opt = optimizer(0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(tilefn.OptionError) as info:
        step_scheduler(plateau, None, True, {"val_loss": torch.tensor(1.0)})
    assert str(info.value) == (
        "StreamedModule: ReduceLROnPlateau needs a metric: return "
        '{"scheduler": scheduler, "monitor": "val_loss"} from lr_scheduler.'
    )
    assert lr_of(opt) == 0.1
