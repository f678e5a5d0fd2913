#!/usr/bin/env bash
# Install everything the agent, its demo and its tests need on a fresh Debian/Ubuntu machine:
# system packages (when missing and root) and a venv at .venv with the project and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto mosquitto-clients)
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v wasm-ld >/dev/null 2>&1 || command -v wasm-ld-14 >/dev/null 2>&1 || need+=(lld)
[ -d /usr/include/wasm32-wasi ] || [ -d /usr/share/wasi-sysroot ] || need+=(wasi-libc)
ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1 \
  || need+=("libclang-rt-$(clang --version 2>/dev/null | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1 || echo 14)-dev-wasm32")
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# the registry tests: CNCF distribution 2.8 (Debian's docker-registry) and htpasswd for its bcrypt users
registry_new=0
command -v docker-registry >/dev/null 2>&1 || { need+=(docker-registry); registry_new=1; }
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  # clang's version decides the compiler-rt package name: install clang first if it was missing
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq clang >/dev/null
    fixed=()
    for p in "${need[@]}"; do
      case "$p" in libclang-rt--dev-wasm32) p="libclang-rt-$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)-dev-wasm32";; esac
      fixed+=("$p")
    done
    apt-get install -y -qq "${fixed[@]}" >/dev/null
    # the tests start their own registries on free loopback ports: the packaged service is not wanted
    if [ "$registry_new" = 1 ] && [ -d /run/systemd/system ]; then
      systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
    fi
  else
    echo "setup: missing system packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: edge-agent needs Python >= 3.11; python3 is $(python3 -V 2>&1)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
