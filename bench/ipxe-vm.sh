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
ROM=${ROM:-/usr/lib/ipxe/qemu/pxe-e1000.rom}
IMAGE_BYTES=$((16 << 20))
. bench/vm-lab.sh

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

lab_start 192.168.78 1 boot.ipxe --http 0.0.0.0:80

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
lab_stop_tftpd

echo "== iPXE"
tr -d '\r' < "$WORK/vm.log" | sed 's/\x1b\[[0-9;]*[a-zA-Z]//g' \
    | grep -a -E "iPXE|DHCP|tftpd:|kernel|http|tftp" | tail -n 20 || true
echo "== tftpd"
cat "$WORK/tftpd.log"
grep -a -q "HTTP-FETCH-OK" "$WORK/vm.log" \
    && grep -q "file=boot.ipxe .*outcome=ok" "$WORK/tftpd.log" \
    && grep -q "file=vmlinuz protocol=http .*bytes=$IMAGE_BYTES .*outcome=ok" "$WORK/tftpd.log"
