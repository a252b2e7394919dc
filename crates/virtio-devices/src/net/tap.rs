//! Opening a tap device with a virtio-net header.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, OwnedFd};

/// Length of `virtio_net_hdr_v1` (with `num_buffers`), the header every
/// frame carries between the device, the tap and the guest.
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit `IFNAMSIZ`.
    #[error("invalid tap name {0:?}")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// An ioctl on the tap failed.
    #[error("tap ioctl {name}")]
    Ioctl {
        /// The request.
        name: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

fn ioctl_int(
    file: &File,
    req: libc::c_ulong,
    value: libc::c_int,
    name: &'static str,
) -> Result<(), TapError> {
    let v = value;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which is
    // valid for the duration of the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &v as *const libc::c_int) };
    if r < 0 {
        return Err(TapError::Ioctl {
            name,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Sets the header size and disables offloads (we advertise none to the
/// guest, so the tap must not hand us GSO frames).
pub fn configure_tap(file: &File) -> Result<(), TapError> {
    ioctl_int(
        file,
        TUNSETVNETHDRSZ,
        VNET_HDR_LEN as libc::c_int,
        "TUNSETVNETHDRSZ",
    )?;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) };
    if r < 0 {
        return Err(TapError::Ioctl {
            name: "TUNSETOFFLOAD",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Opens (creating it if missing) the tap `name`, non-blocking, with a
/// virtio-net header, and brings its link up (a warning if not allowed).
pub fn open_tap(name: &str) -> Result<File, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= 16 || bytes.contains(&0) {
        return Err(TapError::InvalidName(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` has its
    // layout (16-byte name, flags, padding to 40 bytes) and outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(TapError::Ioctl {
            name: "TUNSETIFF",
            source: io::Error::last_os_error(),
        });
    }
    configure_tap(&file)?;
    if let Err(e) = set_link_up(&req.name) {
        log::warn!("tap {name}: cannot bring the link up: {e}");
    }
    Ok(file)
}

/// Sets `IFF_UP` on the interface named in `name` (NUL-padded).
fn set_link_up(name: &[u8; 16]) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; File closes it.
    let sock = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    let mut req = IfReq {
        name: *name,
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq `req` points to,
    // which is valid and outlives the call.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS as libc::c_ulong,
            &mut req as *mut IfReq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as i16;
    // SAFETY: as above; SIOCSIFFLAGS reads the ifreq.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS as libc::c_ulong,
            &req as *const IfReq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Uses an inherited tap fd (opened with `IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`); makes it non-blocking and configures the header.
pub fn tap_from_fd(fd: OwnedFd) -> Result<File, TapError> {
    let file = File::from(fd);
    // SAFETY: fcntl on an fd we own; the result is checked.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    let set = if flags < 0 {
        -1
    } else {
        // SAFETY: as above; only the file status flags change.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
    };
    if set < 0 {
        return Err(TapError::Ioctl {
            name: "F_SETFL",
            source: io::Error::last_os_error(),
        });
    }
    configure_tap(&file)?;
    Ok(file)
}

/// Wraps any fd carrying one frame per read/write (tests use a datagram
/// socket pair) without tap configuration.
pub fn raw_backend(fd: OwnedFd) -> File {
    File::from(fd)
}
