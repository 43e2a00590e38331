"""Learning-rate schedules as functions of the optimizer's step, so a resumed run continues exactly."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="training")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-constant: values[i] while step < boundaries[i]; values[-1] after the last boundary."""

    def __init__(self, boundaries: list[int], values: list[float]):
        if len(values) != len(boundaries) + 1:
            raise ValueError("StepDecay needs one more value than boundaries")
        self.boundaries = [int(b) for b in boundaries]
        self.values = [float(v) for v in values]

    def __call__(self, step):
        step = ops.cast(step, "float32")
        lr = ops.convert_to_tensor(self.values[0], "float32")
        for boundary, value in zip(self.boundaries, self.values[1:]):
            lr = ops.where(step >= boundary, value, lr)
        return lr

    def get_config(self) -> dict:
        return {"boundaries": self.boundaries, "values": self.values}


@keras.saving.register_keras_serializable(package="training")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from peak/10 to peak over `warmup_steps`, then linear decay to zero at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        self.peak, self.warmup_steps, self.total_steps = float(peak), int(warmup_steps), int(total_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.peak * (0.1 + 0.9 * step / max(self.warmup_steps, 1))
        decay = self.peak * ops.maximum(0.0, (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1))
        return ops.where(step < self.warmup_steps, warm, decay)

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def make_schedule(
    name: str, lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The schedule named by the recipe, scaled to the base learning rate `lr`."""
    if name == "constant":
        return lr
    if name == "course":
        # The course: x0.1 after epoch 80, x0.01 after 120, x1e-3 after 140, x0.5e-3 after 160.
        epochs_at = [80, 120, 140, 160]
        return StepDecay([e * steps_per_epoch for e in epochs_at], [lr * f for f in (1, 1e-1, 1e-2, 1e-3, 0.5e-3)])
    if name == "paper":
        # He et al.: divide by 10 at 32k and 48k iterations (training stops at 64k).
        return StepDecay([32_000, 48_000], [lr, lr / 10, lr / 100])
    if name == "onecycle":
        return OneCycle(lr, round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch)
    raise ValueError(f"unknown schedule {name!r}: use course, paper, onecycle or constant")
