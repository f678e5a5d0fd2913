"""OPA bundle reader: safe extraction rules, data mounting, manifest."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from agent.wasm.bundle import BundleError, is_bundle, read_bundle, read_members

WASM = b"\0asm\x01\0\0\0"


def make(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
                continue
            name, data = entry
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_real_opa_layout_leading_slash_and_manifest() -> None:
    manifest = {"revision": "abc", "roots": [""], "wasm": [{"entrypoint": "example/hello", "module": "/policy.wasm"}],
                "rego_version": 1}
    blob = make([("/data.json", b"{}"), ("/example.rego", b"package example\n"), ("/policy.wasm", WASM),
                 ("/.manifest", json.dumps(manifest).encode())])
    assert is_bundle(blob) and not is_bundle(WASM)
    b = read_bundle(blob)
    assert b.wasm == WASM and b.data == {} and b.entrypoints == ("example/hello",) and b.revision == "abc"
    assert set(b.files) == {"data.json", "example.rego", "policy.wasm", ".manifest"}


def test_nested_data_is_mounted_at_its_directory_and_merged() -> None:
    blob = make([("/data.json", b'{"top": 1, "a": {"x": 1}}'), ("/a/b/data.json", b'{"y": 2}'),
                 ("/a/data.json", b'{"z": 3}'), ("c/data.json", b"[1, 2]"), ("/policy.wasm", WASM)])
    assert read_bundle(blob).data == {"top": 1, "a": {"x": 1, "z": 3, "b": {"y": 2}}, "c": [1, 2]}


def test_conflicting_data_is_refused() -> None:
    blob = make([("/data.json", b'{"a": 1}'), ("/a/data.json", b'{"z": 3}'), ("/policy.wasm", WASM)])
    with pytest.raises(BundleError, match=r"conflicts|defined twice"):
        read_bundle(blob)


@pytest.mark.parametrize("name", ["../evil", "/../../etc/passwd", "a/../../b", "./a/../../x", "..\\win"])
def test_path_escapes_are_refused(name: str) -> None:
    with pytest.raises(BundleError, match="escapes") as err:
        read_members(make([(name, b"x")]))
    assert err.value.code == "bundle_unsafe"


def _link(name: str, kind: bytes, target: str = "/etc/passwd") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_are_refused(kind: bytes) -> None:
    with pytest.raises(BundleError, match=r"link|special file") as err:
        read_members(make([("/policy.wasm", WASM), _link("/data.json", kind)]))
    assert err.value.code == "bundle_unsafe"


def test_oversize_member_total_and_count_are_refused() -> None:
    with pytest.raises(BundleError, match="limit") as err:
        read_members(make([("/policy.wasm", b"x" * 2000)]), max_member_bytes=1000)
    assert err.value.code == "bundle_too_large"
    with pytest.raises(BundleError, match="total size limit"):
        read_members(make([("/a", b"x" * 600), ("/b", b"x" * 600)]), max_total_bytes=1000)
    with pytest.raises(BundleError, match="more than 3 members"):
        read_members(make([(f"/f{i}", b"x") for i in range(5)]), max_members=3)


def test_duplicates_garbage_and_missing_wasm() -> None:
    with pytest.raises(BundleError, match="twice"):
        read_members(make([("/data.json", b"{}"), ("data.json", b"{}")]))
    with pytest.raises(BundleError, match=r"not a readable"):
        read_members(b"\x1f\x8bnot really gzip")
    with pytest.raises(BundleError, match=r"no policy\.wasm"):
        read_bundle(make([("/data.json", b"{}")]))
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(make([("/data.json", b"{nope"), ("/policy.wasm", WASM)]))


def test_reads_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(make([("/policy.wasm", WASM)]))
    assert read_bundle(path).wasm == WASM
