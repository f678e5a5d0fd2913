"""Fleet-side commands: ``edge-fleet keygen|sign|verify|keyset-sign``.

Bundles are Sigstore v0.3 JSON with a DSSE-wrapped in-toto statement, the shape ``cosign attest-blob
--new-bundle-format`` writes; ``verify`` runs the agent's own verifier against one public key.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent import jsonsafe
from agent.cli.common import EXIT_FAIL, EXIT_OK, read_file
from agent.trust.bundle import MAX_BUNDLE_BYTES
from agent.trust.errors import ReleaseRejected, TrustError
from agent.trust.keys import KEY_TYPES, PrivateKey, generate, load_private_pem, load_public_pem
from agent.trust.predicate import KINDS
from agent.trust.truststore import TrustedKey, TrustSet
from agent.trust.verify import DEFAULT_MAX_ARTIFACT_BYTES

META_LIMITS = jsonsafe.Limits(1024 * 1024, max_depth=32)

PASSPHRASE_ENV = "EDGE_FLEET_PASSPHRASE"  # noqa: S105 - the variable name, not a secret


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def _passphrase_for_new(args: argparse.Namespace) -> bytes | None:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if args.passphrase_prompt:
        first = getpass.getpass("passphrase for the new private key: ")
        if first != getpass.getpass("repeat the passphrase: "):
            raise TrustError("the two passphrases differ")
        return first.encode() or None
    return None


def load_signing_key(path: Path) -> PrivateKey:
    data = read_file(path, "private key")
    env = os.environ.get(PASSPHRASE_ENV)
    if b"ENCRYPTED" in data and not env:
        if not sys.stdin.isatty():
            raise TrustError(f"{path} is encrypted: set {PASSPHRASE_ENV} or run from a terminal to be prompted")
        return load_private_pem(data, getpass.getpass(f"passphrase for {path}: ").encode())
    return load_private_pem(data, env.encode() if env else None)


def handle_keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv_path, pub_path = out / f"{args.name}.key", out / f"{args.name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise TrustError(f"{p} already exists; refusing to overwrite a key (choose another --out or --name)")
    key = generate(args.type)
    _write_private(priv_path, key.to_pem(_passphrase_for_new(args)))
    pub_path.write_text(key.public.pem)
    print(f"wrote {priv_path} (0600) and {pub_path}; key id {key.public.key_id} ({key.public.key_type})")
    return EXIT_OK


def handle_sign(args: argparse.Namespace) -> int:
    from agent.trust.signer import sign_release
    meta: dict[str, Any] | None = None
    if args.meta is not None:
        try:
            loaded = jsonsafe.loads(read_file(args.meta, "metadata file"), META_LIMITS)
        except jsonsafe.JsonRejected as exc:  # no agent would accept it: refuse to sign it
            raise TrustError(f"{args.meta} is not accepted JSON ({exc.code}): {exc}") from None
        if not isinstance(loaded, dict):
            raise TrustError(f"{args.meta} must hold a JSON object (the predicate fields)")
        meta = loaded
    key = load_signing_key(args.key)
    artifact = read_file(args.artifact, "artifact", DEFAULT_MAX_ARTIFACT_BYTES)
    bundle = sign_release(key, artifact, args.kind, args.name, args.version, meta=meta,
                          subject_name=args.artifact.name)
    args.out.write_bytes(bundle)
    print(f"signed {args.kind} {args.name} v{args.version} ({len(artifact)} bytes) with key "
          f"{key.public.key_id[:16]} → {args.out}")
    return EXIT_OK


def handle_verify(args: argparse.Namespace) -> int:
    from agent.trust.verify import verify_release
    pub = load_public_pem(read_file(args.key, "public key"))
    trust = TrustSet((TrustedKey(public=pub),))
    try:
        v = verify_release(read_file(args.artifact, "artifact", DEFAULT_MAX_ARTIFACT_BYTES),
                           read_file(args.bundle, "bundle", MAX_BUNDLE_BYTES), trust, args.floor, time.time())
    except ReleaseRejected as exc:
        print(f"REJECTED [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"OK {v.kind} {v.name} v{v.version} sha256={v.sha256} format={v.artifact_format} signer={v.signer_key_id}")
    return EXIT_OK


def handle_keyset_sign(args: argparse.Namespace) -> int:
    from agent.trust.keyset import parse_keyset, sign_keyset
    key = load_signing_key(args.key)
    data = read_file(args.keyset, "key set")
    ks = parse_keyset(data)
    args.out.write_bytes(sign_keyset(key, data))
    print(f"signed key set #{ks.sequence} ({len(ks.keys)} keys, {len(ks.revoked)} revoked) with root "
          f"{key.public.key_id[:16]} → {args.out}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("keygen", help="create a signing key pair (private key 0600)")
    k.add_argument("--out", type=Path, required=True, metavar="DIR")
    k.add_argument("--type", choices=KEY_TYPES, default="ecdsa-p256")
    k.add_argument("--name", default="release", help="file name stem (NAME.key / NAME.pub)")
    k.add_argument("--passphrase-prompt", action="store_true",
                   help=f"encrypt the private key with a passphrase typed at a prompt (or set {PASSPHRASE_ENV})")
    k.set_defaults(func=handle_keygen)
    s = sub.add_parser("sign", help="sign an artifact as a release → Sigstore bundle")
    s.add_argument("artifact", type=Path, metavar="ARTIFACT")
    s.add_argument("--key", type=Path, required=True)
    s.add_argument("--kind", choices=KINDS, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--version", type=int, required=True)
    s.add_argument("--meta", type=Path, help="JSON object of further predicate fields (entrypoints, trigger, …)")
    s.add_argument("--out", type=Path, required=True, metavar="BUNDLE")
    s.set_defaults(func=handle_sign)
    v = sub.add_parser("verify", help="verify a release against one public key (exit 0 ok / 1 with reason)")
    v.add_argument("artifact", type=Path, metavar="ARTIFACT")
    v.add_argument("--bundle", type=Path, required=True)
    v.add_argument("--key", type=Path, required=True, metavar="PUB")
    v.add_argument("--floor", type=int, default=None, help="also require version > FLOOR")
    v.set_defaults(func=handle_verify)
    ks = sub.add_parser("keyset-sign", help="sign a key-set update with a root key")
    ks.add_argument("keyset", type=Path, metavar="KEYSET")
    ks.add_argument("--key", type=Path, required=True, metavar="ROOT_KEY")
    ks.add_argument("--out", type=Path, required=True, metavar="BUNDLE")
    ks.set_defaults(func=handle_keyset_sign)
