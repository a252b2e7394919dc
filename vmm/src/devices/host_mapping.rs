//! Page-aligned anonymous memory for contents the guest sees through a
//! memory slot (the firmware's code, the flash's array): the VMM owns it,
//! KVM maps it, and it stays where it is for its whole life.

use std::ptr::NonNull;

/// An anonymous private mapping of `len` bytes, unmapped on drop.
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping belongs to this value alone; access goes through
// `&self`/`&mut self`.
unsafe impl Send for HostMapping {}

impl HostMapping {
    /// A mapping holding a copy of `data` (`data` must not be empty).
    pub fn from_bytes(data: &[u8]) -> std::io::Result<Self> {
        let len = data.len();
        if len == 0 {
            return Err(std::io::Error::other("empty mapping"));
        }
        // SAFETY: an anonymous private mapping: no file or existing memory
        // is involved; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("null mapping"))?;
        // SAFETY: the mapping is `len` writable bytes and does not overlap
        // `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), len) };
        Ok(Self { ptr, len })
    }

    /// The host address of the mapping (for a memory slot).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference
        // the VMM holds.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `from_bytes` with this length and
        // is not used after this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
