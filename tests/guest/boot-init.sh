#!/bin/sh
# /init of the boot-test initramfs: reports what the guest sees as
# SKIFF-<KEY>=<value> lines on the serial console, then ends as the kernel
# command line's skiff.end= says (poweroff, reboot, or wait).
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/skiff-bootmark || echo "SKIFF-BOOTMARK-FAILED"
echo "SKIFF-INIT-OK"
echo "SKIFF-UPTIME=$($B cut -d" " -f1 /proc/uptime)"
echo "SKIFF-NPROC=$($B grep -c ^processor /proc/cpuinfo)"
echo "SKIFF-ONLINE=$($B cat /sys/devices/system/cpu/online)"
echo "SKIFF-MEMTOTAL-KB=$($B awk '/^MemTotal:/{print $2}' /proc/meminfo)"
echo "SKIFF-E820-KB=$($B dmesg | $B sed -n 's/.*Memory: [0-9]*K\/\([0-9]*\)K available.*/\1/p')"
echo "SKIFF-ACPI-TABLES=$($B ls /sys/firmware/acpi/tables 2>/dev/null | $B tr '\n' ' ')"
echo "SKIFF-APIC-IDS=$($B awk '/^apicid/{printf "%s ", $3}' /proc/cpuinfo)"
# Boot phases and initcalls of 1 ms or more (with initcall_debug), for
# bench/boot; skiff.dmesg=all prints the whole log.
case "$($B cat /proc/cmdline)" in *skiff.dmesg=all*) $B dmesg | $B sed 's/^/SKIFF-DMESG /' ;; esac
case "$($B cat /proc/cmdline)" in *skiff.dmesg=1*) $B dmesg | $B grep -E "after [0-9]{4,} usecs|Run /init|clocksource|tsc:|smp: |ACPI: Interpreter|PCI: Using|Serial: 8250|i8042|Unpacking initramfs|Freeing initrd|Freeing unused kernel" | $B sed 's/^/SKIFF-DMESG /' ;; esac
case "$($B cat /proc/cmdline)" in *skiff.kcheck=1*) /bin/skiff-kernel-check ;; esac
end=$($B sed -n 's/.*skiff\.end=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "SKIFF-END=$end"
case "$end" in
  reboot) $B reboot -f ;;
  wait) while :; do $B sleep 3600; done ;;
  *) $B poweroff -f ;;
esac
