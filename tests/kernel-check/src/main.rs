//! `skiff-kernel-check`: run as root inside a guest, exercises the kernel
//! interfaces that common OCI images rely on and prints one
//! `SKIFF-KCHECK-<NAME>=ok` (or `=fail: <why>`) line per check, then
//! `SKIFF-KCHECK=ok` or `SKIFF-KCHECK=fail`. Exits 1 if any check failed.
//!
//! Checks: inotify (a watch sees a file created), fanotify (a group can be
//! created), io_uring (`io_uring_setup` returns a ring), POSIX message
//! queues (a message goes through `mq_open`ed queue), cgroup v2 (the
//! hierarchy mounts and a child group can be created), namespaces (a child
//! unshares user, mount, PID, network, UTS and IPC namespaces).

use std::ffi::CString;
use std::io::Error;

type Check = fn() -> Result<String, String>;

fn main() -> std::process::ExitCode {
    let checks: [(&str, Check); 6] = [
        ("INOTIFY", inotify),
        ("FANOTIFY", fanotify),
        ("IO-URING", io_uring),
        ("MQUEUE", mqueue),
        ("CGROUP2", cgroup2),
        ("NAMESPACES", namespaces),
    ];
    let mut failed = false;
    for (name, check) in checks {
        match check() {
            Ok(detail) if detail.is_empty() => println!("SKIFF-KCHECK-{name}=ok"),
            Ok(detail) => println!("SKIFF-KCHECK-{name}=ok ({detail})"),
            Err(why) => {
                failed = true;
                println!("SKIFF-KCHECK-{name}=fail: {why}");
            }
        }
    }
    println!("SKIFF-KCHECK={}", if failed { "fail" } else { "ok" });
    std::process::ExitCode::from(u8::from(failed))
}

/// `what: <errno text>` for the last failed call.
fn os_err(what: &str) -> String {
    format!("{what}: {}", Error::last_os_error())
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in constant paths")
}

fn inotify() -> Result<String, String> {
    let dir = "/tmp/skiff-kcheck-inotify";
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    // SAFETY: plain syscall; the returned fd is owned here and closed below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(os_err("inotify_init1"));
    }
    let path = cstr(dir);
    // SAFETY: fd is an inotify fd; path is a valid NUL-terminated string.
    let result = if unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_CREATE) } < 0 {
        Err(os_err("inotify_add_watch"))
    } else {
        std::fs::write(format!("{dir}/created"), b"x").map_err(|e| format!("create: {e}"))?;
        let mut buf = [0u8; 512];
        // SAFETY: buf is writable for its whole length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= std::mem::size_of::<libc::inotify_event>() as isize {
            Ok(String::new())
        } else {
            Err(os_err("no IN_CREATE event"))
        }
    };
    // SAFETY: fd is ours and not used after this.
    unsafe { libc::close(fd) };
    result
}

fn fanotify() -> Result<String, String> {
    // SAFETY: plain syscall; the returned fd is closed below.
    let fd = unsafe { libc::fanotify_init(libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC, libc::O_RDONLY as u32) };
    if fd < 0 {
        return Err(os_err("fanotify_init"));
    }
    // SAFETY: fd is ours and not used after this.
    unsafe { libc::close(fd) };
    Ok(String::new())
}

fn io_uring() -> Result<String, String> {
    // struct io_uring_params is 120 bytes; zeroed asks for nothing special.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup writes at most sizeof(io_uring_params) = 120
    // bytes into params, which is that large.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(os_err("io_uring_setup"));
    }
    let sq_entries = u32::from_ne_bytes(params[0..4].try_into().expect("4 bytes"));
    // SAFETY: fd is ours and not used after this.
    unsafe { libc::close(fd as i32) };
    Ok(format!("{sq_entries} SQ entries"))
}

fn mqueue() -> Result<String, String> {
    let name = cstr("/skiff-kcheck");
    // SAFETY: name is NUL-terminated; a null attr asks for the defaults.
    let mq = unsafe {
        libc::mq_open(
            name.as_ptr(),
            libc::O_CREAT | libc::O_RDWR,
            0o600 as libc::mode_t,
            std::ptr::null_mut::<libc::mq_attr>(),
        )
    };
    if mq < 0 {
        return Err(os_err("mq_open"));
    }
    let msg = b"skiff";
    let mut buf = [0u8; 8192];
    // SAFETY: msg and buf are valid for the lengths passed; mq is open.
    let result = unsafe {
        if libc::mq_send(mq, msg.as_ptr().cast(), msg.len(), 0) < 0 {
            Err(os_err("mq_send"))
        } else if libc::mq_receive(mq, buf.as_mut_ptr().cast(), buf.len(), std::ptr::null_mut()) != msg.len() as isize {
            Err(os_err("mq_receive"))
        } else {
            Ok(String::new())
        }
    };
    // SAFETY: mq is ours; the name was created above.
    unsafe {
        libc::mq_close(mq);
        libc::mq_unlink(name.as_ptr());
    }
    result
}

fn cgroup2() -> Result<String, String> {
    let dir = "/tmp/skiff-kcheck-cgroup";
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    let (src, target, fstype) = (cstr("cgroup2"), cstr(dir), cstr("cgroup2"));
    // SAFETY: all strings are NUL-terminated; no mount data.
    if unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } < 0 {
        return Err(os_err("mount cgroup2"));
    }
    let controllers = std::fs::read_to_string(format!("{dir}/cgroup.controllers"));
    let child = std::fs::create_dir(format!("{dir}/skiff-child"));
    let result = match (controllers, child) {
        (Ok(c), Ok(())) => Ok(format!("controllers: {}", c.trim())),
        (Err(e), _) => Err(format!("cgroup.controllers: {e}")),
        (_, Err(e)) => Err(format!("mkdir child cgroup: {e}")),
    };
    let _ = std::fs::remove_dir(format!("{dir}/skiff-child"));
    // SAFETY: target is NUL-terminated.
    unsafe { libc::umount(target.as_ptr()) };
    result
}

fn namespaces() -> Result<String, String> {
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC;
    // SAFETY: the child only calls async-signal-safe functions (unshare,
    // _exit) before exiting.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    if pid == 0 {
        // SAFETY: unshare and _exit are async-signal-safe.
        unsafe {
            let rc = libc::unshare(flags);
            libc::_exit(if rc == 0 { 0 } else { *libc::__errno_location() });
        }
    }
    let mut status = 0;
    // SAFETY: pid is our child; status is a valid out pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(os_err("waitpid"));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(String::new()),
        errno => Err(format!("unshare: {}", Error::from_raw_os_error(errno))),
    }
}
