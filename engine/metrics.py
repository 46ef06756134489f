"""Accuracy, the per-epoch log (metrics.jsonl), the run summary and its plot."""
import json
import os
import platform
from pathlib import Path

import torch


def correct_topk(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (stays on the device)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks])


def per_class_report(confusion: list[list[int]], classes: list[str], top_pairs: int = 10) -> dict:
    """Per-class top-1 accuracy and the most confused (true, predicted) pairs, most images first,
    from a confusion matrix (row: true class, column: top-1 prediction)."""
    per_class = [{"class": name, "images": sum(row), "acc1": 100.0 * row[c] / sum(row) if sum(row) else None}
                 for c, (name, row) in enumerate(zip(classes, confusion))]
    pairs = sorted((-row[p], t, p) for t, row in enumerate(confusion) for p in range(len(row)) if p != t and row[p])
    confused = [{"true": classes[t], "predicted": classes[p], "images": -neg,
                 "share_pct": 100.0 * -neg / sum(confusion[t])} for neg, t, p in pairs[:top_pairs]]
    return {"per_class": per_class, "confused_pairs": confused}


def write_json_atomic(obj, path: Path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def append_jsonl(record: dict, path: Path):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def keep_jsonl(path: Path, keep):
    """Rewrite a JSON-lines log (atomically) with only the records `keep(record)` keeps."""
    path = Path(path)
    if path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))
        os.replace(tmp, path)


def hardware(device: torch.device) -> dict:
    info = {"device": str(device), "host_cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__}
    if device.type == "cuda":
        info["accelerator"] = torch.cuda.get_device_name(device)
    elif device.type == "npu":
        info["accelerator"] = torch.npu.get_device_name(device)
    else:
        info["accelerator"] = platform.processor() or "cpu"
    return info


def plot_history(records: list[dict], path: Path):
    """Loss, accuracy, and img/s with data-wait per epoch, next to metrics.jsonl."""
    if not records:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc, ax_speed) = plt.subplots(1, 3, figsize=(15, 4))
    ax_speed.plot(epochs, [r["imgs_per_s"] for r in records], marker="o", color="tab:blue")
    ax_speed.set(xlabel="epoch", ylabel="img/s", title="throughput and data-wait")
    ax_wait = ax_speed.twinx()
    ax_wait.plot(epochs, [100 * r["data_wait_frac"] for r in records], marker="s", color="tab:red")
    ax_wait.set_ylabel("data-wait %", color="tab:red")
    ax_wait.set_ylim(bottom=0)
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_acc.plot(epochs, [r["acc1"] for r in records], marker="o", label="Acc@1")
    ax_acc.plot(epochs, [r["acc5"] for r in records], marker="o", label="Acc@5")
    if any("ema_acc1" in r for r in records):
        ax_acc.plot(epochs, [r.get("ema_acc1") for r in records], marker="x", label="EMA Acc@1")
    ax_acc.set(xlabel="epoch", ylabel="%", title="val accuracy")
    ax_acc.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
