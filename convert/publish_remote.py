"""Publish a converted dataset to object storage, for `train.py --data URL`.

    python convert/publish_remote.py DATA s3://bucket/prefix      (also gs://, az://; not https://)

Uploads DATA/shards/ and DATA/ffcv/ (whichever exist) to URL/shards/ and URL/ffcv/: every file
their manifest.json lists, classes.json, and the manifest itself last, so a reader that finds the
manifest finds everything it lists. Each file is checked against the manifest before it goes up
(a damaged file is named and nothing more is sent). Credentials and endpoints are the store's own
(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL for MinIO/Ceph, ...). An https:// dataset is any web server
that serves the same tree and answers Range requests (e.g. `aws s3 sync DATA/shards ...` or a
copy of the folders under the server's root).
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.dataset import CONVERTED_DIRS
from core.errors import DatasetError, run_command
from core.manifest import MANIFEST, chunk_problems, read_manifest


def publish_remote(data, url: str, threads: int = 8) -> list[str]:
    """Upload DATA's converted folders under URL; return the names uploaded (manifests last)."""
    from storage.remote import open_store, put_file  # obstore: only in the command that uses it
    data, url = Path(data), url.rstrip("/")
    folders = [sub for sub in CONVERTED_DIRS if (data / sub / MANIFEST).exists()]
    if not folders:
        raise DatasetError(f"no {'/'.join(('shards', MANIFEST))} or ffcv/{MANIFEST} under {data}: convert it first "
                           f"(`python convert/to_shards.py {data}` or `python convert/to_ffcv.py {data}`)")
    if url.startswith(("http://", "https://")):
        raise DatasetError(f"{url}: a web server is published with its own tools (copy DATA/shards and DATA/ffcv "
                           f"under its root); this command writes to s3://, gs:// or az://")
    store = open_store(url)
    jobs = []
    for sub in folders:
        files = read_manifest(data / sub)
        problems = [p for name, d in files.items() for p in chunk_problems(data / sub / name, d)]
        if problems:
            raise DatasetError(f"{problems[0]}: nothing published; run `python convert/verify.py {data}` and "
                               f"re-convert")
        jobs += [(f"{sub}/{name}", data / sub / name) for name in files]
        if (data / sub / "classes.json").exists():
            jobs.append((f"{sub}/classes.json", data / sub / "classes.json"))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: put_file(store, *job), jobs))
    for sub in folders:  # last: the manifest's presence says the folder is complete
        put_file(store, f"{sub}/{MANIFEST}", data / sub / MANIFEST)
    return [name for name, _ in jobs] + [f"{sub}/{MANIFEST}" for sub in folders]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="the dataset root that holds shards/ and/or ffcv/")
    p.add_argument("url", help="s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://ACCOUNT/CONTAINER/PREFIX")
    p.add_argument("--threads", type=int, default=8, help="files uploaded at once")
    a = p.parse_args(argv)
    names = publish_remote(a.data, a.url, a.threads)
    print(f"published {len(names)} files to {a.url.rstrip('/')}: train with `python train.py --data {a.url} "
          f"--cache-dir DIR --cache-size SIZE`")


if __name__ == "__main__":
    run_command(main)
