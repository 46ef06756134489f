"""TensorBoard scalars for a run (--tensorboard), under OUTPUT_DIR/tensorboard:

    tensorboard --logdir OUTPUT_DIR/tensorboard

Per log window, at the global step: window/loss, window/lr, window/imgs_per_s, window/data_wait_pct.
Per epoch, at the epoch number: epoch/train_loss, epoch/acc1, epoch/acc5, epoch/val_loss, epoch/lr,
epoch/imgs_per_s, epoch/data_wait_pct (and epoch/ema_acc1 with --model-ema): the epoch's line of
metrics.jsonl. Values come from the log points, which already read them back to the host, so the
hot loop is untouched. The tensorboard package loads only when a writer is made.
"""
from pathlib import Path

from core.errors import ConfigError

SUBDIR = "tensorboard"
EPOCH_KEYS = ("train_loss", "acc1", "acc5", "val_loss", "lr", "imgs_per_s", "ema_acc1")


class ScalarWriter:
    def __init__(self, output_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard: the tensorboard package is not installed: "
                              "pip install tensorboard==2.21.0 (in requirements.txt)") from None
        self.log_dir = Path(output_dir) / SUBDIR
        self.writer = SummaryWriter(str(self.log_dir))

    def window(self, global_step: int, scalars: dict):
        """One log window: loss, lr, imgs_per_s, data_wait_frac (written as a percentage)."""
        for key, value in scalars.items():
            if key == "data_wait_frac":
                key, value = "data_wait_pct", 100 * value
            self.writer.add_scalar(f"window/{key}", value, global_step)
        self.writer.flush()  # a killed run keeps what was logged

    def epoch(self, record: dict):
        """One epoch's record (a metrics.jsonl line)."""
        step = record["epoch"]
        for key in EPOCH_KEYS:
            if key in record:
                self.writer.add_scalar(f"epoch/{key}", record[key], step)
        self.writer.add_scalar("epoch/data_wait_pct", 100 * record["data_wait_frac"], step)
        self.writer.flush()

    def close(self):
        self.writer.close()
