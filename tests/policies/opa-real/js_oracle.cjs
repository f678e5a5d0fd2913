// Oracle driver: evaluate a policy.wasm with the official OPA JS SDK (@open-policy-agent/opa-wasm).
// Used by tests/test_policy_real_opa.py to record / re-check the expected results.
//   node js_oracle.cjs SDK_DIR < job.json > results.json
// job: {"module": "/abs/policy.wasm", "data": "<JSON text>" | null,
//       "calls": [{"entrypoint": "a/b", "input": "<JSON text>" | null}]}
// Inputs and data are passed as exact JSON bytes (ArrayBuffer), so the SDK's JSON.stringify and
// its `if (input)` falsy-input shortcut play no part; "input": null means "no input" (undefined).
// results: [{"ok": <result set>} | {"error": "<what the SDK threw>"}], one per call.
"use strict";
const fs = require("fs");
const path = require("path");

const sdkDir = process.argv[2];
const { loadPolicySync } = require(path.join(sdkDir, "node_modules", "@open-policy-agent", "opa-wasm"));
const job = JSON.parse(fs.readFileSync(0, "utf8"));
const bytes = (text) => {
  const u8 = new TextEncoder().encode(text);
  return u8.buffer.slice(u8.byteOffset, u8.byteOffset + u8.byteLength);
};
const wasm = fs.readFileSync(job.module);
const out = [];
let policy = null;
const fresh = () => {
  policy = loadPolicySync(wasm);
  if (job.data !== null && job.data !== undefined) policy.setData(bytes(job.data));
};
fresh();
for (const call of job.calls) {
  try {
    const input = call.input === null || call.input === undefined ? undefined : bytes(call.input);
    out.push({ ok: policy.evaluate(input, call.entrypoint) });
  } catch (e) {
    out.push({ error: typeof e === "string" ? e : String((e && e.message) || e) });
    fresh(); // like the agent: never reuse an instance after a failure
  }
}
process.stdout.write(JSON.stringify(out));
