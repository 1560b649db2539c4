"""A reproduction's state folders as an archive in parts, and its safe import into a checkout.

A lent device gives back at most 8 files of at most 16 MiB from its output folder, so
`pack` writes the folders as one tar.gz stream cut into parts (ARCHIVE.000, .001, ...) of at
most PART_BYTES, and the caller records them, with their sizes and sha256, in a manifest
(MANIFEST) beside them. `import_archive` checks the parts against the manifest, unpacks them into
a staging folder inside the checkout, refusing any member that is not a plain file or folder
inside one of the manifest's folders (no absolute paths, `..`, links or devices), and only then
replaces each folder at once. The folders an archive may hold are under runs/, results/ or
pretrained/ (`check_folder`), never the code.

Imports nothing heavy: `python -m polar_tf.reproduce --import_archive` calls it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Any, BinaryIO, Iterable

MANIFEST = "reproduce_state.json"
ARCHIVE = "reproduce_state.tar.gz"
PART_BYTES = 15 * 2**20  # the device gives back files of at most 16 MiB
ALLOWED_TOPS = ("runs", "results", "pretrained")


def check_folder(folder: str, what: str) -> str:
    """`folder` if it is a relative folder below runs/, results/ or pretrained/ (e.g.
    results/full_protocol), the only places an archive may unpack into; else ValueError."""
    parts = folder.split("/")
    if (os.path.isabs(folder) or os.path.normpath(folder) != folder or ".." in parts or len(parts) < 2
            or parts[0] not in ALLOWED_TOPS):
        raise ValueError(f"{what} must be a relative folder below {', '.join(t + '/' for t in ALLOWED_TOPS)} of the "
                         f"checkout, e.g. results/full_protocol. Received: {folder!r}")
    return folder


def pack(folders: Iterable[str], skip: set[str], out: str, part_bytes: int = PART_BYTES) -> list[dict[str, Any]]:
    """Writes `folders` (relative to the working directory, without the folders in `skip` and
    the temporary files a killed process leaves) as one tar.gz into `out`, in parts of at most
    `part_bytes`; returns [{"name", "bytes", "sha256"}] of the parts, for the manifest."""
    with _PartWriter(out, part_bytes) as parts:
        with tarfile.open(fileobj=parts, mode="w|gz") as tar:
            for folder in folders:
                for directory, subfolders, files in os.walk(folder):
                    subfolders[:] = sorted(d for d in subfolders if os.path.join(directory, d) not in skip)
                    tar.add(directory, recursive=False)
                    for name in sorted(files):
                        path = os.path.join(directory, name)
                        if not _temporary(name) and os.path.isfile(path) and not os.path.islink(path):
                            tar.add(path, recursive=False)
    return parts.parts


def _temporary(name: str) -> bool:
    """What a killed process leaves: run_dir's atomic writes (.name.XXXX.tmp), copies (name.tmp)."""
    return (name.startswith(".") and ".tmp" in name) or name.endswith(".tmp")


def write_manifest(out: str, folders: list[str], parts: list[dict[str, Any]], **contents: Any) -> str:
    """Writes MANIFEST into `out`: the folders, the parts and whatever else the caller records."""
    path = os.path.join(out, MANIFEST)
    with open(path, "w") as f:
        json.dump({**contents, "folders": folders, "parts": parts}, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def import_archive(source: str, root: str = ".") -> dict[str, Any]:
    """Unpacks the archive described by MANIFEST in the folder `source` into the checkout at `root`,
    replacing each folder the manifest names (one it names but the archive leaves empty ends
    empty: e.g. no training in progress).

    Raises:
      ValueError: the manifest is missing; a part is missing or differs from the manifest (size,
        sha256); a folder is not one an archive may hold (`check_folder`); a member is not a file or
        folder inside those folders. Nothing is imported then.

    Returns:
      The manifest.
    """
    manifest_path = source if source.endswith(".json") else os.path.join(source, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{manifest_path} does not exist: --import_archive takes the folder the device gave back "
                         f"({MANIFEST} and the {ARCHIVE} parts it names)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    folders = [check_folder(folder, f"{manifest_path}: each folder") for folder in manifest["folders"]]
    paths = []
    for part in manifest["parts"]:
        name = part["name"]
        if os.path.basename(name) != name or not name.startswith(ARCHIVE + "."):
            raise ValueError(f"{manifest_path}: {name!r} is not a part's name ({ARCHIVE}.NNN)")
        path = os.path.join(os.path.dirname(manifest_path), name)
        if not os.path.isfile(path) or os.path.getsize(path) != part["bytes"] or _sha256(path) != part["sha256"]:
            raise ValueError(f"{path} is missing or not the part {MANIFEST} names (size or sha256 differ); "
                             "nothing was imported")
        paths.append(path)
    staging = tempfile.mkdtemp(prefix=".import.", dir=root)
    try:
        with _PartReader(paths) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
            for member in tar:
                target = os.path.join(staging, _checked_member(member, folders, paths[0]))
                if member.isdir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(member) as data, open(target, "wb") as f:
                    shutil.copyfileobj(data, f)
        for folder in folders:  # each replaced at once: the old one moved aside, the new one moved in
            destination, staged, old = (os.path.join(root, folder), os.path.join(staging, folder),
                                        os.path.join(staging, ".old", folder))
            os.makedirs(staged, exist_ok=True)
            if os.path.exists(destination):
                os.makedirs(os.path.dirname(old), exist_ok=True)
                os.rename(destination, old)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.rename(staged, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _checked_member(member: tarfile.TarInfo, folders: list[str], archive: str) -> str:
    name = member.name.rstrip("/")
    inside = any(name == folder or name.startswith(folder + "/") for folder in folders)
    if (os.path.isabs(name) or ".." in name.split("/") or os.path.normpath(name) != name or not inside
            or not (member.isfile() or member.isdir())):
        raise ValueError(f"{archive}: member {member.name!r} is not a file or folder inside {', '.join(folders)}; "
                         "nothing was imported")
    return name


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class _PartWriter(io.RawIOBase):
    """A write-only stream into files <out>/ARCHIVE.NNN of at most `part_bytes` each (at least one);
    the parts of an earlier archive in `out` are removed first."""

    def __init__(self, out: str, part_bytes: int):
        super().__init__()
        self.out, self.part_bytes, self.parts = out, part_bytes, []
        self.file: BinaryIO | None = None
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.startswith(ARCHIVE + "."):
                os.remove(os.path.join(out, name))

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        written = 0
        while written < len(data):
            if self.file is None or self.parts[-1]["bytes"] == self.part_bytes:
                self._next()
            chunk = data[written: written + self.part_bytes - self.parts[-1]["bytes"]]
            self.file.write(chunk)
            self.hash.update(chunk)
            self.parts[-1]["bytes"] += len(chunk)
            written += len(chunk)
        return written

    def _next(self) -> None:
        self._finish()
        name = f"{ARCHIVE}.{len(self.parts):03d}"
        self.file, self.hash = open(os.path.join(self.out, name), "wb"), hashlib.sha256()
        self.parts.append({"name": name, "bytes": 0})

    def _finish(self) -> None:
        if self.file is not None:
            self.file.close()
            self.parts[-1]["sha256"] = self.hash.hexdigest()
            self.file = None

    def close(self) -> None:
        if not self.closed:
            if not self.parts:
                self._next()
            self._finish()
        super().close()


class _PartReader(io.RawIOBase):
    """The parts, read one after the other as one stream."""

    def __init__(self, paths: list[str]):
        super().__init__()
        self.paths, self.file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.file is None:
                if not self.paths:
                    return 0
                self.file = open(self.paths.pop(0), "rb")
            n = self.file.readinto(buffer)
            if n:
                return n
            self.file.close()
            self.file = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()
