"""runtime package: the shared Wasm engine and the workload-module runtime.

``agent.config`` is imported first on purpose: the config model imports this package's
``settings`` module, so entering through ``agent.runtime.*`` must not start that cycle halfway.
"""

import agent.config  # noqa: F401
