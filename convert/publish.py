"""Publishing a converter's outputs: every file is written as OUT/.<name>.partial, then renamed
in place, so a failed or killed run leaves nothing at the final paths."""
import json
import os
from pathlib import Path

from core.dataset import Dataset
from core.errors import DatasetError
from core.manifest import MANIFEST, describe, manifest_text


def partial_path(final: Path) -> Path:
    """Hidden and suffixed, so no loader's glob (*.beton, train-*.tar) ever picks up a half-written file."""
    return final.with_name(f".{final.name}.partial")


def prepare_out(out, default: Path) -> Path:
    """Create the output folder, check it is writable, and remove partials left by a killed run."""
    path = Path(out) if out else default
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}.partial"
        probe.touch()
        probe.unlink()
    except OSError as e:
        hint = "pass --out DIR to write elsewhere" if not out else "pass a writable folder to --out"
        raise DatasetError(f"cannot write to {path} ({e.strerror or e}): {hint}") from None
    for stale in path.glob(".*.partial"):
        stale.unlink()
    return path


def write_partial(final: Path, text: str) -> Path:
    tmp = partial_path(final)
    tmp.write_text(text)
    return tmp


def publish(final_paths, out: Path, dataset: Dataset, bad: dict):
    """Rename every partial to its final name, with classes.json and skipped.txt (or remove a stale one).

    Called only when everything is written, so a failed or killed run publishes nothing. Each
    rename is atomic; data is flushed to disk first so a crash cannot publish a hollow file.
    """
    final_paths = list(final_paths) + [out / "classes.json"]
    write_partial(out / "classes.json", json.dumps(dataset.classes) + "\n")
    skipped = [f"{rel}\t{why}" for split_bad in bad.values() for rel, why in split_bad]
    if skipped:
        final_paths.append(out / "skipped.txt")
        write_partial(out / "skipped.txt", "\n".join(skipped) + "\n")
    for final in final_paths:
        fd = os.open(partial_path(final), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial_path(final), final)
    if not skipped:
        (out / "skipped.txt").unlink(missing_ok=True)  # left by an earlier --skip-bad run


def publish_with_manifest(final_paths, out: Path, dataset: Dataset, bad: dict, keep):
    """publish(), with OUT/manifest.json describing the files written now (their partials) over the
    old manifest's entries that `keep(name)` keeps."""
    final_paths = list(final_paths)
    described = {p.name: describe(partial_path(p)) for p in final_paths}
    write_partial(out / MANIFEST, manifest_text(out, described, keep))
    publish(final_paths + [out / MANIFEST], out, dataset, bad)


def bad_files_error(bad: dict) -> DatasetError:
    lines = [f"  {rel}: {why}" for split_bad in bad.values() for rel, why in split_bad]
    return DatasetError(f"{len(lines)} image files cannot be decoded; nothing was written. Fix or delete "
                        f"them, or pass --skip-bad to leave them out (then listed in OUT/skipped.txt):\n"
                        + "\n".join(lines))
