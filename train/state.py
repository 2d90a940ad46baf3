"""The loop's own checkpoint parts: its position and counters, and the sampler's position."""

from dataclasses import dataclass

from train.data.dataset import BadSampleTracker


@dataclass
class TrainerState:
    """The loop's position and counters: a checkpoint part (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    nonfinite_in_row: int = 0
    tracker: BadSampleTracker | None = None
    # Not saved: this run's checkpointing. A scheduled save is put off while the last step was
    # non-finite and made after the next finite one; last_saved is the step saved last.
    save_due: bool = False
    last_saved: int = -1
    stop_signal: str | None = None  # the signal the ranks agreed to stop on (Trainer.reduce_step)

    def state_dict(self) -> dict:
        t = self.tracker
        return {
            "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
            "nonfinite_in_row": self.nonfinite_in_row, "served": t.served, "skips": t.skips,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        # A resume is the advised way out of a non-finite streak (often with a lower learning_rate): it
        # gets max_nonfinite_steps afresh, not the rest of the streak that stopped the run.
        self.nonfinite_in_row = 0
        self.tracker.served, self.tracker.skips = state["served"], state["skips"]


class SamplerState:
    """The sampler's position as a checkpoint part: the steps of the epoch the loop finished (the
    loader's workers run ahead)."""

    def __init__(self, sampler, state: TrainerState):
        self.sampler, self.state = sampler, state

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self.state.epoch_step)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def count_steps(sampler, max_train_steps: int, num_train_epochs: int) -> int:
    """Optimizer steps of the run: max_train_steps, or every step of num_train_epochs epochs (epochs
    differ by the remainders carried between them, so each is counted)."""
    if max_train_steps > 0:
        return max_train_steps
    epoch = sampler.epoch
    total = 0
    for e in range(num_train_epochs):
        sampler.set_epoch(e)
        total += sampler.batches_per_epoch()
    sampler.set_epoch(epoch)
    return total
