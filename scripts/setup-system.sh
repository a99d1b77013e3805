#!/usr/bin/env bash
# Installs the server binaries txrouter's local cluster runs: PostgreSQL (15+), Redis (7) and
# etcd (3.4+), plus NATS and wrk. Idempotent: does nothing when they are present. Needs root (or sudo) and apt to
# install; otherwise it names what is missing and fails.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 \
  || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
# NATS JetStream carries the ledger events (one node per region of the local cluster).
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
# wrk drives `txr bench`'s saturation runs (a C load generator, so the figure is the router's).
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
# jq only for the README's curl examples.
command -v jq >/dev/null 2>&1 || missing+=(jq)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "txrouter needs these packages: ${missing[*]}" >&2
    echo "install them (e.g. 'sudo apt-get install ${missing[*]}') and run make again" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "txrouter needs: ${missing[*]} (no apt-get here: install them with your package manager)" >&2
  exit 1
fi
echo "installing ${missing[*]} ..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
