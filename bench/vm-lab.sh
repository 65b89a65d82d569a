# shellcheck shell=bash
# The lab of the VM boots, sourced by bench/pxe-vm.sh and bench/ipxe-vm.sh: a network
# namespace of its own with a bridge SUBNET.1/24 and a tap per VM, dnsmasq for DHCP
# only (its DNS and TFTP off; next-server and bootfile point at tftpd), and tftpd
# serving $WORK/root. Everything started is stopped, and the namespace and $WORK
# removed, when the script exits.

NS=tftpd-vm-$$
WORK=$(mktemp -d)
pids=()
lab_cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap lab_cleanup EXIT

chmod 755 "$WORK"  # the workers run as nobody and must read the root
mkdir "$WORK/root"

# lab_start SUBNET TAPS BOOTFILE [TFTPD OPTION...]: the bridge, taps tap0.. (TAPS of
# them), dnsmasq offering BOOTFILE, and tftpd on 0.0.0.0:69, once it listens.
lab_start() {
    local subnet=$1 taps=$2 bootfile=$3
    shift 3
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add br0 type bridge
    ip -n "$NS" addr add "$subnet.1/24" dev br0
    ip -n "$NS" link set br0 up
    local i
    for ((i = 0; i < taps; i++)); do
        ip -n "$NS" tuntap add "tap$i" mode tap
        ip -n "$NS" link set "tap$i" master br0
        ip -n "$NS" link set "tap$i" up
    done
    ip netns exec "$NS" dnsmasq --no-daemon --port=0 --interface=br0 --bind-interfaces \
        --dhcp-range="$subnet.10,$subnet.50,1h" --dhcp-boot="$bootfile,,$subnet.1" \
        --dhcp-leasefile="$WORK/leases" > "$WORK/dnsmasq.log" 2>&1 &
    pids+=($!)
    ip netns exec "$NS" python3 -m tftpd -L -a 0.0.0.0:69 "$@" "$WORK/root" \
        > "$WORK/tftpd.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do grep -q "listening on" "$WORK/tftpd.log" && break; sleep 0.1; done
}

# lab_stop_tftpd: stop tftpd, and wait for the totals it says as it stops.
lab_stop_tftpd() {
    kill "${pids[1]}"
    for _ in $(seq 50); do grep -q "totals:" "$WORK/tftpd.log" && break; sleep 0.1; done
}
