#!/bin/sh
# /init of the devices-test initramfs (tests/tests/devices.rs, bench/devices):
# loads the virtio modules, lists the PCI devices on the serial console as
# SKIFF-PCI=<address> <vendor> <device> <driver> <MSI vectors> lines, then
# serves skiff-guest-tools on vsock port 1024 (the host runs its commands
# through it; see tests/guest-tools/src/main.rs) until the host powers it off.
# With skiff.bench=MIB on the command line it first benchmarks /dev/vda
# (O_DIRECT sequential write and read of MIB MiB) and prints SKIFF-BLK=...
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
$B mkdir -p /tmp /mnt /etc
for m in $($B cat /lib/modules/load-order); do
  $B insmod "$m" || echo "SKIFF-INSMOD-FAILED=$m"
done
$B ip link set lo up
# udhcpc only talks DHCP; this script applies what it gets.
$B cat > /etc/udhcpc.sh <<'EOF'
#!/bin/sh
case "$1" in
  bound|renew)
    /bin/busybox ip addr flush dev "$interface"
    /bin/busybox ip addr add "$ip/${mask:-24}" dev "$interface"
    echo "udhcpc: $interface bound $ip/${mask:-24} router ${router:-none}" ;;
esac
EOF
$B chmod 755 /etc/udhcpc.sh
echo "SKIFF-INIT-OK"
# Give the virtio drivers a moment to finish probing before listing.
i=0
while [ $i -lt 50 ] && [ "$($B ls /sys/bus/virtio/devices | $B wc -l)" -gt "$($B ls /sys/bus/virtio/drivers/*/ 2>/dev/null | $B grep -c '^virtio')" ]; do
  $B usleep 100000; i=$((i + 1))
done
for d in /sys/bus/pci/devices/*; do
  drv=-; [ -e "$d/driver" ] && drv=$($B basename "$($B readlink "$d/driver")")
  msi=0; [ -d "$d/msi_irqs" ] && msi=$($B ls "$d/msi_irqs" | $B wc -l)
  echo "SKIFF-PCI=${d##*/} $($B cat "$d/vendor") $($B cat "$d/device") $drv $msi"
done
mib=$($B sed -n 's/.*skiff\.bench=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$mib" ]; then
  echo "SKIFF-BLK=$(/bin/skiff-guest-tools blk-bench /dev/vda "$mib" 2>&1)"
fi
/bin/skiff-guest-tools serve 1024 &
while :; do $B sleep 3600; done
