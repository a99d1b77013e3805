#!/usr/bin/env bash
# Same-shard transfer load through one router of a running local cluster, for
# /work/shared/tools/cpu_per_transfer.py:  scripts/transfer_load.sh DIR [SECONDS] [REGION]
# Opens a funded source and a destination in REGION's home shard, then runs wrk (64
# connections) posting 1-unit transfers; prints wrk's summary and acked=N last.
set -euo pipefail
dir=$1; secs=${2:-15}; region=${3:-us-east}
py=${PYTHON:-.venv/bin/python}
read -r url token src dst < <("$py" - "$dir" "$region" <<'PY'
import json, sys, urllib.request
from pathlib import Path
from infra.local import cluster as lc
d, region = Path(sys.argv[1]), sys.argv[2]
url = lc.status(d)["regions"][region]["router"]
tok = lc.token(d, "load", ["accounts:read", "accounts:write", "transfers:write", "admin"], 3600)
def open_(overdraft):
    body = json.dumps({"currency": "EUR", "home_region": region, "overdraft_limit": overdraft}).encode()
    req = urllib.request.Request(url + "/v1/accounts", body, {"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))["id"]
print(url, tok, open_(10**12), open_(0))
PY
)
here=$(cd "$(dirname "$0")" && pwd)
TXR_TOKEN=$token TXR_SRC=$src TXR_DST=$dst wrk -t2 -c64 -d"${secs}s" -s "$here/transfer_load.lua" "$url"
