"""configs/kubeedge/: the DeviceModel/Device manifests agree with the agent mapping and the twin rules."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from agent.config.schema import parse
from agent.sync import twins
from agent.sync.settings import KubeEdgeSettings

DIR = Path(__file__).resolve().parents[1] / "configs" / "kubeedge"
TYPE_MAP = {"FLOAT": "float", "DOUBLE": "float", "INT": "int", "BOOLEAN": "boolean", "STRING": "string"}


def test_manifests_match_the_agent_mapping() -> None:
    model = yaml.safe_load((DIR / "devicemodel.yaml").read_text())
    device = yaml.safe_load((DIR / "device.yaml").read_text())
    raw = tomllib.loads((DIR / "kubeedge.toml").read_text())
    settings = parse("kubeedge.toml", KubeEdgeSettings, raw["kubeedge"])
    assert model["apiVersion"] == device["apiVersion"] == "devices.kubeedge.io/v1beta1"
    assert device["spec"]["nodeName"] == settings.node_name == "demo-node"
    assert device["metadata"]["namespace"] == settings.namespace == "default"
    assert device["spec"]["deviceModelRef"]["name"] == model["metadata"]["name"]
    (agent_device,) = settings.devices
    ref = twins.resolve(settings, agent_device)
    assert ref is not None and ref.device_id == "default/press-1" == (
        f"{device['metadata']['namespace']}/{device['metadata']['name']}")
    model_props = {p["name"]: p["type"] for p in model["spec"]["properties"]}
    device_props = {p["name"] for p in device["spec"]["properties"]}
    mapped = {ref.twin_name(p) for p in ref.mapping.properties}
    assert mapped == set(model_props) == device_props  # twin names that are not spec properties are ignored
    for name, kind in model_props.items():
        twins.check_name(name)
        assert kind in TYPE_MAP
