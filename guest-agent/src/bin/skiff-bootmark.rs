//! `skiff-bootmark`: tells the VMM the guest has booted, by writing the
//! boot-complete value (123) to the VMM's debug port 0x3f0, as Firecracker's
//! guests do. For guests that do not run skiff-agent (a plain busybox
//! initramfs in tests and benchmarks). Needs root (ioperm).

const BOOT_PORT: u16 = 0x3f0;
const BOOT_COMPLETE: u8 = 123;

fn main() -> std::process::ExitCode {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(BOOT_PORT), 1, 1) } != 0 {
        eprintln!(
            "skiff-bootmark: ioperm(0x3f0): {}",
            std::io::Error::last_os_error()
        );
        return std::process::ExitCode::from(1);
    }
    // SAFETY: ioperm above granted this process access to exactly this port;
    // the write has no effect on this process's memory.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") BOOT_PORT, in("al") BOOT_COMPLETE, options(nomem, nostack, preserves_flags));
    }
    std::process::ExitCode::SUCCESS
}
