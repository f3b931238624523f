#!/usr/bin/env bash
# Fails when a package of the locked dependency tree needs a newer Rust than Cargo.toml's
# `rust-version` (the minimum masqd states): every package that a build of masqd on this
# platform compiles (normal, build and dev dependencies, as Cargo.lock pins them), read from
# `cargo metadata --locked`. Prints the highest requirement found and each offender.
# Needs no network once the crates are fetched (`--offline` is tried first).
# Usage: scripts/check-msrv.sh [VERSION]   (VERSION instead of Cargo.toml's, e.g. to try 1.88)
set -euo pipefail
cd "$(dirname "$0")/.."

host=$(rustc -vV | sed -n 's/^host: //p')
meta=$(mktemp)
trap 'rm -f "$meta"' EXIT
if ! cargo metadata --format-version 1 --locked --offline --filter-platform "$host" >"$meta" 2>/dev/null; then
    cargo metadata --format-version 1 --locked --filter-platform "$host" >"$meta"
fi

python3 - "$meta" "${1:-}" <<'PY'
import json
import sys

def ver(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

meta = json.load(open(sys.argv[1]))
packages = {p["id"]: p for p in meta["packages"]}
root_id = meta["resolve"]["root"]
root = packages[root_id]
stated = sys.argv[2] or root.get("rust_version")
if not stated:
    sys.exit("check-msrv: Cargo.toml states no rust-version")
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
# Everything reachable from masqd: the tree a build of the package and its tests compiles.
seen, todo = set(), [root_id]
while todo:
    pid = todo.pop()
    if pid in seen:
        continue
    seen.add(pid)
    todo.extend(d["pkg"] for d in nodes[pid]["deps"])
needs = sorted(
    ((ver(packages[p]["rust_version"]), packages[p]["name"], packages[p]["version"])
     for p in seen if p != root_id and packages[p].get("rust_version")),
    reverse=True,
)
if not needs:
    sys.exit("check-msrv: no locked package states a rust-version (is the lock file empty?)")
top = needs[0]
print(f"check-msrv: rust-version {stated}; {len(seen) - 1} locked packages, the highest "
      f"requirement {'.'.join(map(str, top[0]))} ({top[1]} {top[2]})")
over = [n for n in needs if n[0] > ver(stated)]
for v, name, version in over:
    print(f"check-msrv: {name} {version} needs Rust {'.'.join(map(str, v))}, "
          f"more than rust-version {stated}", file=sys.stderr)
if over:
    sys.exit(f"check-msrv: raise rust-version in Cargo.toml to "
             f"{'.'.join(map(str, over[0][0]))} (or lock older versions)")
PY
