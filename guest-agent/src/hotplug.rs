//! What the agent does for the host's runtime control of the VM
//! (skiff-vmm's control API): it onlines vCPUs and memory the host
//! hot-plugs, and it turns the ACPI power button into a clean shutdown.
//!
//! * **Kernel uevents** (`NETLINK_KOBJECT_UEVENT`): an `add` of a `cpu`
//!   device (ACPI CPU hot-plug adds it offline) gets `1` written to its
//!   `online`; an `add` of a `memory` block still offline gets
//!   `online_movable` (movable, so the host can take it back). At start,
//!   vCPUs and memory blocks already present but offline are onlined too.
//! * **The power button** (`vm.shutdown` presses it through ACPI): the
//!   input device named "Power Button" is read from `/dev/input/event*`;
//!   a press of `KEY_POWER` calls the shutdown the agent is given.
//!
//! Both run on threads of their own and never end the agent: a failure is
//! one line on the console.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sys::Syscall;

/// `struct input_event` on 64-bit: a timeval, then type, code, value.
const INPUT_EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// Longest uevent message the kernel sends (`UEVENT_BUFFER_SIZE`).
const UEVENT_MAX: usize = 2048;

/// A kernel uevent, reduced to what the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub subsystem: String,
    /// The device's path under /sys (`/devices/system/cpu/cpu3`).
    pub devpath: String,
}

/// Parses one uevent message (`add@/devices/...\0ACTION=add\0...`).
pub fn parse_uevent(msg: &[u8]) -> Option<Uevent> {
    let mut fields = msg.split(|b| *b == 0).filter(|f| !f.is_empty());
    let header = std::str::from_utf8(fields.next()?).ok()?;
    // udev's re-broadcasts start with "libudev": not kernel events.
    header.split_once('@')?;
    let (mut action, mut subsystem, mut devpath) = (None, None, None);
    for f in fields {
        let Ok(f) = std::str::from_utf8(f) else {
            continue;
        };
        match f.split_once('=') {
            Some(("ACTION", v)) => action = Some(v.to_string()),
            Some(("SUBSYSTEM", v)) => subsystem = Some(v.to_string()),
            Some(("DEVPATH", v)) => devpath = Some(v.to_string()),
            _ => {}
        }
    }
    Some(Uevent {
        action: action?,
        subsystem: subsystem?,
        devpath: devpath?,
    })
}

/// The sysfs file to write, and what, to online the device of `ev`.
pub fn online_action(ev: &Uevent) -> Option<(PathBuf, &'static [u8])> {
    if ev.action != "add" || ev.devpath.contains("..") {
        return None;
    }
    let dir = Path::new("/sys").join(ev.devpath.trim_start_matches('/'));
    match ev.subsystem.as_str() {
        "cpu" => Some((dir.join("online"), b"1")),
        "memory" => Some((dir.join("state"), b"online_movable")),
        _ => None,
    }
}

/// Whether `data` holds a press of the power key (one or more events).
pub fn power_pressed(data: &[u8]) -> bool {
    data.chunks_exact(INPUT_EVENT_SIZE).any(|e| {
        let kind = u16::from_ne_bytes([e[16], e[17]]);
        let code = u16::from_ne_bytes([e[18], e[19]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// Writes `value` to a vCPU's `online` or a memory block's `state` file
/// if it says the device is offline (`0`, `offline`).
fn online_if_offline(sys: &dyn Syscall, path: &Path, value: &[u8]) {
    let offline = sys
        .read_file(path)
        .is_ok_and(|v| matches!(v.trim_ascii(), b"0" | b"offline"));
    if offline {
        if let Err(e) = sys.write_file(path, value) {
            eprintln!("skiff-agent: onlining {}: {e}", path.display());
        }
    }
}

/// Onlines whatever is present but offline: vCPUs, then memory blocks.
pub fn online_present(sys: &dyn Syscall) {
    for (dir, file, value) in [
        ("/sys/devices/system/cpu", "online", &b"1"[..]),
        (
            "/sys/devices/system/memory",
            "state",
            &b"online_movable"[..],
        ),
    ] {
        let Ok(entries) = sys.read_dir(Path::new(dir)) else {
            continue;
        };
        for e in entries {
            online_if_offline(sys, &e.join(file), value);
        }
    }
}

fn uevent_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = 1; // the kernel's uevent multicast group
    let len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
    // SAFETY: `addr` is a valid sockaddr_nl of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn watch_uevents(sys: Arc<dyn Syscall>) {
    let fd = match uevent_socket() {
        Ok(fd) => fd,
        Err(e) => {
            return eprintln!("skiff-agent: kernel uevents: {e}; hot-plugged vCPUs stay offline")
        }
    };
    // Whatever was added before the socket existed.
    online_present(sys.as_ref());
    let mut buf = vec![0u8; UEVENT_MAX];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted
                || e.raw_os_error() == Some(libc::ENOBUFS)
            {
                // Events were lost: catch up on what is present.
                online_present(sys.as_ref());
                continue;
            }
            return eprintln!("skiff-agent: kernel uevents: {e}");
        }
        if let Some((path, value)) =
            parse_uevent(&buf[..n as usize]).and_then(|ev| online_action(&ev))
        {
            online_if_offline(sys.as_ref(), &path, value);
        }
    }
}

/// The event device of the ACPI power button, if the kernel has one.
fn power_button_device(sys: &dyn Syscall) -> Option<PathBuf> {
    let inputs = sys.read_dir(Path::new("/sys/class/input")).ok()?;
    inputs.into_iter().find_map(|dir| {
        let name = dir.file_name()?.to_str()?.to_string();
        let is_button = name.starts_with("event")
            && sys
                .read_file(&dir.join("device/name"))
                .is_ok_and(|n| n.trim_ascii() == b"Power Button");
        is_button.then(|| PathBuf::from("/dev/input").join(name))
    })
}

fn watch_power_button(sys: Arc<dyn Syscall>, shutdown: Box<dyn Fn() + Send>) {
    let Some(path) = power_button_device(sys.as_ref()) else {
        return; // a kernel without the ACPI button driver
    };
    let mut dev = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return eprintln!("skiff-agent: power button {}: {e}", path.display()),
    };
    let mut buf = [0u8; INPUT_EVENT_SIZE * 16];
    loop {
        match dev.read(&mut buf) {
            Ok(0) => return,
            Ok(n) if power_pressed(&buf[..n]) => {
                eprintln!("skiff-agent: power button pressed: shutting down");
                shutdown();
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return eprintln!("skiff-agent: power button: {e}"),
        }
    }
}

/// Starts the uevent watcher and, when `shutdown` is given, the
/// power-button watcher. Only for the agent as a VM's init: it changes the
/// machine's CPUs and memory.
pub fn start(sys: Arc<dyn Syscall>, shutdown: Option<Box<dyn Fn() + Send>>) {
    let s = sys.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("uevents".into())
        .spawn(move || watch_uevents(s))
    {
        eprintln!("skiff-agent: cannot start the uevent watcher: {e}");
    }
    if let Some(shutdown) = shutdown {
        let spawned = std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || watch_power_button(sys, shutdown));
        if let Err(e) = spawned {
            eprintln!("skiff-agent: cannot start the power-button watcher: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;

    #[test]
    fn uevents_of_hot_plugged_cpus_and_memory() {
        let msg = b"add@/devices/system/cpu/cpu3\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu3\0SUBSYSTEM=cpu\0SEQNUM=9\0";
        let ev = parse_uevent(msg).unwrap();
        assert_eq!(
            online_action(&ev),
            Some((
                PathBuf::from("/sys/devices/system/cpu/cpu3/online"),
                &b"1"[..]
            ))
        );
        let msg = b"add@/devices/system/memory/memory40\0ACTION=add\0DEVPATH=/devices/system/memory/memory40\0SUBSYSTEM=memory\0";
        let (path, value) = online_action(&parse_uevent(msg).unwrap()).unwrap();
        assert_eq!(
            (path.to_str().unwrap(), value),
            (
                "/sys/devices/system/memory/memory40/state",
                &b"online_movable"[..]
            )
        );
        // Other actions, subsystems and hostile paths do nothing.
        let remove = b"remove@/devices/system/cpu/cpu3\0ACTION=remove\0DEVPATH=/devices/system/cpu/cpu3\0SUBSYSTEM=cpu\0";
        assert_eq!(online_action(&parse_uevent(remove).unwrap()), None);
        let block = b"add@/devices/virtual/block/loop0\0ACTION=add\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0";
        assert_eq!(online_action(&parse_uevent(block).unwrap()), None);
        let evil = b"add@x\0ACTION=add\0DEVPATH=/devices/../../etc\0SUBSYSTEM=cpu\0";
        assert_eq!(online_action(&parse_uevent(evil).unwrap()), None);
        assert_eq!(parse_uevent(b"libudev\0\xfe\xed"), None);
        assert_eq!(parse_uevent(b""), None);
        assert_eq!(parse_uevent(b"add@/x\0ACTION=add\0"), None);
    }

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&kind.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn power_key_press_is_recognised() {
        let press = [event(EV_KEY, KEY_POWER, 1), event(0, 0, 0)].concat();
        assert!(power_pressed(&press));
        assert!(!power_pressed(&event(EV_KEY, KEY_POWER, 0))); // release
        assert!(!power_pressed(&event(EV_KEY, 30, 1))); // another key
        assert!(!power_pressed(&press[..INPUT_EVENT_SIZE - 1])); // a torn event
    }

    #[test]
    fn present_offline_cpus_and_memory_are_onlined() {
        let sys = Recording::new();
        sys.file("/sys/devices/system/cpu/cpu0/online", b"1\n");
        sys.file("/sys/devices/system/cpu/cpu2/online", b"0\n");
        sys.file("/sys/devices/system/memory/memory9/state", b"offline\n");
        sys.file("/sys/devices/system/memory/memory1/state", b"online\n");
        online_present(&sys);
        assert_eq!(
            sys.read_file(Path::new("/sys/devices/system/cpu/cpu2/online"))
                .unwrap(),
            b"1"
        );
        assert_eq!(
            sys.read_file(Path::new("/sys/devices/system/cpu/cpu0/online"))
                .unwrap(),
            b"1\n"
        );
        assert_eq!(
            sys.read_file(Path::new("/sys/devices/system/memory/memory9/state"))
                .unwrap(),
            b"online_movable"
        );
        assert_eq!(
            sys.read_file(Path::new("/sys/devices/system/memory/memory1/state"))
                .unwrap(),
            b"online\n"
        );
    }
}
