"""What a training run leaves behind besides its checkpoints, in one place: one metrics.jsonl line
per evaluated epoch, history.png, TensorBoard (--tensorboard), the note when accuracy sits at
chance, and summary.json at the end. Rank 0 writes; on the other ranks every call does nothing."""
from pathlib import Path

from engine.metrics import append_jsonl, plot_history, read_jsonl, write_json_atomic
from engine.tensorboard import ScalarWriter


class EpochRecords:
    def __init__(self, out_dir: Path, is_main: bool, tensorboard: bool, log, num_classes: int, bn_momentum: float,
                 total_steps: int):
        self.out_dir, self.is_main, self.log = Path(out_dir), is_main, log
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.tensorboard = ScalarWriter(out_dir) if tensorboard and is_main else None
        self.window = self.tensorboard.window if self.tensorboard else None  # engine/loop.EpochPlan.on_window
        self.chance = (num_classes, bn_momentum, total_steps)
        self.warned = False

    def epoch(self, record: dict):
        """An evaluated epoch: its metrics line, the plot of every line so far, TensorBoard, and the
        chance note once."""
        if not self.is_main:
            return
        append_jsonl(record, self.metrics_path)
        history = read_jsonl(self.metrics_path)
        plot_history(history, self.out_dir / "history.png")
        note = None if self.warned else chance_note(history, *self.chance)
        if note:
            self.log(note)
            self.warned = True
        if self.tensorboard:
            self.tensorboard.epoch(record)

    def summary(self, summary: dict):
        if self.is_main:
            write_json_atomic(summary, self.out_dir / "summary.json")

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()


def chance_note(history: list[dict], num_classes: int, bn_momentum: float, total_steps: int) -> str | None:
    """One line when the last epoch evaluates near chance although the train loss fell clearly
    since the first: the mark of running statistics that lag the weights."""
    chance = 100.0 / num_classes
    if len(history) < 2 or history[-1]["acc1"] > 1.5 * chance:
        return None
    first_loss, loss = history[0]["train_loss"], history[-1]["train_loss"]
    if not loss <= 0.8 * first_loss:
        return None
    return (f"train.py: val accuracy {history[-1]['acc1']:.1f}% is near chance ({chance:.1f}% for {num_classes} "
            f"classes) although the train loss fell from {first_loss:.3f} to {loss:.3f}: likely cause: BatchNorm "
            f"running statistics not settled (momentum {bn_momentum:g} for this run's {total_steps} steps): raise "
            f"--bn-momentum (e.g. 0.1)")
