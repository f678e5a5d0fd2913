"""Build the demo gate policy: examples/policies/gate.c → an OPA bundle (policy.wasm + data.json).

The C source is gate.rego hand-compiled against the OPA-ABI runtime of this kit
(``agent_devkit/opa/opa_rt.c``, shaped like ``opa build -t wasm`` output by :mod:`agent_devkit.opa.build`).
Usage: ``python -m agent_devkit.opa.gate [OUT.tar.gz] [--data DATA.json]``
(default ``examples/build/gate-policy.tar.gz`` with ``examples/policies/data.json``).
Works from a source checkout (the example sources live in ``examples/``).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from agent_devkit import REPO
from agent_devkit.opa.build import BASE_EXPORTS, HERE, MINOR_EXPORTS, patch

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


RT = HERE


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


def build_gate(data: Path | None = None) -> bytes:
    """The gate bundle: gate.c with ``data`` (default ``examples/policies/data.json``) as its data document."""
    return bundle_bytes(build_wasm(), (data or SRC / "data.json").read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_devkit.opa.gate", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=REPO / "examples" / "build" / "gate-policy.tar.gz")
    parser.add_argument("--data", type=Path, default=None,
                        help="the data document (default: examples/policies/data.json)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(build_gate(args.data))
    print(f"built {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
