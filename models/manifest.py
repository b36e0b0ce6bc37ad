"""Manifests: the size and sha256 of every file of a checkpoint or an export, written last.

Whatever training writes for later reading (a checkpoint ``checkpoints/step_N/``, an export under
``final/``, a converted model) ends with ``manifest.json``::

    {"format": "vlrecipe-manifest/1",
     "files": {"model.safetensors": {"size": 123456, "sha256": "9f86d0..."}, ...}}

It is written after every other file, and atomically (a temporary file renamed over the name), so a
directory with a manifest is one whose writer finished; its digests say that the files are still the bytes
written. ``verify_manifest`` compares sizes first (a truncated copy fails without reading anything), then
digests (one flipped byte fails), and raises ``CorruptCheckpointError`` naming the first file that differs.

The manifest guards against accidents (a killed copy, a full disk, bit rot, a file swapped by mistake), not
against someone who can write the directory: they can write a matching manifest as well.

Cost: each file is streamed in 256 KiB chunks through sha256 (``hashlib.file_digest``, which releases the
GIL), several files at once on a thread pool. Right after a checkpoint is written its bytes are still in the
page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from models.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vlrecipe-manifest/1"
_HASH_THREADS = min(8, os.cpu_count() or 1)


class CorruptCheckpointError(UserError):
    """A checkpoint or export whose files are not those its manifest lists; the message names the file."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def write_manifest(directory: str | Path) -> Path:
    """Hash every file under ``directory`` and write its manifest, atomically; call it after the last file
    is written. Returns the manifest's path."""
    directory = Path(directory)
    names = _files_under(directory)
    digests = _sha256_all(directory, names)
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": digest}
        for name, digest in zip(names, digests, strict=True)
    }
    target = directory / MANIFEST
    tmp = directory / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def verify_manifest(directory: str | Path, unlisted_ok: bool = False) -> None:
    """Check the files of ``directory`` against its manifest; raise ``CorruptCheckpointError`` naming the
    first file that is missing, has another size or another sha256. A file the manifest does not list is an
    error too unless ``unlisted_ok`` (an export may gain files later, such as eval's metrics.json; a training
    checkpoint may not: everything in it is read on resume)."""
    directory = Path(directory)
    listed = read_manifest(directory)
    present = set(_files_under(directory))
    for name in sorted(listed):
        if name not in present:
            raise CorruptCheckpointError(
                f"{directory / name}: missing, though {directory / MANIFEST} lists it (an incomplete copy?)"
            )
    if not unlisted_ok and present - set(listed):
        extra = sorted(present - set(listed))[0]
        raise CorruptCheckpointError(
            f"{directory / extra}: not in {directory / MANIFEST}, so not written "
            "with this checkpoint; it is not read: move it out of the directory"
        )
    for name, entry in sorted(listed.items()):
        size = (directory / name).stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpointError(
                f"{directory / name}: {size} bytes, but {entry['size']} when "
                "written (truncated or incomplete: the write or a copy did not "
                "finish)"
            )
    names = sorted(listed)
    for name, digest in zip(names, _sha256_all(directory, names), strict=True):
        if digest != listed[name]["sha256"]:
            raise CorruptCheckpointError(
                f"{directory / name}: corrupt: its sha256 differs from the one in "
                f"{directory / MANIFEST} (the bytes changed after they were "
                "written; if you edited the file on purpose, delete the manifest)"
            )


def read_manifest(directory: str | Path) -> dict[str, dict]:
    """The manifest's ``files`` entry: relative path -> {"size", "sha256"}."""
    path = Path(directory) / MANIFEST
    try:
        content = json.loads(path.read_text())
        files = content["files"]
        if content.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
        for entry in files.values():
            if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
                raise ValueError("an entry without an integer size and a sha256")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing (the checkpoint was not completely written)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable manifest ({type(e).__name__}: {e})") from e
    return files


def _files_under(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative, '/'-separated, sorted), except the manifest itself."""
    skip = {MANIFEST, f"{MANIFEST}.tmp"}
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() not in skip
    )


def _sha256_all(directory: Path, names: Iterable[str]) -> list[str]:
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return list(pool.map(lambda name: file_sha256(directory / name), names))
