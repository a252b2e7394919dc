//! Firecracker's boot-complete marker: init writes 123 to I/O port 0x3f0,
//! which the VMM traps to time the boot up to userspace.

use std::io;

/// The port the VMM watches.
pub const BOOT_MARK_PORT: u16 = 0x3f0;
/// The value that means "init is running".
pub const BOOT_MARK_VALUE: u8 = 123;

/// Writes the marker. Only meaningful as PID 1 in a VM.
#[cfg(target_arch = "x86_64")]
pub fn write() -> io::Result<()> {
    // SAFETY: asks the kernel for access to one I/O port for this process;
    // needs CAP_SYS_RAWIO and changes nothing else.
    if unsafe { libc::ioperm(BOOT_MARK_PORT.into(), 1, 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ioperm above granted this process the port, so `out` does
    // not fault; the byte goes to the VMM, which traps the access (there
    // is no device at 0x3f0 in a Skiff or Firecracker VM). No memory, stack
    // or flags are touched.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") BOOT_MARK_PORT,
            in("al") BOOT_MARK_VALUE,
            options(nomem, nostack, preserves_flags)
        );
    }
    Ok(())
}

/// Writes the marker. No I/O ports on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn write() -> io::Result<()> {
    Ok(())
}
