//! AF_VSOCK stream sockets through libc (std has none).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A stream socket is read, written and shut down like a Unix stream; std's
/// `UnixStream` only issues the generic calls on it.
fn stream(fd: OwnedFd) -> UnixStream {
    UnixStream::from(fd)
}

/// A listening vsock socket on `port` (any CID).
pub struct Listener(OwnedFd);

impl Listener {
    /// Binds and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let fd = socket()?;
        let addr = sockaddr(libc::VMADDR_CID_ANY, port);
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_vm of `len` bytes for the call.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) })?;
        // SAFETY: listen() on a descriptor we own has no memory-safety preconditions.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(Self(fd))
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: null address pointers are allowed by accept4().
            let fd = unsafe {
                libc::accept4(self.0.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
            };
            if fd >= 0 {
                // SAFETY: fd is a fresh descriptor that nothing else owns.
                return Ok(stream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Connects to `cid:port`.
pub fn connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    let fd = socket()?;
    let addr = sockaddr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes for the call.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) })?;
    Ok(stream(fd))
}
