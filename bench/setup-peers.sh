#!/bin/sh
# Install the TFTP servers that bench/ compares tftpd with (Debian 12), as root.
#
#   tftpd-hpa      in.tftpd, run standalone and per request under openbsd-inetd
#   dnsmasq-base   dnsmasq, run as TFTP only
#   openbsd-inetd  inetd, for the per-request tftp-hpa setup
#   atftpd         conflicts with tftpd-hpa as a package: its .deb is unpacked into
#                  bench/.peers/atftpd/ (gitignored) and run from there.
#
# Installing tftpd-hpa starts the package's own daemon on port 69 of this machine; the
# benchmark never uses it (every server under test runs in a namespace of its own), so
# this script stops it and keeps it from starting at boot.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
peers="$here/.peers"

if [ "$(id -u)" != 0 ]; then
    echo "setup-peers.sh: run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    tftpd-hpa dnsmasq-base openbsd-inetd nftables iproute2 gcc libc6-dev >/dev/null

# Stop the daemon the tftpd-hpa package started (service scripts where they exist; then
# the pid file the init script writes).
if command -v service >/dev/null 2>&1; then
    service tftpd-hpa stop >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/tftpd-hpa ]; then
    /etc/init.d/tftpd-hpa stop >/dev/null 2>&1 || true
fi
if [ -f /run/tftpd-hpa.pid ]; then
    pid=$(cat /run/tftpd-hpa.pid)
    if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && grep -q tftpd "/proc/$pid/comm"; then
        kill "$pid" || true
    fi
fi
if command -v update-rc.d >/dev/null 2>&1; then
    update-rc.d tftpd-hpa disable >/dev/null 2>&1 || true
fi
# inetd itself may have been started by its package with an empty configuration; the
# benchmark runs its own inetd per namespace, so the system one is left as it is.

# atftpd: unpack, do not install.
mkdir -p "$peers"
if [ ! -x "$peers/atftpd/usr/sbin/atftpd" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download atftpd >/dev/null)
    rm -rf "$peers/atftpd"
    dpkg-deb -x "$tmp"/atftpd_*.deb "$peers/atftpd"
    dpkg-deb -f "$tmp"/atftpd_*.deb Version >"$peers/atftpd/VERSION"
    rm -rf "$tmp"
fi

# Python side: plots and (optionally) pyroute2.
python3 -m pip install -q matplotlib pytest-benchmark >/dev/null 2>&1 || \
    echo "setup-peers.sh: pip install matplotlib pytest-benchmark failed; plots are skipped" >&2

echo "in.tftpd:  $(dpkg-query -W -f='${Version}' tftpd-hpa)"
echo "dnsmasq:   $(dpkg-query -W -f='${Version}' dnsmasq-base)"
echo "inetd:     $(dpkg-query -W -f='${Version}' openbsd-inetd)"
echo "atftpd:    $(cat "$peers/atftpd/VERSION") (unpacked in $peers/atftpd)"
