"""S3 (and S3-compatible stores) through s3fs: the fsspec backend plus concurrent multipart.

A large data file is uploaded as numbered parts, several at once (shardckpt.save.upload drives
them), then assembled by ``complete_multipart_upload``. The manifest's create-if-absent is
S3's conditional put (``IfNoneMatch="*"``), which s3fs issues for ``mode="create"``.
Unfinished uploads of a crashed save are invisible but billed: a bucket lifecycle rule
``AbortIncompleteMultipartUpload`` removes them.
"""

from __future__ import annotations

from .fsspec_store import FsspecStorage


class S3Storage(FsspecStorage):
    """A key prefix in an S3 bucket, on an ``s3fs.S3FileSystem``."""

    multipart_min_bytes = 5 << 20  # S3's minimum for every part but the last

    def _key(self, path: str) -> dict:
        bucket, key, _ = self.fs.split_path(self._p(path))
        return {"Bucket": bucket, "Key": key}

    def begin_upload(self, path: str) -> str:
        return self.fs.call_s3("create_multipart_upload", **self._key(path))["UploadId"]

    def upload_part(self, path: str, upload_id: str, number: int, data) -> str:
        out = self.fs.call_s3("upload_part", UploadId=upload_id, PartNumber=number,
                              Body=data, **self._key(path))
        return out["ETag"]

    def complete_upload(self, path: str, upload_id: str, tags: list[str]) -> None:
        parts = [{"PartNumber": i, "ETag": tag} for i, tag in enumerate(tags, 1)]
        self.fs.call_s3("complete_multipart_upload", UploadId=upload_id,
                        MultipartUpload={"Parts": parts}, **self._key(path))
        self.fs.invalidate_cache(self._p(path))

    def abort_upload(self, path: str, upload_id: str) -> None:
        self.fs.call_s3("abort_multipart_upload", UploadId=upload_id, **self._key(path))
