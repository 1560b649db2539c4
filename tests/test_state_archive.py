"""The state archive: parts that fit what a device gives back, and an import that writes nothing
outside the folders it names."""

import io
import json
import os
import tarfile

import pytest

from polar_tf import state_archive

FOLDERS = ["runs/full_protocol", "pretrained/full_protocol", "results/full_protocol"]


def _tree(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def _write(root, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def test_pack_in_parts_and_import_replace_the_folders(tmp_path, monkeypatch):
    device, local, out = tmp_path / "device", tmp_path / "local", tmp_path / "out"
    kept = {"runs/full_protocol/mnist_polarized/checkpoints/epoch_0007.keras": os.urandom(5000),
            "pretrained/full_protocol/mnist_baseline.keras": os.urandom(3000),
            "results/full_protocol/mnist_table/results.json": b'{"models": []}'}
    left_out = {"runs/full_protocol/mnist_baseline/model.keras": b"finished: its copy is in pretrained/",
                "runs/full_protocol/mnist_polarized/checkpoints/.epoch_0008.keras.abc.tmp.keras": b"a killed write",
                "pretrained/full_protocol/mnist_polarized.keras.tmp": b"a killed copy"}
    _write(device, {**kept, **left_out})
    monkeypatch.chdir(device)
    parts = state_archive.pack(FOLDERS, {"runs/full_protocol/mnist_baseline"}, str(out), part_bytes=4096)
    assert len(parts) >= 2 and all(p["bytes"] <= 4096 for p in parts[:-1])  # random bytes do not compress
    assert sorted(os.listdir(out)) == [p["name"] for p in parts]
    state_archive.write_manifest(str(out), FOLDERS, parts, device="test")
    # The local checkout has an older state (replaced) and other folders (untouched).
    _write(local, {"runs/full_protocol/mnist_baseline/checkpoints/epoch_0003.keras": b"old",
                   "results/reproduction/mnist_table/results.json": b"reduced protocol",
                   "polar_tf/reproduce.py": b"code"})
    manifest = state_archive.import_archive(str(out), str(local))
    assert manifest["device"] == "test"
    assert _tree(local) == {**kept, "results/reproduction/mnist_table/results.json": b"reduced protocol",
                            "polar_tf/reproduce.py": b"code"}
    assert not [name for name in os.listdir(local) if name.startswith(".import")]


def test_import_refuses_a_changed_part_and_writes_nothing(tmp_path, monkeypatch):
    _write(tmp_path / "device", {"results/full_protocol/a.json": b"{}"})
    monkeypatch.chdir(tmp_path / "device")
    out = tmp_path / "out"
    parts = state_archive.pack(FOLDERS, set(), str(out))
    state_archive.write_manifest(str(out), FOLDERS, parts)
    with open(out / parts[0]["name"], "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    local = tmp_path / "local"
    local.mkdir()
    with pytest.raises(ValueError, match="size or sha256 differ"):
        state_archive.import_archive(str(out), str(local))
    assert os.listdir(local) == []
    with pytest.raises(ValueError, match="does not exist: --import_archive takes the folder"):
        state_archive.import_archive(str(tmp_path / "nowhere"), str(local))


def _archive_with(out, folders, add) -> None:
    """An archive (one part) whose tar stream `add(tar)` writes, and its manifest."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add(tar)
    os.makedirs(out, exist_ok=True)
    name = state_archive.ARCHIVE + ".000"
    with open(os.path.join(out, name), "wb") as f:
        f.write(buffer.getvalue())
    part = {"name": name, "bytes": len(buffer.getvalue()), "sha256": state_archive._sha256(os.path.join(out, name))}
    state_archive.write_manifest(str(out), folders, [part])


def _file(tar, name: str, content: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


@pytest.mark.parametrize("member", ["results/full_protocol/../../polar_tf/evil.py", "/tmp/evil.py",
                                    "polar_tf/evil.py", "results/full_protocol_x/a", "results/./full_protocol/a"])
def test_import_refuses_members_outside_its_folders(tmp_path, member):
    out, local = tmp_path / "out", tmp_path / "local"
    local.mkdir()

    def add(tar):
        _file(tar, "results/full_protocol/good.json")
        _file(tar, member)

    _archive_with(out, FOLDERS, add)
    with pytest.raises(ValueError, match="is not a file or folder inside"):
        state_archive.import_archive(str(out), str(local))
    assert _tree(local) == {} and not os.path.exists(tmp_path / "polar_tf")


def test_import_refuses_links_and_folders_that_are_not_state(tmp_path):
    out, local = tmp_path / "out", tmp_path / "local"
    local.mkdir()

    def add_link(tar):
        info = tarfile.TarInfo("results/full_protocol/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../polar_tf/reproduce.py"
        tar.addfile(info)

    _archive_with(out, FOLDERS, add_link)
    with pytest.raises(ValueError, match="is not a file or folder inside"):
        state_archive.import_archive(str(out), str(local))
    for folder in ("polar_tf", "results", "results/../polar_tf", "/tmp/results/x", "tests/data"):
        _archive_with(out, [folder], lambda tar: None)
        with pytest.raises(ValueError, match="must be a relative folder below runs/, results/, pretrained/"):
            state_archive.import_archive(str(out), str(local))
    assert _tree(local) == {}
    manifest = json.loads((out / state_archive.MANIFEST).read_text())
    manifest["parts"][0]["name"] = "../" + manifest["parts"][0]["name"]
    manifest["folders"] = FOLDERS
    (out / state_archive.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not a part's name"):
        state_archive.import_archive(str(out), str(local))
