#!/usr/bin/env bash
# Install (or upgrade) edge-agent on a gateway. Idempotent: run it again after pulling a new version.
#
#   sudo bash scripts/packaging/install.sh                 # onto this machine
#   bash scripts/packaging/install.sh --root /tmp/stage    # into a staging root (tests, image builds)
#
# What it does, in order:
#   1. system user/group `edge-agent` (no login, no home)          [skipped with --root]
#   2. venv /opt/edge-agent/venv with this project pip-installed (upgraded in place on re-runs)
#   3. unit /etc/systemd/system/edge-agent.service (replaced by the repo's copy)
#   4. config /etc/edge-agent/agent.toml from configs/agent.example.toml ONLY IF ABSENT (never
#      overwrites a technician's config), mode 0640 root:edge-agent (it may hold the broker password);
#      then validates the config with the installed agent before touching systemd
#   5. state dir /var/lib/edge-agent (0750 edge-agent:edge-agent; systemd's StateDirectory= also makes it)
#   6. systemctl daemon-reload + enable, and try-restart (restarts only if running) — only when
#      systemd is the running init and not in --root mode. It never starts a stopped agent: do that with
#      `systemctl start edge-agent` once the config is right.
#
# --root DIR (or DESTDIR=DIR): everything goes under DIR; no user is created, nothing is chown'ed to
# edge-agent, systemctl is not called. The venv's scripts then carry DIR in their #! lines, so a
# staged venv is for inspection/tests, not for copying onto another machine.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)

root=${DESTDIR:-}
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --root=*) root=${1#--root=}; shift ;;
    --python) python=${2:?--python needs an interpreter}; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
root=${root%/}
if [ -n "$root" ]; then
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
fi

user=edge-agent
prefix="$root/opt/edge-agent"
venv="$prefix/venv"
unit_dst="$root/etc/systemd/system/edge-agent.service"
conf_dir="$root/etc/edge-agent"
conf="$conf_dir/agent.toml"
state="$root/var/lib/edge-agent"

say() { echo "install: $*"; }

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root to install onto this machine (or use --root DIR to stage)" >&2
  exit 2
fi

# 1. user
if [ -n "$root" ]; then
  say "user: skipped (--root mode)"
elif getent passwd "$user" >/dev/null; then
  say "user: $user exists"
else
  useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
    --shell /usr/sbin/nologin --comment "edge-agent daemon" "$user"
  say "user: created $user"
fi

# 2. venv + package
mkdir -p "$prefix"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  say "venv: created $venv"
else
  say "venv: exists $venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$repo"
install -m 0644 "$repo/README.md" "$prefix/README.md"
install -d "$prefix/docs" && install -m 0644 "$repo"/docs/*.md "$prefix/docs/"
say "package: $("$venv/bin/python" -c 'import agent; print("edge-agent", agent.__version__)') installed"

# 3. unit
mkdir -p "$(dirname "$unit_dst")"
if [ -f "$unit_dst" ] && cmp -s "$repo/systemd/edge-agent.service" "$unit_dst"; then
  say "unit: unchanged $unit_dst"
  unit_changed=0
else
  install -m 0644 "$repo/systemd/edge-agent.service" "$unit_dst"
  say "unit: installed $unit_dst"
  unit_changed=1
fi

# 4. config (never overwritten)
mkdir -p "$conf_dir"
if [ -e "$conf" ]; then
  say "config: kept existing $conf"
else
  install -m 0640 "$repo/configs/agent.example.toml" "$conf"
  [ -z "$root" ] && chown "root:$user" "$conf"
  say "config: installed $conf (edit it, then: systemctl start edge-agent)"
fi
if ! "$venv/bin/python" -c 'import sys; from pathlib import Path; from agent.config import load_config
from agent.errors import ConfigError
try:
    load_config(Path(sys.argv[1]))
except ConfigError as exc:
    sys.exit(f"install: config error: {exc}")' "$conf"; then
  echo "install.sh: fix $conf and run install.sh again" >&2
  exit 2
fi
say "config: $conf is valid"

# 5. state dir
mkdir -p "$state"
chmod 0750 "$state"
[ -z "$root" ] && chown "$user:$user" "$state"
say "state: $state"

# 6. systemd
if [ -n "$root" ]; then
  say "systemd: skipped (--root mode)"
elif [ -d /run/systemd/system ]; then
  [ "$unit_changed" = 1 ] && systemctl daemon-reload
  systemctl enable edge-agent.service >/dev/null 2>&1
  systemctl try-restart edge-agent.service
  say "systemd: edge-agent.service enabled ($(systemctl is-active edge-agent.service || true))"
else
  say "systemd: not running here; unit installed but not enabled"
fi
say "done"
