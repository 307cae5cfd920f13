"""Lightning integration: a generic ``LightningModule`` for a streamed trunk and any head.

This is the only module of tilefn that imports ``lightning`` (``pip install "tilefn[lightning]"``).

The trunk runs tile by tile through :func:`tilefn.streamify`; the head runs as usual on the
stitched feature map. Training uses manual optimization: ``self.manual_backward(loss)`` goes
through ordinary autograd, and the streamed trunk's backward (recompute per crop) fills the
trunk parameters' ``.grad`` through the same accumulation hooks a plain model would use. So
mixed precision, gradient scaling, DDP's gradient all-reduce and checkpointing all work
unchanged, with no hand-written synchronisation.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "tilefn.lightning needs Lightning: pip install 'tilefn[lightning]' "
        "(lightning>=2.2 and torchmetrics)."
    ) from e

from lightning.pytorch.trainer.states import TrainerStatus  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from ._api import StreamedBackbone, TileSize, streamify
from ._errors import InputTypeError, OptionError
from ._inputs import ImageSource
from ._training import GradAccumulator, scheduler_config, scheduler_is_due, step_scheduler

__all__ = ["StreamedModule", "TrainingInterrupted", "run"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_STAGES = ("train", "val", "test")


class StreamedModule(pl.LightningModule):
    """A ``LightningModule`` that trains ``head(trunk(x))`` with the trunk streamed.

    Training runs with manual optimization (``automatic_optimization = False``): the forward
    streams the trunk crop by crop and runs the head on the stitched output;
    ``self.manual_backward(loss)`` backpropagates through the head as usual and through the
    trunk by recomputing each crop (exact gradients for every trunk parameter). Validation,
    test and prediction run the streamed forward only: no gradients, no crop graphs kept.

    Why it re-implements accumulation, clipping and scheduling: under manual optimization
    Lightning does none of them (it refuses ``Trainer(accumulate_grad_batches=...)`` and
    ``Trainer(gradient_clip_val=...)``, and neither steps the learning-rate schedulers nor reads
    their ``"monitor"``), so this module does. ``training_step`` counts backward passes and
    steps the optimizer every ``accumulate_grad_batches`` batches, and :meth:`on_train_epoch_end`
    steps a partial group left at the end of the epoch; :meth:`on_before_optimizer_step` clips;
    after each optimizer step and at each epoch end, the schedulers whose ``interval`` and
    ``frequency`` fall due are stepped (``ReduceLROnPlateau`` with its monitored metric). The
    logic lives in small helpers of this module: ``GradAccumulator``, ``scheduler_config``,
    ``scheduler_is_due`` and ``step_scheduler`` (in ``tilefn._training``, which needs no
    Lightning).

    Args:
        trunk: The local part of the network: a plain ``nn.Module`` (streamified here with
            ``tile_size`` and ``stream_options``) or the backbone returned by
            :func:`tilefn.streamify`.
        head: Any module applied to the trunk's output (global pooling and a linear layer,
            attention pooling, a per-pixel segmentation head, ...).
        loss_fn: ``loss_fn(head_output, target) -> scalar tensor``.
        tile_size: Largest crop side in input pixels; required when ``trunk`` is a plain module.
        optimizer: Builds the optimizer from an iterable of parameters, for example
            ``functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)``. Defaults to AdamW
            with ``lr=1e-3``. Override :meth:`configure_optimizers` for anything fancier.
        lr_scheduler: Builds a scheduler from the optimizer. It may return a scheduler (stepped
            once per epoch) or a Lightning scheduler dict such as ``{"scheduler": s,
            "interval": "step", "frequency": 1}``; ``ReduceLROnPlateau`` needs
            ``"monitor": "val_loss"`` (or another logged metric).
        metrics: A torchmetrics ``Metric``, ``MetricCollection`` or dict of metrics. It is
            cloned for each stage and logged per epoch as ``train_*``, ``val_*`` and ``test_*``.
            Metrics are updated with ``(head_output, target)``.
        accumulate_grad_batches: Step the optimizer every this many batches (the gradients of
            the batches in between add up; the loss is divided by this number). Pass it here,
            not to the ``Trainer``: Lightning refuses it there under manual optimization. A
            partial group at the end of an epoch is stepped too.
        gradient_clip_val: Clip gradients to this value before each optimizer step (after
            unscaling, under mixed precision). ``None`` disables clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        freeze_trunk: Train the head only: the trunk's parameters stop requiring gradients,
            the trunk stays in eval mode, and its streamed forward keeps no crop graphs.
        **stream_options: When ``trunk`` is a plain module, the options of
            :func:`tilefn.streamify`, each documented in full by :class:`tilefn.StreamOptions`:
            ``saliency``, ``verbose``, ``deterministic``, ``normalize``, ``device``,
            ``memory_budget``, ``channels_last``, ``crop_batch``, ``process_group``,
            ``skip_constant``, ``prefetch``, ``batchnorm``, ``cut_at`` and
            ``spill_dir``.

    Batches are ``(image, target)`` pairs; override :meth:`unpack_batch` for other layouts.
    Subclasses that override :meth:`train`, :meth:`on_before_optimizer_step` or
    :meth:`on_train_epoch_end` must call ``super()``.

    Example:
        >>> import functools, torch, lightning, tilefn
        >>> from torch import nn
        >>> from tilefn.lightning import StreamedModule
        >>> trunk = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU())
        >>> head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> module = StreamedModule(trunk, head, nn.functional.cross_entropy, tile_size=64,
        ...                         optimizer=functools.partial(torch.optim.SGD, lr=0.1))
        >>> module(torch.randn(1, 1, 128, 128)).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        trunk: nn.Module | StreamedBackbone,
        head: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        tile_size: TileSize | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        metrics: Any = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        freeze_trunk: bool = False,
        **stream_options: Any,
    ):
        super().__init__()
        self.automatic_optimization = False
        backbone = _as_backbone(trunk, tile_size, stream_options)
        _check_arguments(
            head, loss_fn, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm
        )
        self.trunk = backbone
        self.head = head
        self.loss_fn = loss_fn
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-3)
        self.lr_scheduler_factory = lr_scheduler
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.freeze_trunk = freeze_trunk
        self._accumulator = GradAccumulator()  # backward passes since the last optimizer step
        self._monitors: dict[int, tuple[str, bool]] = {}  # scheduler id -> (metric, strict)
        if freeze_trunk:
            self.trunk.requires_grad_(False)
            self.trunk.eval()
        stage_metrics = _stage_metrics(metrics)
        self.train_metrics = stage_metrics.get("train")
        self.val_metrics = stage_metrics.get("val")
        self.test_metrics = stage_metrics.get("test")
        self.save_hyperparameters(
            {
                "tile_size": backbone.tile_size,
                "accumulate_grad_batches": accumulate_grad_batches,
                "gradient_clip_val": gradient_clip_val,
                "gradient_clip_algorithm": gradient_clip_algorithm,
                "freeze_trunk": freeze_trunk,
            }
        )

    # --- model ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> Any:
        """``head(trunk(x))``, the trunk streamed tile by tile."""
        return self.head(self.trunk(x))

    def unpack_batch(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """Split a batch into ``(image, target)``. Override for other batch layouts."""
        if isinstance(batch, Mapping):
            return batch["image"], batch.get("target")
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise InputTypeError(
            "StreamedModule: expected batches of (image, target) or dicts with 'image' and "
            f"'target', got {type(batch).__name__}. Override unpack_batch() for other layouts."
        )

    def train(self, mode: bool = True) -> StreamedModule:
        """Switch train/eval mode; a frozen trunk stays in eval mode."""
        super().train(mode)
        if self.freeze_trunk:
            self.trunk.eval()
        return self

    # --- optimization -----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        config, monitor = scheduler_config(self.lr_scheduler_factory(optimizer))
        if monitor is not None:
            self._monitors[id(config["scheduler"])] = monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.unpack_batch(batch)
        out = self(x)
        loss = self.loss_fn(out, y)
        self.manual_backward(loss / self.accumulate_grad_batches)
        if self.global_step == 0 and batch_idx == 0:
            _warn_if_saturated(self.trunk.model, loss)
        if self._accumulator.record_backward(self.accumulate_grad_batches):
            self._optimizer_step()
        self._log("train", loss, out, y, x.shape[0])
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        if self._accumulator.flush():  # a partial accumulation group at the end of the epoch
            self._optimizer_step()
        self._step_schedulers("epoch", self.current_epoch + 1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after unscaling the gradients (mixed precision): clip here.
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._step_schedulers("step", self.trainer.global_step)

    def _step_schedulers(self, boundary: str, count: int) -> None:
        """Step the schedulers due at this boundary (``count``: optimizer steps or epochs done)."""
        for config in self.trainer.lr_scheduler_configs:
            if scheduler_is_due(config.interval, config.frequency, boundary, count):
                scheduler = config.scheduler
                monitor, strict = self._monitors.get(id(scheduler), (config.monitor, config.strict))
                step_scheduler(scheduler, monitor, strict, self.trainer.callback_metrics)

    # --- evaluation -------------------------------------------------------------------------

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate("test", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        if isinstance(batch, (torch.Tensor, ImageSource)):  # a tensor, or a lazy image
            x = batch
        elif isinstance(batch, (tuple, list)) and len(batch) == 1:  # TensorDataset of images
            x = batch[0]
        else:
            x = self.unpack_batch(batch)[0]
        return self(x)

    def _evaluate(self, stage: str, batch: Any) -> torch.Tensor:
        x, y = self.unpack_batch(batch)
        out = self(x)
        loss = self.loss_fn(out, y)
        self._log(stage, loss, out, y, x.shape[0])
        return loss

    def _log(self, stage: str, loss: torch.Tensor, out: Any, y: Any, batch_size: int) -> None:
        self.log(
            f"{stage}_loss",
            loss.detach(),
            prog_bar=True,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        metrics = getattr(self, f"{stage}_metrics")
        if metrics is not None:
            metrics.update(_detached(out), y)
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)


# --- manual-optimization helpers: plain values in, no Trainer needed (tests call them directly) --


def _as_backbone(
    trunk: Any, tile_size: TileSize | None, stream_options: dict[str, Any]
) -> StreamedBackbone:
    """The streamed trunk: ``trunk`` itself if already streamed, else ``streamify(trunk)``."""
    if isinstance(trunk, StreamedBackbone):
        # load_from_checkpoint passes the saved tile_size back: accept it when it agrees.
        if stream_options or tile_size not in (None, trunk.tile_size):
            raise OptionError(
                "StreamedModule: the trunk is already streamed (from tilefn.streamify), so "
                f"tile_size={tile_size!r} and stream options {sorted(stream_options)} "
                "cannot be applied here. Pass the plain trunk instead, or set them in "
                "streamify()."
            )
        return trunk
    if isinstance(trunk, nn.Module):
        if tile_size is None:
            raise OptionError(
                "StreamedModule: tile_size is required when the trunk is a plain module, "
                "e.g. StreamedModule(trunk, head, loss_fn, tile_size=2048)."
            )
        return streamify(trunk, tile_size, **stream_options).backbone
    raise OptionError(f"StreamedModule: trunk must be an nn.Module, got {type(trunk).__name__}.")


def _check_arguments(
    head: Any,
    loss_fn: Any,
    accumulate_grad_batches: Any,
    gradient_clip_val: Any,
    gradient_clip_algorithm: Any,
) -> None:
    """Refuse bad constructor arguments with an :class:`~tilefn.OptionError` naming them."""
    if not isinstance(head, nn.Module):
        raise OptionError(
            f"StreamedModule: head must be an nn.Module, got {type(head).__name__}. "
            "Wrap a function in a module, e.g. nn.Sequential(...) or a small nn.Module."
        )
    if not callable(loss_fn):
        raise OptionError(
            f"StreamedModule: loss_fn must be callable (output, target) -> loss, got "
            f"{type(loss_fn).__name__}."
        )
    if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
        raise OptionError(
            "StreamedModule: accumulate_grad_batches must be a positive int, got "
            f"{accumulate_grad_batches!r}."
        )
    if gradient_clip_algorithm not in ("norm", "value"):
        raise OptionError(
            "StreamedModule: gradient_clip_algorithm must be 'norm' or 'value', got "
            f"{gradient_clip_algorithm!r}."
        )
    if gradient_clip_val is not None and not gradient_clip_val > 0:
        raise OptionError(
            f"StreamedModule: gradient_clip_val must be positive or None, got "
            f"{gradient_clip_val!r}."
        )


def _detached(out: Any) -> Any:
    return out.detach() if isinstance(out, torch.Tensor) else out


def _stage_metrics(metrics: Any) -> dict[str, nn.Module]:
    """One metric collection per stage, with prefixes ``train_``, ``val_`` and ``test_``."""
    if metrics is None:
        return {}
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError as e:  # pragma: no cover
        raise ImportError("StreamedModule(metrics=...) needs torchmetrics.") from e
    if isinstance(metrics, Metric | Mapping) and not isinstance(metrics, MetricCollection):
        metrics = MetricCollection(metrics if isinstance(metrics, Mapping) else [metrics])
    if not isinstance(metrics, MetricCollection):
        raise OptionError(
            "StreamedModule: metrics must be a torchmetrics Metric, MetricCollection or dict of "
            f"Metrics, got {type(metrics).__name__}."
        )
    return {stage: metrics.clone(prefix=f"{stage}_") for stage in _STAGES}


def _warn_if_saturated(trunk: nn.Module, loss: torch.Tensor) -> None:
    """After the first backward: a trunk whose trainable parameters all got exactly zero
    gradient is saturated; from scratch that is usually BatchNorm's initial statistics."""
    params = [p for p in trunk.parameters() if p.requires_grad]
    if params and all(p.grad is None or not bool(p.grad.any()) for p in params):
        warnings.warn(
            f"StreamedModule: the first training step gave every trunk parameter a zero "
            f"gradient (loss {float(loss.detach()):.4g}): the trunk's outputs saturate the head. In a "
            "network trained from scratch this is usually BatchNorm: streamed BatchNorm "
            "normalises with running statistics, and the initial ones (mean 0, variance 1) "
            "let deep networks (ResNet-50) blow up. Set them from the data first: "
            "tilefn.calibrate_batchnorm(trunk, [a few images], tile_size=...).",
            stacklevel=3,
        )


class TrainingInterrupted(RuntimeError):
    """A ``Trainer`` entry point (``fit``, ``validate``, ...) ended without finishing: a
    SIGTERM (cluster preemption, a time limit) or another interruption. ``exit_code`` is what a
    script should exit with (143 for SIGTERM, 128 + 15, as a shell reports it)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def run(entry_point: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``trainer.fit`` (or ``validate``, ``test``, ``predict``) and fail loudly unless it
    finished.

    On SIGTERM, Lightning stops the loops and raises ``SystemExit`` with no status, so a
    script ends with exit status 0, no message and whatever it would have done after training
    left undone: a preempted job looks like a success. ``run`` turns that, and any other way
    the call ends unfinished (``trainer.interrupted``), into :class:`TrainingInterrupted`,
    which names the epoch and step reached. Early stopping is a normal finish.

    Example:
        >>> import tilefn.lightning
        >>> def main():
        ...     try:
        ...         tilefn.lightning.run(trainer.fit, module, train_loader)
        ...     except tilefn.lightning.TrainingInterrupted as err:
        ...         print(f"INTERRUPTED: {err}", file=sys.stderr)
        ...         return err.exit_code
        ...     return 0
    """
    trainer = getattr(entry_point, "__self__", None)
    if not isinstance(trainer, pl.Trainer):
        raise InputTypeError(
            "tilefn.lightning.run: pass a bound Trainer method, e.g. run(trainer.fit, module, "
            f"loader); got {entry_point!r}."
        )
    name = getattr(entry_point, "__name__", "the trainer")
    try:
        out = entry_point(*args, **kwargs)
    except SIGTERMException:
        raise TrainingInterrupted(
            f"trainer.{name} received SIGTERM at epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}, and stopped before finishing",
            exit_code=143,
        ) from None
    if trainer.interrupted or trainer.state.status != TrainerStatus.FINISHED:
        raise TrainingInterrupted(
            f"trainer.{name} ended with status {trainer.state.status.value!r} at epoch "
            f"{trainer.current_epoch}, global step {trainer.global_step}, before finishing"
        )
    return out
