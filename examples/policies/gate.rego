# The demo's gate policy (edge-agent pipeline contract, entrypoint edge/decision).
# gate.c is this policy hand-compiled to the OPA Wasm ABI (no OPA compiler on the build box);
# `opa build -t wasm -e edge/decision gate.rego` produces an equivalent policy.wasm.
package edge

import rego.v1

# Actuations: only fan commands under actuators/, never for a device under maintenance lockout.
# The sensor value the module copied into the command is masked: actuators need the command only.
default decision := {"allow": false, "reason": "only actuators/<line>/<sensor>/fan commands are allowed"}

decision := {"allow": false, "reason": "device is locked out for maintenance"} if {
	input.kind == "actuation"
	input.actuation.payload.device in data.edge.lockout
}

# fields masked from fan commands: data.edge.mask, by default the sensor value
mask := object.get(data.edge, "mask", ["value"])

decision := {"allow": true, "reason": "fan command", "mask": mask} if {
	input.kind == "actuation"
	startswith(input.actuation.topic, "actuators/")
	endswith(input.actuation.topic, "/fan")
	not input.actuation.payload.device in data.edge.lockout
}

# Property updates of an actuated state (data.edge.actuated, by default the fan) for a locked-out device:
# denied. Its actuations are denied, so such a property would claim a change that never happened in the
# world (and KubeEdge twins mirror properties: no twin claims it either). Sensor properties stay allowed.
actuated := object.get(data.edge, "actuated", ["fan"])

locked_state if {
	input.kind == "property"
	input.property.device in data.edge.lockout
	input.property.name in actuated
}

decision := {"allow": false, "reason": "device is locked out for maintenance: actuated state not changed"} if {
	locked_state
}

# Other property updates: allowed; values of properties listed in data.edge.limits are clamped.
decision := {"allow": true, "reason": "property update", "clamp": {"": data.edge.limits[input.property.name]}} if {
	input.kind == "property"
	not locked_state
	data.edge.limits[input.property.name]
}

decision := {"allow": true, "reason": "property update"} if {
	input.kind == "property"
	not locked_state
	not data.edge.limits[input.property.name]
}
