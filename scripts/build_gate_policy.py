#!/usr/bin/env python3
"""Build the demo gate policy: examples/policies/gate.c → an OPA bundle (policy.wasm + data.json).

The C source is gate.rego hand-compiled against the OPA-ABI runtime the policy tests use
(tests/policies/opa_rt.c, shaped like `opa build -t wasm` output by tests/policies/build.py).
Usage: scripts/build_gate_policy.py [OUT.tar.gz]   (default examples/build/gate-policy.tar.gz)
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.policies.build import BASE_EXPORTS, MINOR_EXPORTS, patch  # noqa: E402

SRC = REPO / "examples" / "policies"


def bundle_bytes(wasm: bytes, data: bytes) -> bytes:
    manifest = {"revision": "gate-1", "roots": [""], "wasm": [{"entrypoint": "edge/decision",
                                                              "module": "/policy.wasm"}]}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in (("/policy.wasm", wasm), ("/data.json", data),
                           ("/.manifest", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


RT = REPO / "tests" / "policies"


def build_wasm() -> bytes:
    """clang → wasm32 with the OPA-ABI runtime, then shaped like OPA output (ABI 1.3)."""
    clang = shutil.which("clang")
    if clang is None:
        raise SystemExit("clang is needed to build the gate policy")
    exports = [*BASE_EXPORTS, *MINOR_EXPORTS[2], *MINOR_EXPORTS[3], "opa_rt_init"]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wasm"
        cmd = [clang, "--target=wasm32", "-nostdlib", "-O2", "-fno-builtin", "-Wall", "-Werror",
               "-Wno-unused-function", f"-I{RT}", "-Wl,--no-entry", "-Wl,--import-memory", "-Wl,--strip-all",
               *[f"-Wl,--export={e}" for e in exports], "-o", str(raw), str(RT / "opa_rt.c"), str(SRC / "gate.c")]
        subprocess.run(cmd, check=True, timeout=120)
        return patch(raw.read_bytes(), major=1, minor=3, export_memory=True, start="opa_rt_init")


def build_gate() -> bytes:
    return bundle_bytes(build_wasm(), (SRC / "data.json").read_bytes())


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "examples" / "build" / "gate-policy.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(build_gate())
    print(f"built {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
