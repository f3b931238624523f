#!/usr/bin/env bash
# Installs what masqd's build, demo, tests and packaging need (the Rust toolchain is assumed):
# Debian packages, then kubernetes-validate (PyPI, pinned) in a venv and cargo-deb (crates.io,
# pinned) when they are missing.
# libclang-dev: rustables generates its kernel bindings with bindgen at build time.
# docker.io (dockerd 20.10) and containerd: tests/dockerd.rs runs a real Docker daemon inside a
# test's network namespace. prometheus: tests/metrics.rs checks `/metrics` with its promtool (the
# package also ships the server and its unit, which must not start). Nothing may start in the
# host's namespaces, so the install runs with a /usr/sbin/policy-rc.d that refuses every service
# start (exit 101); an existing one that already refuses is left alone, any other is restored
# afterwards.
# python3-venv: the venv of kubernetes-validate (tests/deploy.rs validates deploy/kubernetes/
# with it, offline: it ships the API schemas). lintian and man-db: scripts/package-check.sh
# (lintian checks the .deb; `man -l` renders the man page).
set -euo pipefail

# tests/deploy.rs passes a Kubernetes version whose schemas this release ships.
KUBERNETES_VALIDATE_VERSION=1.37.0
VENV=/opt/masqd-venv
CARGO_DEB_VERSION=3.8.0

pkgs=(libclang-dev nftables iptables iproute2 socat systemd containerd docker.io prometheus
    python3-venv lintian man-db)
need=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done

policy=/usr/sbin/policy-rc.d
policy_backup=
policy_created=0
restore_policy() {
    if ((policy_created)); then
        rm -f "$policy"
    elif [ -n "$policy_backup" ]; then
        mv -f "$policy_backup" "$policy"
    fi
}

install_debs() {
    trap restore_policy EXIT
    # policy-rc.d's contract: exit 101 means "action forbidden".
    local rc=0
    if [ -x "$policy" ]; then
        "$policy" docker start >/dev/null 2>&1 || rc=$?
    fi
    if ((rc != 101)); then
        if [ -e "$policy" ] || [ -L "$policy" ]; then
            policy_backup=$(mktemp "$policy.masqd-backup.XXXXXX")
            cp -a "$policy" "$policy_backup"
        else
            policy_created=1
        fi
        printf '#!/bin/sh\n# written by masqd scripts/install-deps.sh for the install only\nexit 101\n' >"$policy.tmp"
        chmod 755 "$policy.tmp"
        mv -f "$policy.tmp" "$policy"
    fi

    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    restore_policy
    trap - EXIT

    # The packages' services must not have started on the host.
    case " ${need[*]} " in *" docker.io "* | *" containerd "* | *" prometheus "*) ;; *) return 0 ;; esac
    local d
    for d in dockerd containerd prometheus; do
        if pgrep -x "$d" >/dev/null; then
            echo "error: $d is running after the install (pids $(pgrep -x "$d" | tr '\n' ' '));" \
                "masqd's tests start their own inside network namespaces and never the host's" >&2
            exit 1
        fi
    done
}

if ((${#need[@]} > 0)); then
    install_debs
fi

# kubernetes-validate in a venv of its own, made with Debian's python3 (not whichever python3
# comes first on PATH).
if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "installing: kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV" >&2
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# cargo-deb: scripts/package-check.sh builds the .deb with it.
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    echo "installing: cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install -q --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi
