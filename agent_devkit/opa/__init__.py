"""OPA-ABI policies built from C: the builder (:mod:`.build`) and the demo gate policy (:mod:`.gate`).

``opa_rt.c``/``opa_rt.h`` are a small runtime with OPA's Wasm ABI; ``rbac.c``, ``sandbox.c`` and
``builtins.c`` are policies written against it (built by name: ``build("rbac")``).
"""
