#!/usr/bin/env bash
# Installs runnel as a systemd service on a gateway. Run as root:
#
#   install.sh PATH/TO/runnel PATH/TO/pipeline.toml [STAGES_DIR]
#
# Puts the binary in /usr/local/bin, the pipeline in /etc/runnel/pipeline.toml
# and STAGES_DIR/*.wasm in /etc/runnel/stages/ (so the pipeline names them
# "stages/NAME.wasm": its paths are relative to itself), checks the pipeline
# as the `runnel` user, then enables and (re)starts runnel.service. Run it
# again to upgrade: the new binary, pipeline and stages are checked together
# before any of them replaces what is installed, and /etc/runnel/env is never
# overwritten.
#
# RUNNEL_ROOT=DIR installs under DIR instead of / for a trial run: no user is
# created, nothing is chowned, the checks run as the calling user (and are
# skipped if the binary is for another machine), and systemd is left alone.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=${RUNNEL_ROOT:-}
root=${root%/}

say() { echo "install: $*"; }
die() {
  echo "install: $*" >&2
  exit 1
}

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 PATH/TO/runnel PATH/TO/pipeline.toml [STAGES_DIR]" >&2
  exit 2
fi
binary=$1
pipeline=$2
stages=${3:-}
unit="$here/runnel.service"

if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then die "$binary is not an executable file"; fi
[ -f "$pipeline" ] || die "$pipeline is not a file"
[ -z "$stages" ] || [ -d "$stages" ] || die "$stages is not a directory"
[ -f "$unit" ] || die "$unit is missing (keep install.sh beside runnel.service)"
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (or set RUNNEL_ROOT=DIR for a trial install into DIR)"
fi
wasm=()
if [ -n "$stages" ]; then
  shopt -s nullglob
  wasm=("$stages"/*.wasm)
  shopt -u nullglob
  [ ${#wasm[@]} -gt 0 ] || die "no .wasm files in $stages"
fi

# Ownership flags for install(1); none for a trial run, whose files stay the
# caller's.
own=()
owned() {
  own=()
  [ -n "$root" ] || own=(-o "$1" -g "$2")
}

if [ -z "$root" ]; then
  if id -u runnel >/dev/null 2>&1; then
    say "user runnel exists"
  else
    nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/sbin/nologin
    group=(--user-group)
    if getent group runnel >/dev/null; then group=(--gid runnel); fi
    useradd --system --no-create-home --home-dir /var/lib/runnel \
      --shell "$nologin" "${group[@]}" runnel
    say "created system user runnel"
  fi
fi

etc="$root/etc/runnel"
cache="$root/var/cache/runnel"
owned root root
install -d -m 0755 "${own[@]}" "$root/usr/local/bin" "$etc" "$etc/stages" "$root/etc/systemd/system"
# TLS keys go here: readable by the service, not by other users.
owned root runnel
install -d -m 0750 "${own[@]}" "$etc/certs"
# What the unit's StateDirectory= and CacheDirectory= make; made now so the
# check can fill the cache the service then loads its stages from.
owned runnel runnel
install -d -m 0750 "${own[@]}" "$root/var/lib/runnel" "$cache"

# `runnel check` as the service's user, so files it cannot read show up now.
# The binary may be for another machine only on a trial run.
can_check=1
if ! "$binary" --version >/dev/null 2>&1; then
  [ -n "$root" ] || die "$binary does not run on this machine (built for another architecture?)"
  say "the binary does not run on this machine (built for the gateway?): skipping the checks"
  can_check=
fi
check() { # BINARY PIPELINE
  local cmd=(env RUNNEL_CACHE_DIR="$cache" "$1" check "$2")
  [ -n "$root" ] || cmd=(runuser -u runnel -- "${cmd[@]}")
  (cd / && "${cmd[@]}")
}

# The new binary, pipeline and stages are first checked together in a
# staging folder laid out like /etc/runnel (stages/ beside the pipeline, with
# the stages installed now), so a failed check leaves the installed ones as
# they were.
staging=$(mktemp -d "$etc/.install.XXXXXX")
trap 'rm -rf "$staging"' EXIT
owned root runnel
install -d -m 0750 "${own[@]}" "$staging" "$staging/stages"
owned root root
install -m 0755 "${own[@]}" "$binary" "$staging/runnel"
owned root runnel
install -m 0640 "${own[@]}" "$pipeline" "$staging/pipeline.toml"
owned root root
cp -pR "$etc/stages/." "$staging/stages/"
[ ${#wasm[@]} -eq 0 ] || install -m 0644 "${own[@]}" "${wasm[@]}" "$staging/stages/"
if [ -n "$can_check" ]; then
  say "checking the new pipeline and stages with the new binary"
  if ! check "$staging/runnel" "$staging/pipeline.toml"; then
    echo "install: runnel check failed (on a copy laid out like $etc); nothing installed was changed." >&2
    echo "install: stage paths are relative to the pipeline file: wasm = \"stages/NAME.wasm\" for STAGES_DIR/NAME.wasm." >&2
    exit 1
  fi
fi

# Into place. The binary goes in under a new name and is then renamed, so a
# running runnel keeps the file it was started from.
owned root root
mv -f "$staging/runnel" "$root/usr/local/bin/runnel.new"
mv -f "$root/usr/local/bin/runnel.new" "$root/usr/local/bin/runnel"
say "installed $root/usr/local/bin/runnel ($("$root/usr/local/bin/runnel" --version 2>/dev/null || echo "for another machine"))"
if [ ${#wasm[@]} -gt 0 ]; then
  install -m 0644 "${own[@]}" "${wasm[@]}" "$etc/stages/"
  say "installed ${#wasm[@]} stage(s) in $etc/stages/"
fi
if [ -f "$etc/pipeline.toml" ] && ! cmp -s "$pipeline" "$etc/pipeline.toml"; then
  cp -p "$etc/pipeline.toml" "$etc/pipeline.toml.old"
  say "kept the previous pipeline as $etc/pipeline.toml.old"
fi
mv -f "$staging/pipeline.toml" "$etc/pipeline.toml"
say "installed $etc/pipeline.toml"
install -m 0644 "${own[@]}" "$unit" "$root/etc/systemd/system/runnel.service"
say "installed $root/etc/systemd/system/runnel.service"

if [ ! -e "$etc/env" ]; then
  (
    umask 077
    cat >"$etc/env" <<'EOF'
# Environment of runnel.service (systemd EnvironmentFile= syntax: NAME=value,
# one a line). Mode 0600: it holds the MQTT credentials that the pipeline's
# [mqtt.NAME] tables name with username_env and password_env.
#RUNNEL_UPSTREAM_USER=
#RUNNEL_UPSTREAM_PASSWORD=
# Log filter (default info), e.g. RUST_LOG=info,runnel=debug
#RUST_LOG=info
EOF
  )
  say "created $etc/env (mode 0600): put the MQTT credentials there"
else
  say "kept $etc/env"
fi

# The file the service will run, in place: quick, the stages are cached now.
if [ -n "$can_check" ]; then
  say "checking $etc/pipeline.toml"
  check "$root/usr/local/bin/runnel" "$etc/pipeline.toml" ||
    die "runnel check of $etc/pipeline.toml failed; the service was not (re)started"
fi

if [ -n "$root" ]; then
  say "trial install into $root: systemd left alone"
  exit 0
fi
if [ ! -d /run/systemd/system ]; then
  say "systemd is not running here (a container?): runnel was not enabled or started."
  say "where systemd runs: systemctl daemon-reload && systemctl enable --now runnel"
  exit 0
fi

systemctl daemon-reload
if systemctl is-active --quiet runnel; then
  systemctl enable runnel
  systemctl restart runnel
  say "restarted runnel"
else
  systemctl enable --now runnel
  say "enabled and started runnel"
fi
# A pipeline that fails soon after starting (a broker refusing the
# credentials, say) shows here rather than only in the journal.
sleep 3
if systemctl is-active --quiet runnel; then
  say "runnel is running; logs: journalctl -u runnel -f"
else
  systemctl --no-pager status runnel >&2 || true
  die "runnel is not running; see journalctl -u runnel"
fi
