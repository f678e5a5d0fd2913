"""configs/kubeedge/: the DeviceModel/Device manifests agree with the agent mapping and the twin rules."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from agent.config.schema import parse
from agent.config.sync import KubeEdgeSettings
from agent.sync import twins

DIR = Path(__file__).resolve().parents[1] / "configs" / "kubeedge"
TYPE_MAP = {"FLOAT": "float", "DOUBLE": "float", "INT": "int", "BOOLEAN": "boolean", "STRING": "string"}


def test_manifests_match_the_agent_mapping() -> None:
    model = yaml.safe_load((DIR / "devicemodel.yaml").read_text())
    devices = list(yaml.safe_load_all((DIR / "device.yaml").read_text()))
    raw = tomllib.loads((DIR / "kubeedge.toml").read_text())
    settings = parse("kubeedge.toml", KubeEdgeSettings, raw["kubeedge"])
    assert settings.node_name == "demo-node" and settings.namespace == "default"
    model_props = {p["name"]: p["type"] for p in model["spec"]["properties"]}
    for name, kind in model_props.items():
        twins.check_name(name)
        assert kind in TYPE_MAP
    by_id = {f"{d['metadata']['namespace']}/{d['metadata']['name']}": d for d in devices}
    refs = [twins.resolve(settings, agent_device) for agent_device in settings.devices]
    assert {r.device_id for r in refs if r is not None} == set(by_id) == {
        "default/press-1", "default/press-2", "default/press-3"}
    # the demo shows the membership check: exactly one device is bound to another node
    assert sorted(d["spec"]["nodeName"] for d in devices) == ["demo-node", "demo-node", "other-node"]
    for ref in refs:
        assert ref is not None
        device = by_id[ref.device_id]
        assert model["apiVersion"] == device["apiVersion"] == "devices.kubeedge.io/v1beta1"
        assert device["metadata"]["namespace"] == settings.namespace
        assert device["spec"]["deviceModelRef"]["name"] == model["metadata"]["name"]
        device_props = {p["name"] for p in device["spec"]["properties"]}
        mapped = {ref.twin_name(p) for p in ref.mapping.properties}
        assert mapped == set(model_props) == device_props  # twin names that are not spec properties are ignored
        visitors = {p["visitors"]["configData"]["agentProperty"]: p["name"] for p in device["spec"]["properties"]}
        assert {p["visitors"]["configData"]["agentDevice"] for p in device["spec"]["properties"]} == {
            ref.agent_device}
        assert visitors == dict(ref.mapping.properties)
