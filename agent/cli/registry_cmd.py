"""``edge-fleet publish`` / ``edge-fleet export`` and ``edge-agent install LAYOUT``: releases through OCI.

publish: verify locally → push the artifact and its signature referrer → read them back → sign and
push each target scope's desired state → read it back → ring the doorbell (``--broker``) → read it
back. export: copy releases (from a registry or from files) into an OCI image layout for an air gap,
each verified first. install: every release of a layout through the one verification path.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from agent.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE
from agent.errors import AgentError
from agent.fleet.topics import DEFAULT_PREFIX, Scope, TopicError
from agent.trust.errors import ReleaseRejected, TrustError
from agent.trust.truststore import TrustedKey, TrustSet


class UsageError(AgentError):
    code = "usage"


def read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from None


def secret_from_env(var: str, flag: str) -> str:
    if not var:
        return ""
    value = os.environ.get(var)
    if value is None:
        raise UsageError(f"{flag} names the environment variable {var!r}, which is not set")
    return value


def trust_from(paths: list[Path] | None) -> TrustSet:
    from agent.trust.keys import load_public_pem

    if not paths:
        raise UsageError("give the public key(s) your gateways trust with --trust PUB.pem (it is checked before "
                         "anything is published)")
    return TrustSet(tuple(TrustedKey(public=load_public_pem(read(p, "public key"))) for p in paths))


def registry_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--registry", required=required, metavar="URL", help="OCI registry, https://host[:port]")
    p.add_argument("--repo-prefix", default="edge",
                   help="repository prefix: releases in PREFIX/<kind>/<name>, desired state in PREFIX/desired-state "
                   "(default edge; the gateways' fleet.registry_prefix)")
    p.add_argument("--registry-ca", default="", metavar="PEM", help="CA that signed the registry's certificate")
    p.add_argument("--username", default="", help="registry user")
    p.add_argument("--password-env", default="", metavar="VAR",
                   help="environment variable holding the registry password (never on the command line)")


def broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="", metavar="URL",
                   help="fleet broker for the doorbell, mqtt(s)://host:port (optional: gateways also poll)")
    p.add_argument("--broker-ca", default="", metavar="PEM", help="CA of the broker's certificate (mqtts)")
    p.add_argument("--broker-cert", default="", metavar="PEM", help="client certificate for the broker")
    p.add_argument("--broker-key", default="", metavar="PEM", help="private key of --broker-cert")
    p.add_argument("--broker-username", default="", help="MQTT user name")
    p.add_argument("--broker-password-env", default="", metavar="VAR", help="variable holding the MQTT password")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"fleet topic prefix (default {DEFAULT_PREFIX})")


def _target(args: argparse.Namespace) -> Any:
    from agent.oci.publish import RegistryTarget

    return RegistryTarget(args.registry, args.username, secret_from_env(args.password_env, "--password-env"),
                          args.registry_ca)


def _emit(args: argparse.Namespace, obj: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(obj, indent=2))
    else:
        print("\n".join(lines))


# ------------------------------------------------------------------------------------------ publish

def handle_publish(args: argparse.Namespace) -> int:
    from agent.cli.keys_cmd import load_signing_key
    from agent.fleet.link import LinkConfig
    from agent.fleet.publishing import publish, ring
    from agent.fleet.registry import scope_tag
    from agent.oci.publish import Publisher

    targets: list[Scope] = []
    for text in args.target:
        try:
            targets.append(Scope.parse(text))
            scope_tag(targets[-1])
        except TopicError as exc:
            raise UsageError(f"--target {text}: {exc}") from None
    artifact, bundle = read(args.artifact, "artifact"), read(args.bundle, "bundle")
    trust = trust_from(args.trust)
    key = load_signing_key(args.signing_key)
    report = publish(Publisher(_target(args)), artifact=artifact, bundle=bundle, targets=targets,
                     repo_prefix=args.repo_prefix, trust=trust, signing_key=key,
                     replace_desired=args.replace_desired, subject_name=args.artifact.name)
    doorbell_error = ""
    if args.broker:
        link = LinkConfig(url=args.broker, client_id=f"edge-fleet-{uuid.uuid4().hex[:12]}",
                          username=args.broker_username,
                          password=secret_from_env(args.broker_password_env, "--broker-password-env"),
                          tls_ca=args.broker_ca, tls_cert=args.broker_cert, tls_key=args.broker_key,
                          clean_session=True)
        try:
            asyncio.run(ring(link, args.prefix, report.scopes))
        except AgentError as exc:
            doorbell_error = str(exc)
    out = report.to_json()
    out["doorbell_error"] = doorbell_error or None
    rel = report.release
    lines = [f"published {report.kind} {report.name} v{report.version} ({len(artifact)} bytes, sha256 "
             f"{report.sha256[:16]}…, signer {report.signer[:16]}) in {report.seconds:.2f} s",
             f"  artifact   {args.registry.rstrip('/')}/{rel.repository}:{rel.tag} @ {rel.digest}",
             f"  signature  referrer {rel.referrer} ({rel.referrers_mode}), {rel.bytes_uploaded} bytes uploaded",
             *(f"  read back  {v}" for v in rel.verified)]
    for s in report.scopes:
        state = f"desired state #{s.sequence}" + ("" if s.changed else " (unchanged: already says this)")
        bell = f", doorbell {s.doorbell}" if s.doorbell else ""
        lines.append(f"  {s.scope:<20} {state} @ {s.digest[:19]}…{bell}")
    if doorbell_error:
        lines.append(f"  doorbell NOT confirmed: {doorbell_error}")
    _emit(args, out, lines)
    return EXIT_FAIL if doorbell_error else EXIT_OK


def register_publish(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("publish", help="push a signed release to an OCI registry and point scopes' desired state at it")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help="the artifact (.wasm or OPA bundle .tar.gz)")
    p.add_argument("--bundle", type=Path, required=True, help="its Sigstore bundle (edge-fleet sign / cosign)")
    p.add_argument("--target", action="append", required=True, metavar="SCOPE",
                   help="all | site/<site> | group/<group> | gw/<node-id> (repeatable)")
    p.add_argument("--trust", type=Path, action="append", metavar="PUB",
                   help="public key the gateways trust (repeatable): the release and the desired state are "
                   "verified against these before anything is pushed")
    p.add_argument("--signing-key", type=Path, required=True, metavar="KEY",
                   help="private key that signs the desired-state documents (its .pub must be among --trust)")
    p.add_argument("--replace-desired", action="store_true",
                   help="start a scope's desired state afresh (when the registry's current one does not verify)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    registry_options(p)
    broker_options(p)
    p.set_defaults(func=handle_publish)


# ------------------------------------------------------------------------------------------- export

def _parse_release(text: str) -> tuple[str, str, int]:
    kind, _, rest = text.partition("/")
    name, _, version = rest.partition("@")
    if kind not in ("module", "policy") or not name or not version.isdigit():
        raise UsageError(f"--release {text!r} must look like policy/gate@7 or module/thermostat@3")
    return kind, name, int(version)


async def _fetch_release(client: Any, repo: str, version: int) -> tuple[bytes, list[tuple[bytes, bytes]],
                                                                       bytes, str]:
    """(release manifest, [(referrer manifest, bundle)], artifact, layer media type) copied from the registry."""
    from agent.oci.formats import BUNDLE_TYPES, bundle_layers, parse_manifest, release_layer

    got = await client.manifest_bytes(repo, f"v{version}")
    raw, _digest = got
    manifest = parse_manifest(raw)
    layer = release_layer(manifest)
    artifact = await client.blob(repo, layer.digest, limit=64 * 1024 * 1024)
    refs: list[tuple[bytes, bytes]] = []
    index, _how = await client.referrers(repo, manifest.digest)
    for d in (index.manifests if index else ()):
        if d.artifact_type in BUNDLE_TYPES:
            ref_raw, _ = await client.manifest_bytes(repo, d.digest)
            for b in bundle_layers(parse_manifest(ref_raw)):
                refs.append((ref_raw, await client.blob(repo, b.digest, limit=4 * 1024 * 1024)))
    for b in bundle_layers(manifest):
        refs.append((b"", await client.blob(repo, b.digest, limit=4 * 1024 * 1024)))
    return raw, refs, artifact, layer.media_type


def handle_export(args: argparse.Namespace) -> int:
    from agent.oci.client import RegistryClient, RegistryConfig
    from agent.oci.formats import BUNDLE, EMPTY_BYTES, MANIFEST, release_artifact
    from agent.oci.layout import LayoutWriter
    from agent.trust.verify import verify_release

    trust = trust_from(args.trust)
    rows: list[dict[str, Any]] = []
    writer = LayoutWriter(args.to)

    def verified(artifact: bytes, bundles: list[bytes]) -> tuple[Any, bytes]:
        problem: ReleaseRejected | None = None
        for bundle in bundles:
            try:
                return verify_release(artifact, bundle, trust, None, time.time()), bundle
            except ReleaseRejected as exc:
                problem = exc
        raise UsageError(f"no signature verifies under --trust: {problem or 'the release has no signature'}")

    if args.artifact is not None:
        if args.bundle is None or args.release:
            raise UsageError("export ARTIFACT needs --bundle (and no --release); --release copies from --registry")
        artifact, bundle = read(args.artifact, "artifact"), read(args.bundle, "bundle")
        v, _ = verified(artifact, [bundle])
        art = release_artifact(v.kind, v.name, v.version, artifact, bundle, title=args.artifact.name)
        for blob in (EMPTY_BYTES, artifact, bundle):
            writer.blob(blob)
        ref_name = f"{v.kind}-{v.name}-v{v.version}"
        writer.manifest(art.manifest, ref_name=ref_name)
        writer.manifest(art.referrer, artifact_type=BUNDLE)
        rows.append({"kind": v.kind, "name": v.name, "version": v.version, "sha256": v.sha256,
                     "ref_name": ref_name, "digest": art.digest})
    else:
        if not args.registry or not args.release:
            raise UsageError("export needs ARTIFACT --bundle BUNDLE, or --registry URL with "
                             "--release KIND/NAME@VERSION")
        from agent.fleet.registry import release_repository

        cfg = RegistryConfig(args.registry, username=args.username,
                             password=secret_from_env(args.password_env, "--password-env"), ca=args.registry_ca)
        wanted = [_parse_release(r) for r in args.release]

        async def fetch_all() -> list[tuple[str, str, int, str, tuple[bytes, list[tuple[bytes, bytes]], bytes, str]]]:
            async with RegistryClient(cfg) as client:
                out = []
                for kind, name, version in wanted:
                    repo = release_repository(args.repo_prefix, kind, name)
                    out.append((kind, name, version, repo, await _fetch_release(client, repo, version)))
                return out
        for kind, name, version, _repo, (raw, refs, artifact, _mt) in asyncio.run(fetch_all()):
            v, good = verified(artifact, [b for _r, b in refs])
            if (v.kind, v.name, v.version) != (kind, name, version):
                raise UsageError(f"{kind}/{name}@{version} in the registry is signed as {v.kind} {v.name} v{v.version}")
            writer.blob(b"{}")
            writer.blob(artifact)
            ref_name = f"{kind}-{name}-v{version}"
            from agent.oci.formats import digest_of
            writer.manifest(raw, ref_name=ref_name)
            for ref_raw, bundle in refs:
                writer.blob(bundle)
                if ref_raw and bundle == good:
                    writer.manifest(ref_raw, media_type=MANIFEST, artifact_type=BUNDLE)
            rows.append({"kind": kind, "name": name, "version": version, "sha256": v.sha256, "ref_name": ref_name,
                         "digest": digest_of(raw)})
    writer.close()
    _emit(args, {"layout": str(args.to), "releases": rows},
          [f"wrote {len(rows)} release(s) to the OCI image layout {args.to}",
           *(f"  {r['ref_name']:<32} {r['digest']}  (verified, sha256 {r['sha256'][:16]}…)" for r in rows),
           f"install on a gateway with: edge-agent install {args.to}"])
    return EXIT_OK


def register_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="write signed releases into an OCI image layout (air gap: USB stick)")
    p.add_argument("artifact", type=Path, nargs="?", default=None, metavar="ARTIFACT",
                   help="a local artifact to export (with --bundle); or copy from --registry with --release")
    p.add_argument("--bundle", type=Path, default=None, help="the local artifact's Sigstore bundle")
    p.add_argument("--release", action="append", default=[], metavar="KIND/NAME@VERSION",
                   help="a release to copy from --registry (repeatable), e.g. policy/gate@7")
    p.add_argument("--to", type=Path, required=True, metavar="DIR", help="the layout directory (created or added to)")
    p.add_argument("--trust", type=Path, action="append", metavar="PUB",
                   help="public key the gateways trust (repeatable): every release is verified before it is written")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    registry_options(p, required=False)
    p.set_defaults(func=handle_export)


# ------------------------------------------------------------------------------------------- install

def install_layout(path: Path, releases: Any, *, stage: bool) -> tuple[list[dict[str, Any]], int]:
    """Every release of the layout, oldest version first, through ``ReleaseStore.install`` (or stage).

    Nothing in the layout is trusted: each candidate signature is tried through the one verification
    path; a release none verifies is rejected with the last reason."""
    from agent.oci.layout import Layout
    from agent.trust.bundle import parse_bundle
    from agent.trust.statement import parse_statement

    def version_hint(bundles: tuple[bytes, ...]) -> int:
        for b in bundles:
            try:
                v = parse_statement(parse_bundle(b).envelope.payload).predicate.get("version")
                if isinstance(v, int):
                    return v
            except (ReleaseRejected, AttributeError):
                continue
        return 0

    found = sorted(Layout(path).releases(), key=lambda r: version_hint(r.bundles))
    rows: list[dict[str, Any]] = []
    failed = 0
    active = {(r.sha256, r.version): r for r in releases.list() if r.state == "active"}
    for item in found:
        row: dict[str, Any] = {"ref_name": item.ref_name, "manifest": item.manifest_digest}
        running = active.get((hashlib.sha256(item.artifact).hexdigest(), version_hint(item.bundles)))
        if running is not None:  # the same stick again: these very bytes already run (nothing changes)
            row.update(state="already active", kind=running.kind, name=running.name, version=running.version,
                       sha256=running.sha256, signer=running.signer_key_id)
            rows.append(row)
            continue
        problem: ReleaseRejected | None = None
        if not item.bundles:
            problem = ReleaseRejected("the layout holds no signature for this artifact (a bundle layer or a "
                                      "referrer): nothing unsigned is installed", code="unsigned")
        for bundle in item.bundles:
            try:
                rel = (releases.stage if stage else releases.install)(item.artifact, bundle, source="oci-layout")
            except ReleaseRejected as exc:
                problem = exc
                continue
            row.update(state=rel.state, kind=rel.kind, name=rel.name, version=rel.version, sha256=rel.sha256,
                       signer=rel.signer_key_id)
            problem = None
            break
        if problem is not None:
            failed += 1
            row.update(state="rejected", code=problem.code, reason=str(problem))
        rows.append(row)
    return rows, failed


def print_layout_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"releases": rows}, indent=2))
        return
    for r in rows:
        if r["state"] == "rejected":
            print(f"REJECTED [{r['code']}] {r['ref_name'] or r['manifest'][:19]}: {r['reason']}", file=sys.stderr)
        else:
            verb = {"staged": "staged", "already active": "already active:"}.get(r["state"], "installed")
            state = "" if r["state"] == "already active" else f" state={r['state']}"
            print(f"{verb} {r['kind']} {r['name']} v{r['version']} "
                  f"sha256={r['sha256'][:16]} signer={r['signer'][:16]}{state} (from {r['ref_name']})")


__all__ = ["EXIT_USAGE", "TrustError", "install_layout", "print_layout_rows", "register_export",
           "register_publish"]
