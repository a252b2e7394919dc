//! virtio-fs in a snapshot: the vhost-user device-state transfer
//! (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`, virtiofsd's `--migration-mode`).
//!
//! Save (the VM paused, [`Fs::snapshot_rings`]): every ring is disabled
//! and stopped with `GET_VRING_BASE`, which in virtiofsd waits for the
//! request being served, so the backend's next available index and the
//! used index in guest memory are where the guest will find them; then
//! `SET_DEVICE_STATE_FD` (save, phase stopped) with a pipe's write end:
//! virtiofsd serializes its inodes and open handles (as paths below the
//! shared directory, or file handles) into it, we read to the end (at most
//! [`MAX_BACKEND_STATE`] bytes, [`STATE_TIMEOUT`]) and `CHECK_DEVICE_STATE`
//! confirms. The rings are then started again where they were (enabled
//! on resume), so the saved VM can go on.
//!
//! Restore ([`Fs::load_backend_state`], before activation): a fresh
//! virtiofsd for the same directory gets the state through
//! `SET_DEVICE_STATE_FD` (load) and opens every inode and file again;
//! `CHECK_DEVICE_STATE` reports whether all of them could be. Activation
//! then sets the memory table and the rings at their saved bases.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::Fs;
use crate::state::{QueueProgress, StateError, MAX_BACKEND_STATE};

/// How long the backend may take to hand over or take its state.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(60);

fn backend(what: &'static str) -> impl FnOnce(vhost::Error) -> StateError {
    move |source| StateError::Backend { what, source }
}

fn state_err(msg: impl Into<String>) -> StateError {
    StateError::BackendState(msg.into())
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> Result<(File, OwnedFd), StateError> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(state_err(format!(
            "cannot make a pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads `r` to its end: at most `cap` bytes, within `timeout`.
fn read_capped(r: &mut File, cap: usize, timeout: Duration) -> Result<Vec<u8>, StateError> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(state_err(format!(
                "the backend did not finish its state within {timeout:?}"
            )));
        }
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(state_err(format!("poll: {e}")));
        }
        if n == 0 {
            continue;
        }
        let got = match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(state_err(format!("read: {e}"))),
        };
        if out.len() + got > cap {
            return Err(state_err(format!(
                "the backend's state is larger than the {cap} bytes a snapshot carries"
            )));
        }
        out.extend_from_slice(&buf[..got]);
    }
}

impl Fs {
    /// Stops the rings, takes the backend's state (kept for
    /// [`crate::VirtioDevice::backend_state`]) and starts the rings again;
    /// returns each ring's progress. Nothing for an inactive device.
    pub(super) fn snapshot_rings(&mut self) -> Result<Vec<QueueProgress>, StateError> {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return Ok(Vec::new());
        };
        if !self.device_state {
            return Err(state_err(format!(
                "the vhost-user backend at {} cannot save its state \
                 (no VHOST_USER_PROTOCOL_F_DEVICE_STATE; virtiofsd has it from 1.11 on)",
                self.socket.display()
            )));
        }
        let halted = self.halt_rings();
        let mut progress = Vec::with_capacity(self.rings.len());
        let mut bases = Vec::with_capacity(self.rings.len());
        let mut result = Ok(());
        for ring in &self.rings {
            let base = halted
                .iter()
                .find(|(i, _)| *i == ring.index)
                .and_then(|(_, b)| *b);
            let used = mem
                .read_obj::<u16>(GuestAddress(ring.used_ring + 2))
                .map(u16::from_le);
            let (Some(base), Ok(used)) = (base, used) else {
                result = Err(state_err(format!(
                    "ring {} did not stop or its used index cannot be read",
                    ring.index
                )));
                bases.push(base.unwrap_or(0));
                continue;
            };
            if used != base {
                // Requests the backend took and did not answer are lost:
                // the guest would wait for them forever.
                result = Err(state_err(format!(
                    "ring {}: {} requests are still being served",
                    ring.index,
                    base.wrapping_sub(used)
                )));
            }
            progress.push(QueueProgress {
                index: ring.index,
                next_avail: base,
                next_used: used,
            });
            bases.push(base);
        }
        let state = match result {
            Ok(()) => self.save_backend_state(),
            Err(e) => Err(e),
        };
        // Whatever happened, the rings go on where they were.
        let restarted = self.start_rings(&mem, &bases);
        for ring in &self.rings {
            let _ = ring.kick.write(1);
        }
        restarted.map_err(StateError::Worker)?;
        self.saved_state = Some(state?);
        Ok(progress)
    }

    /// The backend's state, through a pipe (the rings stopped).
    fn save_backend_state(&mut self) -> Result<Vec<u8>, StateError> {
        let t = Instant::now();
        let (r, w) = pipe()?;
        let theirs = self
            .frontend
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                w,
            )
            .map_err(backend("start saving its state"))?;
        // The backend may answer with a pipe of its own to read from.
        let mut from = theirs.unwrap_or(r);
        let read = read_capped(&mut from, MAX_BACKEND_STATE, STATE_TIMEOUT);
        // Closed: a backend still writing gets EPIPE rather than blocking.
        drop(from);
        let checked = self
            .frontend
            .check_device_state()
            .map_err(backend("save its state (see its log)"));
        let state = read?;
        checked?;
        log::info!(
            "virtio-fs: {} saved {} bytes of state in {} ms",
            self.socket.display(),
            state.len(),
            t.elapsed().as_millis()
        );
        Ok(state)
    }

    /// Gives a fresh backend the state a snapshot saved (before the rings
    /// start).
    pub(super) fn load_backend_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state.len() > MAX_BACKEND_STATE {
            return Err(state_err(format!(
                "the saved state is {} bytes, more than the {MAX_BACKEND_STATE} allowed",
                state.len()
            )));
        }
        if !self.device_state {
            return Err(state_err(format!(
                "the vhost-user backend at {} cannot load a saved state \
                 (no VHOST_USER_PROTOCOL_F_DEVICE_STATE; virtiofsd has it from 1.11 on)",
                self.socket.display()
            )));
        }
        let t = Instant::now();
        let (r, w) = pipe()?;
        let theirs = self
            .frontend
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                r.into(),
            )
            .map_err(backend("start loading the saved state"))?;
        let mut to = theirs.unwrap_or_else(|| File::from(w));
        // The backend reads while we write; a backend that gives up
        // closes its end and the write fails (EPIPE) instead of blocking.
        let written = to.write_all(state);
        drop(to);
        let checked = self
            .frontend
            .check_device_state()
            .map_err(backend("load the saved state (see its log)"));
        checked?;
        written.map_err(|e| state_err(format!("write the saved state: {e}")))?;
        log::info!(
            "virtio-fs: {} loaded {} bytes of state in {} ms",
            self.socket.display(),
            state.len(),
            t.elapsed().as_millis()
        );
        Ok(())
    }
}
