#!/usr/bin/env bash
# A real PXE boot against tftpd, by hand (not in CI: it needs QEMU and OVMF).
#
#   apt-get install qemu-system-x86 ovmf dnsmasq-base    # once
#   bench/pxe-vm.sh                                       # as root, from the repository
#
# In a network namespace of its own: a bridge 192.168.77.1/24 with a tap for the VM
# (MTU 1500), dnsmasq for DHCP only (its DNS and TFTP off; next-server and bootfile
# point at tftpd), tftpd on 0.0.0.0:69 with a 1 MiB nbp.efi, and OVMF (EDK2's own
# UEFI PXE client on virtio-net). The firmware probes nbp.efi (tsize), downloads it,
# and fails to start it (it is random bytes): the point is the TFTP. Two VMs boot
# at once, a storm of two: the second to ask sends the requests the first sent, which
# tftpd's C data path answers by itself (c_starts in the totals). Prints what the
# firmware said and tftpd's log; exits 0 when the log shows two probes and two whole
# downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
OVMF=${OVMF:-/usr/share/ovmf/OVMF.fd}
. bench/vm-lab.sh

head -c 1048576 /dev/urandom > "$WORK/root/nbp.efi"
lab_start 192.168.77 2 nbp.efi

# Bounded: the firmware tries PXE first; 150 s covers it even without KVM.
vms=()
for i in 0 1; do
    timeout 150 ip netns exec "$NS" qemu-system-x86_64 -m 512 -nographic -no-reboot \
        -bios "$OVMF" -netdev tap,id=n0,ifname=tap$i,script=no,downscript=no \
        -device virtio-net-pci,netdev=n0,romfile=,bootindex=1,mac=52:54:00:77:00:1$i \
        -serial mon:stdio < /dev/null > "$WORK/vm$i.log" 2>&1 &
    vms+=($!)
done
wait "${vms[@]}" || true
cat "$WORK/vm0.log" "$WORK/vm1.log" > "$WORK/vm.log"
for _ in $(seq 50); do  # the last transfer's log line
    [ "$(grep -c 'file=nbp.efi .*outcome=ok' "$WORK/tftpd.log")" -ge 2 ] && break
    sleep 0.1
done
lab_stop_tftpd

echo "== the firmware"
tr -d '\r' < "$WORK/vm.log" | sed 's/\x1b\[[0-9;]*[a-zA-Z]//g' \
    | grep -a -E "PXE over IPv4|Station IP|NBP|PXE-E" || true
echo "== tftpd"
cat "$WORK/tftpd.log"
[ "$(grep -c "file=nbp.efi .*outcome=probe" "$WORK/tftpd.log")" -ge 2 ] \
    && [ "$(grep -c "file=nbp.efi .*bytes=1048576 .*outcome=ok" "$WORK/tftpd.log")" -ge 2 ]
