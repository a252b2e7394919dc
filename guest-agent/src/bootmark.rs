//! Firecracker's boot-complete marker: init writes 123 to I/O port 0x3f0,
//! which the VMM traps to time the boot up to userspace.
//!
//! The `out` instruction runs in a forked child: if the CPU faults it
//! anyway (seen under nested virtualisation on QEMU's software CPU, where
//! `ioperm` succeeded and `out` still raised #GP), only the child dies —
//! init must never take a SIGSEGV. [`write_dev_port`] is the fallback once
//! /dev is mounted: the kernel does the `out` for us.

use std::io;
use std::os::unix::fs::FileExt;

/// The port the VMM watches.
pub const BOOT_MARK_PORT: u16 = 0x3f0;
/// The value that means "init is running".
pub const BOOT_MARK_VALUE: u8 = 123;

/// Writes the marker with `ioperm` + `out` in a child process. Call it
/// while single-threaded (PID 1, first thing).
#[cfg(target_arch = "x86_64")]
pub fn write() -> io::Result<()> {
    // SAFETY: the process is single-threaded here, so the child may run
    // any code; it only makes syscalls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: asks the kernel for access to one I/O port for this
        // process; needs CAP_SYS_RAWIO and changes nothing else.
        if unsafe { libc::ioperm(BOOT_MARK_PORT.into(), 1, 1) } < 0 {
            // SAFETY: leaving the child without running parent state's
            // destructors.
            unsafe { libc::_exit(1) };
        }
        // SAFETY: ioperm above granted this process the port; the byte goes
        // to the VMM, which traps the access (no device sits at 0x3f0 in a
        // Skiff or Firecracker VM). No memory, stack or flags are touched;
        // a fault kills only this child.
        unsafe {
            std::arch::asm!(
                "out dx, al",
                in("dx") BOOT_MARK_PORT,
                in("al") BOOT_MARK_VALUE,
                options(nomem, nostack, preserves_flags)
            );
        }
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` outlives the call.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    match skiff_agent_proto::ExitStatus::from_wait_status(status) {
        skiff_agent_proto::ExitStatus::Exited { code: 0 } => Ok(()),
        other => Err(io::Error::other(format!(
            "ioperm/out child ended with {other:?}"
        ))),
    }
}

/// Writes the marker. No I/O ports on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn write() -> io::Result<()> {
    Ok(())
}

/// Writes the marker through /dev/port (needs /dev mounted).
pub fn write_dev_port() -> io::Result<()> {
    let port = std::fs::OpenOptions::new().write(true).open("/dev/port")?;
    port.write_at(&[BOOT_MARK_VALUE], BOOT_MARK_PORT.into())
        .map(drop)
}
