"""edge-agent's developer kit: the real peers and builders tests, benchmarks and the demo share.

Installed with the project (``pip install -e '.[test]'``, what ``scripts/setup.sh`` runs) and imported
normally (``from agent_devkit.broker import Broker``). Nothing in ``agent`` imports it. Parts that
build from source (the example modules, the demo gate policy) need a source checkout.

- :mod:`agent_devkit.broker` — a real Mosquitto on a free loopback port, killed by pid;
- :mod:`agent_devkit.localbus` — broker configs that persist sessions, publishers;
- :mod:`agent_devkit.edgecore` — a strict EdgeCore device-twin peer on a real broker;
- :mod:`agent_devkit.uplink` — the cloud side of the outbox uplink (counts every record key);
- :mod:`agent_devkit.registry` — a real OCI registry (Debian's docker-registry) on a free loopback
  port: TLS, htpasswd, a bearer-token issuer, pull-through cache mode;
- :mod:`agent_devkit.tls` — a throw-away PKI; :mod:`agent_devkit.fleet` — a fleet world (broker,
  gateways, manager);
- :mod:`agent_devkit.releases` — keys, really-signed releases, trusting keys in a state dir;
  :mod:`agent_devkit.dsse_independent` — a signer written from the specs, not from ``agent.trust``;
- :mod:`agent_devkit.opa` — the OPA-ABI policy builder (C → Wasm shaped like ``opa build`` output)
  and the demo gate policy;
- :mod:`agent_devkit.examples` — the example and test Wasm modules built from source;
- :mod:`agent_devkit.procs` — agent processes started and killed by pid; :mod:`agent_devkit.demo` —
  the demo's signed releases installed through the real CLI.
"""

from pathlib import Path

#: the source checkout this kit belongs to (examples/, scripts/, configs/)
REPO = Path(__file__).resolve().parents[1]
