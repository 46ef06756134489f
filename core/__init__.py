"""The lowest layer, shared by the converters, the loaders, the trainer and the benchmarks:

- `core.errors`: the typed errors the library raises and the commands turn into one-line messages;
- `core.dataset`: the scan of an ImageNet-layout folder, the class map, a split as a file list;
- `core.shards`: the record shards' DALI index files, read as a table of samples;
- `core.memory`: peak memory of a process tree (converters and benchmarks report it).

It imports numpy and the standard library only (psutil in `core.memory`), so everything above can use it.
"""
