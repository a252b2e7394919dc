//! virtio-fs against a real virtiofsd: the frontend shares memfd-backed
//! guest memory and the rings, the backend answers FUSE requests in them.
//!
//! Uses the virtiofsd `scripts/setup` installs (`~/.cargo/bin/virtiofsd`,
//! from `scripts/packages/devices.cargo`), or `$SKIFF_VIRTIOFSD`, one on
//! PATH, Debian's `/usr/libexec/virtiofsd` or QEMU's
//! `/usr/lib/qemu/virtiofsd`. It is part of the project's set-up, so
//! without one the test fails (run `scripts/setup`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_devices::fs::{Fs, FsConfig};
use virtio_devices::{
    ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const QUEUE_SIZE: u16 = 16;

fn find_virtiofsd() -> Option<PathBuf> {
    let env = std::env::var_os("SKIFF_VIRTIOFSD").map(PathBuf::from);
    let path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("virtiofsd"))
            .find(|c| c.exists())
    });
    let cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd"));
    let fixed = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"].map(PathBuf::from);
    env.into_iter()
        .chain(path)
        .chain(cargo)
        .chain(fixed)
        .find(|p| p.exists())
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(bin: &Path, socket: &Path, share: &Path) -> Daemon {
    let qemu_style = bin.starts_with("/usr/lib/qemu");
    let mut cmd = Command::new(bin);
    if qemu_style {
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", share.display()))
            .arg("-o")
            .arg("cache=none")
            .arg("-o")
            .arg("sandbox=chroot");
    } else {
        cmd.arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(share)
            .arg("--cache=never")
            .arg("--sandbox=none");
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !socket.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

struct Recorder;

impl VirtioInterrupt for Recorder {
    fn trigger(&self, _t: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }
    fn notifier(&self, _t: VirtioInterruptType) -> Option<EventFd> {
        None
    }
}

/// A split queue at `base` (descriptors, then avail at +0x100, used at +0x200).
fn queue(base: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    q.set_ready(true);
    q
}

struct Ring {
    base: u64,
    next: u16,
}

impl Ring {
    /// Publishes a request (readable) + reply buffer (writable) chain and
    /// returns the reply address once the backend has used it.
    fn call(
        &mut self,
        mem: &GuestMemoryMmap,
        kick: &EventFd,
        request: &[u8],
        reply_len: u32,
    ) -> Vec<u8> {
        let (req_addr, reply_addr) = (0x10_0000u64, 0x20_0000u64);
        mem.write_slice(request, GuestAddress(req_addr)).unwrap();
        let d = self.base;
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let a = GuestAddress(d + 16 * i);
            mem.write_obj(addr, a).unwrap();
            mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
        };
        desc(0, req_addr, request.len() as u32, 1, 1);
        desc(1, reply_addr, reply_len, 2, 0);
        let avail = self.base + 0x100;
        mem.write_obj(
            0u16,
            GuestAddress(avail + 4 + 2 * u64::from(self.next % QUEUE_SIZE)),
        )
        .unwrap();
        self.next += 1;
        mem.write_obj(self.next, GuestAddress(avail + 2)).unwrap();
        kick.write(1).unwrap();
        let used = self.base + 0x200;
        let end = Instant::now() + Duration::from_secs(5);
        while mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() != self.next {
            assert!(Instant::now() < end, "virtiofsd did not answer");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut out = vec![0u8; reply_len as usize];
        mem.read_slice(&mut out, GuestAddress(reply_addr)).unwrap();
        out
    }
}

fn in_header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn fuse_init_and_lookup_through_virtiofsd() {
    let bin = find_virtiofsd().expect(
        "virtiofsd not found ($SKIFF_VIRTIOFSD, PATH, ~/.cargo/bin, /usr/libexec, \
         /usr/lib/qemu): run scripts/setup, which installs it",
    );
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), b"hello from the host\n").unwrap();
    let socket = dir.path().join("fs.sock");
    let _daemon = start(&bin, &socket, &share);

    let mut cfg = FsConfig::new("share", socket);
    cfg.queue_size = QUEUE_SIZE;
    let mut fs = Fs::new(&cfg).unwrap();

    let file = tempfile::tempfile().unwrap();
    file.set_len(0x40_0000).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        0x40_0000,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let kicks = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    let queues = vec![
        ActiveQueue {
            index: 0,
            queue: queue(0x1000),
            event: kicks[0].try_clone().unwrap(),
        },
        ActiveQueue {
            index: 1,
            queue: queue(0x2000),
            event: kicks[1].try_clone().unwrap(),
        },
    ];
    fs.ack_features(fs.features());
    fs.activate(
        GuestMemoryAtomic::new(mem.clone()),
        Arc::new(Recorder),
        queues,
    )
    .unwrap();

    let mut ring = Ring {
        base: 0x2000,
        next: 0,
    };
    // FUSE_INIT 7.31.
    let mut init = in_header(56, FUSE_INIT, 1, 0);
    for v in [7u32, 31, 0, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let reply = ring.call(&mem, &kicks[1], &init, 16 + 80);
    assert_eq!(u32_at(&reply, 4), 0, "INIT succeeded");
    assert_eq!(u32_at(&reply, 16), 7, "FUSE major version");

    // LOOKUP hello.txt in the root (node 1).
    let name = b"hello.txt\0";
    let mut lookup = in_header(40 + name.len(), FUSE_LOOKUP, 2, 1);
    lookup.extend_from_slice(name);
    let reply = ring.call(&mem, &kicks[1], &lookup, 16 + 128);
    assert_eq!(u32_at(&reply, 4), 0, "LOOKUP succeeded");
    // fuse_entry_out: nodeid, generation, entry/attr valid (+nsec), then
    // fuse_attr with ino and size.
    let size = u64::from_le_bytes(reply[16 + 40 + 8..16 + 40 + 16].try_into().unwrap());
    assert_eq!(size, 20, "the host file's size");
    let nodeid = u64::from_le_bytes(reply[16..24].try_into().unwrap());

    // OPEN it (read-only): the handle outlives the snapshot below.
    let mut open = in_header(48, FUSE_OPEN, 3, nodeid);
    open.extend_from_slice(&[0u8; 8]); // flags O_RDONLY, open_flags
    let reply = ring.call(&mem, &kicks[1], &open, 16 + 16);
    assert_eq!(u32_at(&reply, 4), 0, "OPEN succeeded");
    let fh = u64::from_le_bytes(reply[16..24].try_into().unwrap());

    // Snapshot: the rings stop where the guest is, virtiofsd hands over
    // its state, the rings go on (a READ still works on this backend).
    let progress = fs.queue_progress().unwrap();
    assert_eq!(progress.len(), 2);
    let p1 = progress.iter().find(|p| p.index == 1).unwrap();
    assert_eq!((p1.next_avail, p1.next_used), (3, 3), "{progress:?}");
    let state = fs.backend_state().expect("virtiofsd's state");
    assert!(!state.is_empty());
    let read = |unique: u64| {
        let mut r = in_header(80, FUSE_READ, unique, nodeid);
        r.extend_from_slice(&fh.to_le_bytes());
        r.extend_from_slice(&0u64.to_le_bytes()); // offset
        r.extend_from_slice(&64u32.to_le_bytes()); // size
        r.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
        r
    };
    let reply = ring.call(&mem, &kicks[1], &read(4), 16 + 64);
    assert_eq!(u32_at(&reply, 4), 0, "READ after the snapshot");
    assert_eq!(&reply[16..36], b"hello from the host\n");
    drop(fs);
    drop(_daemon);

    // Restore: a fresh virtiofsd takes the state; the old node and file
    // handle work on it, the rings start at the saved bases.
    let socket2 = dir.path().join("fs2.sock");
    let _daemon2 = start(&bin, &socket2, &share);
    let mut fs2 = Fs::new(&FsConfig {
        socket: socket2,
        ..cfg.clone()
    })
    .unwrap();
    fs2.ack_features(fs2.features());
    fs2.restoring(Some(&state)).unwrap();
    let mut queues = Vec::new();
    for (index, base, kick) in [(0, 0x1000, &kicks[0]), (1, 0x2000, &kicks[1])] {
        let mut queue = queue(base);
        let used = mem.read_obj::<u16>(GuestAddress(base + 0x202)).unwrap();
        queue.set_next_avail(used);
        queue.set_next_used(used);
        queues.push(ActiveQueue {
            index,
            queue,
            event: kick.try_clone().unwrap(),
        });
    }
    fs2.activate(
        GuestMemoryAtomic::new(mem.clone()),
        Arc::new(Recorder),
        queues,
    )
    .unwrap();
    let reply = ring.call(&mem, &kicks[1], &read(5), 16 + 64);
    assert_eq!(
        u32_at(&reply, 4),
        0,
        "READ through the handle opened before the snapshot"
    );
    assert_eq!(&reply[16..36], b"hello from the host\n");
    assert!(fs2.reset());

    // A backend refuses a state that is not one.
    let socket3 = dir.path().join("fs3.sock");
    let _daemon3 = start(&bin, &socket3, &share);
    let mut fs3 = Fs::new(&FsConfig {
        socket: socket3,
        ..cfg
    })
    .unwrap();
    let e = fs3.restoring(Some(b"not a state")).unwrap_err();
    assert!(e.to_string().contains("cannot load the saved state"), "{e}");
}
