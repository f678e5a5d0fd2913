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

# Property updates: allowed; values of properties listed in data.edge.limits are clamped.
decision := {"allow": true, "reason": "property update", "clamp": {"": data.edge.limits[input.property.name]}} if {
	input.kind == "property"
	data.edge.limits[input.property.name]
}

decision := {"allow": true, "reason": "property update"} if {
	input.kind == "property"
	not data.edge.limits[input.property.name]
}
