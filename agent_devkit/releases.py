"""Test helpers for signed releases: keys, signed bundles (via agent.trust), trusting keys in a state dir.

Other components' tests use these to install real, really-signed policies and modules::

    signer = Signer.create()                       # ECDSA P-256 key pair
    signer.trust(state_dir, kinds=("policy",))     # trust it in that state dir
    bundle = signer.sign(wasm, "policy", "safety", 1, entrypoints=["safety/allow"])
    release = install(state_dir, wasm, bundle)     # verify + store + activate (CLI-equivalent)
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from agent.daemon.releases import release_store
from agent.storage import Store
from agent.trust.keys import KeyType, PrivateKey, generate
from agent.trust.keyset import keyset_document, sign_keyset
from agent.trust.releases import Release
from agent.trust.signer import sign_release
from agent.trust.truststore import Role, TrustedKey, add_key


def wasm_module(body: str = "", exports: Sequence[str] = ("run",)) -> bytes:
    """A small WASI command module (from WAT): ``_start`` plus no-op functions, plus optional extra WAT.

    It is what the module runtime can run, so the release store accepts it as a kind=module release.
    """
    funcs = "\n".join(f'(func (export "{e}"))' for e in exports if e != "_start")
    return bytes(wasmtime.wat2wasm(f'(module (func (export "_start")) {funcs} {body})'))


def policy_wasm(tag: str = "", policy: str = "rbac") -> bytes:
    """A real OPA-ABI policy (``tests/policies/<policy>.c``, built with clang and cached); ``tag`` goes
    into a custom section, so different tags give different sha256 for the same policy."""
    from agent_devkit.opa.build import build

    wasm = build(policy)
    if not tag:
        return wasm
    payload = bytes([len("tag")]) + b"tag" + tag.encode()
    return wasm + b"\x00" + _uleb(len(payload)) + payload


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def padded_wasm(size: int) -> bytes:
    """A valid Wasm module of about ``size`` bytes (a passive data segment carries the padding)."""
    base = wasm_module()
    pad = max(0, size - len(base) - 64)
    blob = "".join(f"\\{b:02x}" for b in (bytes(range(256)) * (pad // 256 + 1))[:pad])
    return bytes(wasmtime.wat2wasm(f'(module (func (export "run")) (memory 1) (data "{blob}"))'))


def opa_bundle(wasm: bytes | None = None, data: dict[str, Any] | None = None,
               extra: Sequence[tuple[str, bytes]] = (), symlink: str | None = None) -> bytes:
    """An OPA bundle ``.tar.gz`` in memory (``/policy.wasm``, ``/data.json``, ``/.manifest``)."""
    members: list[tuple[str, bytes]] = [
        ("/policy.wasm", wasm if wasm is not None else policy_wasm()),
        ("/data.json", json.dumps(data or {}).encode()),
        ("/.manifest", json.dumps({"revision": "t", "roots": [""],
                                   "wasm": [{"entrypoint": "app/rbac/allow", "module": "/policy.wasm"}]}).encode()),
        *extra,
    ]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass
class Signer:
    key: PrivateKey

    @classmethod
    def create(cls, key_type: KeyType = "ecdsa-p256") -> Signer:
        return cls(generate(key_type))

    @property
    def key_id(self) -> str:
        return self.key.public.key_id

    @property
    def public_pem(self) -> str:
        return self.key.public.pem

    def trusted(self, kinds: Sequence[str] = (), names: str = "*", role: Role = "release") -> TrustedKey:
        return TrustedKey(public=self.key.public, kinds=tuple(kinds), names=names, role=role)

    def sign(self, artifact: bytes, kind: str, name: str, version: int, **meta: Any) -> bytes:
        return sign_release(self.key, artifact, kind, name, version, meta=meta)

    def trust(self, state_dir: Path, kinds: Sequence[str] = (), names: str = "*", role: Role = "release") -> None:
        """Trust this key in ``state_dir`` (opens and closes the state database)."""
        store = Store.open(state_dir)
        try:
            store.writer.run_sync(add_key(self.trusted(kinds, names, role)))
        finally:
            store.close()

    def write(self, directory: Path, stem: str = "release") -> tuple[Path, Path]:
        """Write the key pair as ``stem.key`` / ``stem.pub`` (for CLI tests); returns the paths."""
        directory.mkdir(parents=True, exist_ok=True)
        priv, pub = directory / f"{stem}.key", directory / f"{stem}.pub"
        priv.write_bytes(self.key.to_pem())
        priv.chmod(0o600)
        pub.write_text(self.public_pem)
        return priv, pub

    def sign_keyset(self, sequence: int, keys: Sequence[tuple[Signer, Role, Sequence[str], str]],
                    revoked: Sequence[str] = ()) -> tuple[bytes, bytes]:
        """(key-set JSON, its bundle) signed by this (root) key."""
        doc = keyset_document(sequence, [{"public_key": s.public_pem, "role": role, "kinds": list(kinds),
                                          "names": names} for s, role, kinds, names in keys], list(revoked))
        return doc, sign_keyset(self.key, doc)


def install(state_dir: Path, artifact: bytes, bundle: bytes, *, stage_only: bool = False) -> Release:
    """Verify, store and (unless ``stage_only``) activate a release in ``state_dir``."""
    store = Store.open(state_dir)
    try:
        releases = release_store(store)
        return releases.stage(artifact, bundle) if stage_only else releases.install(artifact, bundle)
    finally:
        store.close()
