"""Training from object storage: `--data s3://bucket/prefix` (gs://, az://, https:// too).

- `storage.cache`: a rank's side: `attach(url, cache_dir, bound)` gives the local folder that
  mirrors the dataset in the node's cache; `node_cache(folder)` the handle the loaders read through.
- `storage.fetcher`: the node's one downloader (a fresh interpreter: obstore is not fork-safe).
- `storage.layout`: the cache folder's files, the only thing the two share.
- `storage.remote`: the obstore client (fetcher and publishing only).

Converted datasets are published with `python convert/publish_remote.py DATA URL`.
"""
