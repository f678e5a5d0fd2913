"""Gateway-side commands: ``edge-agent trust add|list|remove|update`` and ``edge-agent install``.

They open the state database themselves (the daemon may run: SQLite serialises the two writers and
the daemon's ReleaseWatcher notices the new generation) and use exactly the verification path the
fleet link uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.cli.common import EXIT_FAIL, EXIT_OK, FileTooLarge, add_config_options, config_from, read_file
from agent.storage import Store
from agent.trust.errors import Oversize, ReleaseRejected, TrustError
from agent.trust.predicate import KINDS

# crypto and the verifier are imported inside the handlers: every `edge-agent` command parses this
# module, and `status` must start fast


@contextmanager
def open_store(args: argparse.Namespace) -> Iterator[Store]:
    config = config_from(args)
    store = Store.open(config.state_dir, synchronous=config.storage.synchronous,
                       batch_max=config.storage.commit_batch_max)
    try:
        yield store
    finally:
        store.close()


def _kinds(values: list[str] | None) -> tuple[str, ...]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return tuple(dict.fromkeys(out))


def register_trust(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trust", help="manage the keys this gateway accepts releases from")
    tsub = p.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    a = tsub.add_parser("add", help="trust a public key (PEM, e.g. cosign.pub)")
    add_config_options(a)
    a.add_argument("pubkey", type=Path, metavar="PUB.pem")
    a.add_argument("--kinds", action="append", metavar="KIND[,KIND]",
                   help=f"kinds this key may sign ({', '.join(KINDS)}; default: all)")
    a.add_argument("--names", default="*", metavar="GLOB", help="release names this key may sign (default: *)")
    a.add_argument("--root", action="store_true", help="a root key: signs key-set updates only, never releases")
    a.add_argument("--comment", default="", help="free text shown in 'trust list'")
    a.set_defaults(func=handle_add)
    lst = tsub.add_parser("list", help="list trusted keys and their scopes")
    add_config_options(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=handle_list)
    r = tsub.add_parser("remove", help="stop trusting a key (by id or id prefix)")
    add_config_options(r)
    r.add_argument("key_id", metavar="KEY_ID")
    r.set_defaults(func=handle_remove)
    u = tsub.add_parser("update", help="apply a key-set update signed by a trusted root key")
    add_config_options(u)
    u.add_argument("keyset", type=Path, metavar="KEYSET")
    u.add_argument("--bundle", type=Path, required=True, help="its Sigstore bundle (edge-fleet keyset-sign)")
    u.set_defaults(func=handle_update)


def handle_add(args: argparse.Namespace) -> int:
    from agent.trust.keys import load_public_pem
    from agent.trust.truststore import TrustedKey, add_key, check_scope
    pub = load_public_pem(read_file(args.pubkey, "public key"))
    kinds = _kinds(args.kinds)
    check_scope(kinds, args.names)
    key = TrustedKey(public=pub, kinds=kinds, names=args.names, role="root" if args.root else "release",
                     comment=args.comment)
    with open_store(args) as store:
        store.writer.run_sync(add_key(key))
    print(f"trusted {key.role} key {pub.key_id} ({pub.key_type}) {key.scope_text}")
    return EXIT_OK


def handle_list(args: argparse.Namespace) -> int:
    from agent.trust.truststore import load_trust_set
    with open_store(args) as store:
        conn = store.reader()
        try:
            keys = load_trust_set(conn).keys
        finally:
            conn.close()
    rows = [{"key_id": k.key_id, "type": k.public.key_type, "role": k.role, "kinds": list(k.kinds) or ["*"],
             "names": k.names, "source": k.source, "comment": k.comment} for k in keys]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not rows:
        print("no trusted keys: add one with 'edge-agent trust add PUB.pem'")
    for r in rows:
        print(f"{r['key_id'][:16]}  {r['type']:<10}  {r['role']:<7}  kinds={','.join(r['kinds'])}  "
              f"names={r['names']}  source={r['source']}  {r['comment']}".rstrip())
    return EXIT_OK


def handle_remove(args: argparse.Namespace) -> int:
    from agent.trust.truststore import remove_key
    with open_store(args) as store:
        removed = store.writer.run_sync(remove_key(args.key_id))
    print(f"removed key {removed}")
    return EXIT_OK


def _rejected(exc: ReleaseRejected) -> int:
    print(f"REJECTED [{exc.code}]: {exc}", file=sys.stderr)
    return EXIT_FAIL


def handle_update(args: argparse.Namespace) -> int:
    from agent.trust.bundle import MAX_BUNDLE_BYTES
    from agent.trust.keyset import apply_keyset_job
    try:
        keyset = read_file(args.keyset, "key set")
        bundle = read_file(args.bundle, "bundle", MAX_BUNDLE_BYTES)
    except FileTooLarge as exc:
        return _rejected(Oversize(str(exc)))
    with open_store(args) as store:
        try:
            ks = store.writer.run_sync(apply_keyset_job(keyset, bundle))
        except ReleaseRejected as exc:
            store.record_error_sync("trust", exc.code, f"key-set update refused: {exc}")
            return _rejected(exc)
    print(f"applied key set #{ks.sequence} signed by root {ks.signer_key_id[:16]}: {len(ks.keys)} key(s), "
          f"{len(ks.revoked)} revoked")
    return EXIT_OK


def register_install(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install", help="verify and install a signed release (air-gap path: USB stick, laptop)")
    add_config_options(p)
    p.add_argument("artifact", type=Path, metavar="ARTIFACT",
                   help="module .wasm, policy.wasm or bundle.tar.gz — or an OCI image layout directory "
                   "(edge-fleet export, oras copy --to-oci-layout): every release in it")
    p.add_argument("--bundle", type=Path, default=None,
                   help="its Sigstore bundle (release.sigstore.json); not with a layout, which carries them")
    p.add_argument("--stage", action="store_true", help="verify and store only; do not activate")
    p.add_argument("--json", action="store_true", help="print the result as JSON (layouts)")
    p.set_defaults(func=handle_install)
    r = sub.add_parser("rollback", help="re-activate the previous release of KIND NAME (the version floor stays)")
    add_config_options(r)
    r.add_argument("kind", choices=KINDS)
    r.add_argument("name")
    r.set_defaults(func=handle_rollback)


def handle_install(args: argparse.Namespace) -> int:
    from agent.daemon.releases import release_store
    from agent.trust.bundle import MAX_BUNDLE_BYTES
    from agent.trust.verify import DEFAULT_MAX_ARTIFACT_BYTES
    config = config_from(args)
    if args.artifact.is_dir():
        from agent.cli.registry_cmd import install_layout, print_layout_rows
        if args.bundle is not None:
            raise TrustError(f"{args.artifact} is an OCI image layout: its signatures are inside; drop --bundle")
        with open_store(args) as store:
            rows, failed = install_layout(args.artifact, release_store(store, policy=config.policy,
                                                                       modules=config.modules),
                                          stage=args.stage)
        print_layout_rows(rows, args.json)
        return EXIT_FAIL if failed else EXIT_OK
    if args.bundle is None:
        raise TrustError(f"{args.artifact} is a file: give its Sigstore bundle with --bundle")
    try:
        artifact = read_file(args.artifact, "artifact", DEFAULT_MAX_ARTIFACT_BYTES)
        bundle = read_file(args.bundle, "bundle", MAX_BUNDLE_BYTES)
    except FileTooLarge as exc:
        return _rejected(Oversize(str(exc)))
    with open_store(args) as store:  # checked with the daemon's [policy]/[modules] limits: same verdict
        releases = release_store(store, policy=config.policy, modules=config.modules)
        try:
            if args.stage:
                rel = releases.stage(artifact, bundle, source="cli")
            else:
                rel = releases.install(artifact, bundle, source="cli")
        except ReleaseRejected as exc:
            return _rejected(exc)
    print(f"{'staged' if args.stage else 'installed'} {rel.kind} {rel.name} v{rel.version} "
          f"sha256={rel.sha256[:16]} signer={rel.signer_key_id[:16]} state={rel.state}")
    return EXIT_OK


def handle_rollback(args: argparse.Namespace) -> int:
    from agent.trust.releases import ReleaseStore
    with open_store(args) as store:
        rel = ReleaseStore(store).rollback(args.kind, args.name)
    print(f"rolled back {rel.kind} {rel.name} to v{rel.version}")
    return EXIT_OK

