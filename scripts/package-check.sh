#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (Cargo.toml's [package.metadata.deb]) and checks it:
# lists it (`dpkg-deb -c`, the control files and conffiles), runs lintian and fails on any
# lintian error, and renders the man page with `man -l` once the package ships one.
# Writes target/package-check/: masqd.deb, contents.txt (dpkg-deb -c), control.txt (its fields),
# control/ (its control files: conffiles, maintainer scripts), lintian.txt, and masqd (the
# packaged binary); tests/package.rs reads them. Needs no root. The release build gets a target directory of
# its own (target/package-check/target), so that this can run inside `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/package-check
for tool in dpkg-deb lintian man; do
    command -v "$tool" >/dev/null || {
        echo "package-check: $tool is missing (sudo bash scripts/install-deps.sh)" >&2
        exit 1
    }
done
cargo deb --version >/dev/null 2>&1 || {
    echo "package-check: cargo-deb is missing (sudo bash scripts/install-deps.sh)" >&2
    exit 1
}
mkdir -p "$out"
rm -rf "$out"/*.deb "$out"/*.txt "$out/control" "$out/masqd"
CARGO_TARGET_DIR="$out/target" cargo deb --locked --output "$out/masqd.deb"
deb="$out/masqd.deb"

dpkg-deb -c "$deb" | tee "$out/contents.txt"
dpkg-deb -f "$deb" | tee "$out/control.txt"
ctrl="$out/control"
dpkg-deb -e "$deb" "$ctrl"
echo "conffiles:" && cat "$ctrl/conffiles"
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/sbin/masqd >"$out/masqd"
for s in postinst prerm postrm; do
    [ -x "$ctrl/$s" ] || {
        echo "package-check: the package has no executable $s" >&2
        exit 1
    }
done

# --fail-on error: warnings and infos are printed but do not fail the check.
rc=0
lintian --fail-on error --tag-display-limit 0 "$deb" >"$out/lintian.txt" 2>&1 || rc=$?
cat "$out/lintian.txt"
if ((rc != 0)); then
    echo "package-check: lintian reports errors (above)" >&2
    exit 1
fi

# The man page (once the package has it): it must render without a warning.
man_entry=$(awk '{print $NF}' "$out/contents.txt" | grep -E '^\./usr/share/man/man8/masqd\.8(\.gz)?$' || true)
if [ -n "$man_entry" ]; then
    page=$(mktemp)
    trap 'rm -f "$page"' EXIT
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "$man_entry" >"$page"
    warnings=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null || true)
    if [ -n "$warnings" ]; then
        echo "package-check: the man page does not render cleanly: $warnings" >&2
        exit 1
    fi
    echo "man page: renders"
fi
echo "package-check: ok ($deb)"
