//! Binding the host-side Unix sockets of devices (vsock, console).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds a non-blocking listener at `path`, replacing a stale socket left
/// there by an earlier run. Anything else at `path` is left alone and is
/// an `AlreadyExists` error.
pub fn bind_listener(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_stale_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let first = bind_listener(&sock).unwrap();
        drop(first);
        // A stale socket from an earlier run is replaced.
        let _second = bind_listener(&sock).unwrap();
        // A regular file is not deleted.
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let err = bind_listener(&file).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
