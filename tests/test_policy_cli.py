"""``edge-agent policy eval``: one input, JSONL inputs in order, bundles, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.agent_main import main
from agent_devkit.opa.build import RBAC_DATA, build
from tests.test_policy_engine import _bundle

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    wasm = tmp_path / "rbac.wasm"
    wasm.write_bytes(build("rbac"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RBAC_DATA))
    return {"wasm": wasm, "data": data, "dir": tmp_path}


def test_single_input(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["policy", "eval", str(files["wasm"]), "--data", str(files["data"]), "-e", "app/rbac/allow",
               "--input", '{"user": "bob", "action": "read", "type": "finance"}'])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == [{"result": True}]


def test_jsonl_inputs_in_order_and_undefined(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    inputs = files["dir"] / "in.jsonl"
    docs = [{"user": "bob", "action": "read", "type": "finance"}, {"user": "eve", "action": "read", "type": "x"},
            {"user": "alice"}]
    inputs.write_text("\n".join(json.dumps(d) for d in docs) + "\n\n")
    rc = main(["policy", "eval", str(files["wasm"]), "--data", str(files["data"]), "--entrypoint", "app/rbac/allow",
               "--inputs", str(inputs)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in lines] == [[{"result": True}], [{"result": False}], [{"result": True}]]
    sandbox = files["dir"] / "sandbox.wasm"
    sandbox.write_bytes(build("sandbox"))
    assert main(["policy", "eval", str(sandbox), "-e", "ok/undefined", "--input", "1"]) == 0
    assert capsys.readouterr().out == "[]\n"


def test_bundle_uses_its_data_and_manifest(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bundle = files["dir"] / "bundle.tar.gz"
    manifest = {"roots": [""], "wasm": [{"entrypoint": "app/rbac/allow", "module": "/policy.wasm"}]}
    bundle.write_bytes(_bundle({"/policy.wasm": build("rbac"), "/data.json": json.dumps(RBAC_DATA).encode(),
                                "/.manifest": json.dumps(manifest).encode()}))
    assert main(["policy", "eval", str(bundle), "--input", '{"user": "alice"}']) == 0
    assert json.loads(capsys.readouterr().out) == [{"result": True}]


def test_errors_are_clear_with_nonzero_exit(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "eval", str(files["wasm"]), "--input", "{nope"]) == 1
    assert "--input is not valid JSON" in capsys.readouterr().err
    assert main(["policy", "eval", str(files["dir"] / "missing.wasm"), "--input", "{}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["policy", "eval", str(files["wasm"]), "-e", "nope", "--input", "{}"]) == 1
    assert "no entrypoint 'nope'" in capsys.readouterr().err
    bad = files["dir"] / "bad.jsonl"
    bad.write_text('{"user": "bob"}\nnot json\n')
    assert main(["policy", "eval", str(files["wasm"]), "--inputs", str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:2: not valid JSON" in captured.err
    assert len(captured.out.splitlines()) == 1  # results before the bad line were printed


def test_release_name_without_state_database(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["policy", "eval", "gate", "--state-dir", str(files["dir"] / "state"), "--config",
               str(files["dir"] / "none.toml"), "--input", "{}"])
    assert rc in (1, 2)
    err = capsys.readouterr().err
    assert "gate" in err or "config" in err


def test_whole_process_exit_code_and_stdout(files: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sandbox = files["dir"] / "sandbox.wasm"
    sandbox.write_bytes(build("sandbox"))
    proc = subprocess.run([sys.executable, "-m", "agent.cli.agent_main", "policy", "eval", str(sandbox), "-e",
                           "bad/abort", "--input", "{}"], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "eval_conflict_error" in proc.stderr


def test_installed_release_by_name(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from agent_devkit.releases import Signer, install
    state = files["dir"] / "state"
    state.mkdir()
    signer = Signer.create()
    signer.trust(state, kinds=("policy",))
    wasm = build("rbac")
    install(state, wasm, signer.sign(wasm, "policy", "gate", 3, entrypoints=["app/rbac/allow"]))
    for _ in range(2):  # second run: the compiled module comes from the code cache
        rc = main(["policy", "eval", "gate", "--state-dir", str(state), "--data", str(files["data"]),
                   "-e", "app/rbac/allow", "--input", '{"user": "alice"}'])
        assert rc == 0
        assert json.loads(capsys.readouterr().out) == [{"result": True}]
    assert main(["policy", "eval", "other", "--state-dir", str(state), "--input", "{}"]) == 1
    assert "neither a file nor an active installed policy release" in capsys.readouterr().err
