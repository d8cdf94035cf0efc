"""A storage that forwards every call to another one, for wrappers that add behaviour
(retries in retry.py, fault injection in shardckpt.testing.faulty_storage).

Subclasses override ``_call(op, path, *args)``, the one place every request passes through;
capabilities are those of the wrapped storage.
"""

from __future__ import annotations

from .base import Storage


class StorageWrapper(Storage):
    """Forwards to ``inner``; override ``_call`` to act on each request."""

    def __init__(self, inner: Storage):
        self.inner = inner

    @property
    def atomic_rename(self) -> bool:
        return self.inner.atomic_rename

    @property
    def multipart_min_bytes(self) -> int:
        return self.inner.multipart_min_bytes

    def _call(self, op: str, path: str, *args, **kwargs):
        return getattr(self.inner, op)(path, *args, **kwargs)

    def url(self, path: str) -> str:
        return self.inner.url(path)

    def local_path(self, path: str) -> str | None:
        return self.inner.local_path(path)

    def exists(self, path):
        return self._call("exists", path)

    def size(self, path):
        return self._call("size", path)

    def modified(self, path):
        return self._call("modified", path)

    def read(self, path, offset=0, length=None):
        return self._call("read", path, offset, length)

    def write(self, path, data, durable=True, exclusive=True):
        return self._call("write", path, data, durable, exclusive)

    def makedirs(self, path):
        return self._call("makedirs", path)

    def list(self, path=""):
        return self._call("list", path)

    def delete(self, path):
        return self._call("delete", path)

    def rename(self, src, dst, exchange=False):
        return self._call("rename", src, dst, exchange)

    def sync_dir(self, path):
        return self._call("sync_dir", path)

    def begin_upload(self, path):
        return self._call("begin_upload", path)

    def upload_part(self, path, upload_id, number, data):
        return self._call("upload_part", path, upload_id, number, data)

    def complete_upload(self, path, upload_id, tags):
        return self._call("complete_upload", path, upload_id, tags)

    def abort_upload(self, path, upload_id):
        return self._call("abort_upload", path, upload_id)
