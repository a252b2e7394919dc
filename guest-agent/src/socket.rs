//! The agent's sockets: the listener it serves on (a Unix socket, or
//! AF_VSOCK in a guest) and the event connection it opens to the host.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use crate::cli::Address;

/// Errors of setting up a listener or the event connection.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// socket, bind or listen failed.
    #[error("listening on {0}")]
    Listen(String, #[source] io::Error),
    /// connect failed.
    #[error("connecting to {0}")]
    Connect(String, #[source] io::Error),
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket.
    Unix(UnixListener),
    /// An AF_VSOCK socket.
    Vsock(OwnedFd),
}

/// Binds `addr`.
pub fn listen(addr: &Address) -> Result<Listener, SocketError> {
    match addr {
        Address::Unix(path) => {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .map(Listener::Unix)
                .map_err(|e| SocketError::Listen(path.display().to_string(), e))
        }
        Address::Vsock(port) => vsock_socket(libc::VMADDR_CID_ANY, *port, true)
            .map(Listener::Vsock)
            .map_err(|e| SocketError::Listen(format!("vsock port {port}"), e)),
    }
}

/// Connects to `addr` (a vsock port means the host, CID 2).
pub fn connect(addr: &Address) -> Result<File, SocketError> {
    match addr {
        Address::Unix(path) => UnixStream::connect(path)
            .map(|s| File::from(OwnedFd::from(s)))
            .map_err(|e| SocketError::Connect(path.display().to_string(), e)),
        Address::Vsock(port) => vsock_socket(libc::VMADDR_CID_HOST, *port, false)
            .map(File::from)
            .map_err(|e| SocketError::Connect(format!("vsock port {port}"), e)),
    }
}

fn vsock_socket(cid: u32, port: u32, listen: bool) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    let ptr = &addr as *const libc::sockaddr_vm as *const libc::sockaddr;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `ptr`/`len` describe `addr`, which outlives the calls.
    let r = unsafe {
        if listen {
            if libc::bind(fd, ptr, len) < 0 {
                -1
            } else {
                libc::listen(fd, 128)
            }
        } else {
            libc::connect(fd, ptr, len)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

impl Listener {
    /// Accepts a connection.
    pub fn accept(&self) -> io::Result<File> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
            Listener::Vsock(fd) => {
                let raw = std::os::fd::AsRawFd::as_raw_fd(fd);
                // SAFETY: accepts on a listening socket we own; no address
                // is asked for.
                let c = unsafe {
                    libc::accept4(
                        raw,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `c` is a fresh fd nobody else owns.
                Ok(unsafe { File::from_raw_fd(c) })
            }
        }
    }
}
