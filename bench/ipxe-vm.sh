#!/usr/bin/env bash
# A real iPXE boot that goes from TFTP to HTTP, by hand (not in CI: it needs QEMU).
#
#   apt-get install qemu-system-x86 ipxe-qemu seabios dnsmasq-base    # once
#   bench/ipxe-vm.sh                                                   # as root
#
# In a network namespace of its own: a bridge 192.168.78.1/24 with a tap for the VM,
# dnsmasq for DHCP only (bootfile boot.ipxe, next-server tftpd), and tftpd serving
# one root on 0.0.0.0:69 (TFTP) and 0.0.0.0:80 (HTTP). SeaBIOS runs iPXE's e1000
# option ROM, which loads boot.ipxe by TFTP; the script fetches a 16 MiB kernel-sized
# image by HTTP from the same root and checks its length. Prints what iPXE said and
# tftpd's log; exits 0 when the log shows boot.ipxe served by TFTP and the image by HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
NS=tftpd-ipxe-$$
WORK=$(mktemp -d)
ROM=${ROM:-/usr/lib/ipxe/qemu/pxe-e1000.rom}
IMAGE_BYTES=$((16 << 20))
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

chmod 755 "$WORK"  # the workers run as nobody and must read the root
mkdir "$WORK/root"
head -c "$IMAGE_BYTES" /dev/urandom > "$WORK/root/vmlinuz"
cat > "$WORK/root/boot.ipxe" <<EOF
#!ipxe
echo tftpd: boot.ipxe came by TFTP
imgfetch --name kernel http://192.168.78.1/vmlinuz || goto failed
imgstat
echo tftpd: HTTP-FETCH-OK
exit
:failed
echo tftpd: HTTP-FETCH-FAILED
exit
EOF

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" addr add 192.168.78.1/24 dev br0
ip -n "$NS" link set br0 up
ip -n "$NS" tuntap add tap0 mode tap
ip -n "$NS" link set tap0 master br0
ip -n "$NS" link set tap0 up

ip netns exec "$NS" dnsmasq --no-daemon --port=0 --interface=br0 --bind-interfaces \
    --dhcp-range=192.168.78.10,192.168.78.50,1h --dhcp-boot=boot.ipxe,,192.168.78.1 \
    --dhcp-leasefile="$WORK/leases" > "$WORK/dnsmasq.log" 2>&1 &
pids+=($!)
ip netns exec "$NS" python3 -m tftpd -L -a 0.0.0.0:69 --http 0.0.0.0:80 "$WORK/root" \
    > "$WORK/tftpd.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q "listening on" "$WORK/tftpd.log" && break; sleep 0.1; done

# Bounded: SeaBIOS, iPXE's DHCP, the script and the image take well under 120 s
# emulated (no KVM: iPXE 1.0.0's e1000 driver stalls under it on some hosts).
timeout 120 ip netns exec "$NS" qemu-system-x86_64 -m 256 -nographic -no-reboot \
    -boot n -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device "e1000,netdev=n0,romfile=$ROM,bootindex=1,mac=52:54:00:78:00:10" \
    -serial mon:stdio < /dev/null > "$WORK/vm.log" 2>&1 &
vm=$!
for _ in $(seq 1200); do  # 120 s: until iPXE says how the fetch went
    grep -a -q "HTTP-FETCH-" "$WORK/vm.log" && break
    kill -0 "$vm" 2>/dev/null || break
    sleep 0.1
done
kill "$vm" 2>/dev/null || true
wait "$vm" 2>/dev/null || true
kill "${pids[1]}"  # tftpd: its totals
for _ in $(seq 50); do grep -q "totals:" "$WORK/tftpd.log" && break; sleep 0.1; done

echo "== iPXE"
tr -d '\r' < "$WORK/vm.log" | sed 's/\x1b\[[0-9;]*[a-zA-Z]//g' \
    | grep -a -E "iPXE|DHCP|tftpd:|kernel|http|tftp" | tail -n 20 || true
echo "== tftpd"
cat "$WORK/tftpd.log"
grep -a -q "HTTP-FETCH-OK" "$WORK/vm.log" \
    && grep -q "file=boot.ipxe .*outcome=ok" "$WORK/tftpd.log" \
    && grep -q "file=vmlinuz protocol=http .*bytes=$IMAGE_BYTES .*outcome=ok" "$WORK/tftpd.log"
