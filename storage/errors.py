"""The storage layer's typed error: a DatasetError, so every command prints its one line."""
from core.errors import DatasetError


class StorageError(DatasetError):
    """A remote dataset that cannot be reached, fetched or checked, or a cache setting that cannot work."""
