"""Files on local disk (a volume shared by the API and the workers in production).

Every path is derived from server-generated ids, never from user input: a storage key is
`datasets/<tenant>/<dataset>/data.upload` (an upload as received, whatever its format: its contents say
which), `jobs/<job>` (a job's working folder: its checkpoint) or `jobs/<job>/artifacts/<file name>` (what
it published), resolved under the root."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

CHUNK = 1024 * 1024
PARTIAL_SUFFIX = ".partial"
# An upload in progress holds a lease: a file named by its dataset id whose mtime the API refreshes while the
# upload is received, validated and recorded. A lease not refreshed for UPLOAD_LEASE_EXPIRY seconds belongs to
# a process that stopped.
UPLOADS_IN_PROGRESS = "uploads-in-progress"
UPLOAD_LEASE_REFRESH = 10.0
UPLOAD_LEASE_EXPIRY = 120.0


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"upload exceeds the limit of {limit} bytes")


class UploadStalled(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"no data for {seconds:.0f} s")


class Storage:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    @staticmethod
    def dataset_key(tenant_id: str, dataset_id: str, fmt: str) -> str:
        return f"datasets/{tenant_id}/{dataset_id}/data.{fmt}"

    @staticmethod
    def job_key(job_id: str, *names: str) -> str:
        """The key of a job's working folder, or of a file in it by its folder and file names (never from a local path)."""
        return "/".join(("jobs", job_id, *names))

    def job_dir(self, job_id: str) -> Path:
        return self.path(self.job_key(job_id))

    async def receive(self, key: str, chunks: AsyncIterator[bytes], max_bytes: int, idle_timeout: float) -> tuple[int, str]:
        """Stream chunks into the file at `key` (atomically), stopping at `max_bytes` (UploadTooLarge) or
        after `idle_timeout` seconds without data (UploadStalled); returns (size, sha256)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        digest, size = hashlib.sha256(), 0
        incoming = aiter(chunks)
        try:
            with open(partial, "wb") as f:
                while True:
                    try:
                        chunk = await asyncio.wait_for(anext(incoming), idle_timeout)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise UploadStalled(idle_timeout) from None
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(max_bytes)
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    @contextlib.asynccontextmanager
    async def upload_in_progress(self, dataset_id: str, refresh: float = UPLOAD_LEASE_REFRESH) -> AsyncIterator[None]:
        """While the body holds, the upload of `dataset_id` is in progress: the sweep in any process (another
        API process, `peeraid-service sweep`) leaves its files alone, however slowly its bytes arrive."""
        lease = self.root / UPLOADS_IN_PROGRESS / dataset_id
        lease.parent.mkdir(parents=True, exist_ok=True)
        lease.touch()

        async def keep() -> None:
            while True:
                await asyncio.sleep(refresh)
                lease.touch()

        keeper = asyncio.create_task(keep(), name=f"lease {dataset_id}")
        try:
            yield
        finally:
            keeper.cancel()
            lease.unlink(missing_ok=True)

    def upload_leases(self) -> dict[str, float]:
        """Dataset id → seconds since its lease was refreshed, for every upload lease on disk."""
        now, leases = time.time(), {}
        for lease in (self.root / UPLOADS_IN_PROGRESS).glob("*"):
            with contextlib.suppress(FileNotFoundError):  # released meanwhile
                leases[lease.name] = now - lease.stat().st_mtime
        return leases

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        for parent in path.parents:  # tidy empty per-dataset folders
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["Storage", "UploadStalled", "UploadTooLarge", "sha256_file"]
