//! The frontend against a scripted vhost-user backend.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::FileOffset;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::test_utils::*;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const NEED_REPLY: u32 = 0x8;

/// A received message: request, payload, fds.
struct Msg {
    req: u32,
    body: Vec<u8>,
    fds: Vec<File>,
}

type Log = Arc<Mutex<Vec<Msg>>>;

fn recv_msg(s: &UnixStream) -> Option<Msg> {
    let mut hdr = [0u8; 12];
    let mut fds = [-1 as RawFd; 8];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: the iovec points at `hdr`, which is valid for writes of its length.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.ok()?;
    if n != 12 {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let mut body = vec![0u8; word(8) as usize];
    (&*s).read_exact(&mut body).ok()?;
    let fds = fds[..nfds]
        .iter()
        // SAFETY: these fds were just received and are owned by nobody else.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    Some(Msg {
        req: word(0) | (word(4) & NEED_REPLY) << 24,
        body,
        fds,
    })
}

fn reply(s: &UnixStream, req: u32, body: &[u8]) {
    let mut m = req.to_le_bytes().to_vec();
    m.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    (&*s).write_all(&m).unwrap();
}

/// Serves one frontend connection, answering GET_* and REPLY_ACK.
fn fake_backend(listener: UnixListener, log: Log) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut reply_ack = false;
        while let Some(msg) = recv_msg(&s) {
            let need_reply = msg.req & (NEED_REPLY << 24) != 0;
            let req = msg.req & 0xff_ffff;
            match req {
                GET_FEATURES => reply(&s, req, &(1u64 << 32 | 1 << 30 | 1 << 29).to_le_bytes()),
                GET_PROTOCOL_FEATURES => reply(&s, req, &(0x1u64 | 0x8).to_le_bytes()),
                GET_QUEUE_NUM => reply(&s, req, &8u64.to_le_bytes()),
                GET_VRING_BASE => reply(&s, req, &[msg.body[0], 0, 0, 0, 0, 0, 0, 0]),
                SET_PROTOCOL_FEATURES => reply_ack = msg.body[0] & 0x8 != 0,
                _ => {}
            }
            if need_reply
                && reply_ack
                && !matches!(
                    req,
                    GET_FEATURES | GET_PROTOCOL_FEATURES | GET_QUEUE_NUM | GET_VRING_BASE
                )
            {
                reply(&s, req, &0u64.to_le_bytes());
            }
            log.lock().unwrap().push(Msg { req, ..msg });
        }
    })
}

fn requests(log: &Log) -> Vec<u32> {
    log.lock().unwrap().iter().map(|m| m.req).collect()
}

struct Fx {
    _dir: tempfile::TempDir,
    log: Log,
    fs: Fs,
}

fn fixture(queues: u16) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let log = Log::default();
    fake_backend(listener, log.clone());
    let mut cfg = FsConfig::new("rootfs", sock);
    cfg.num_request_queues = queues;
    cfg.queue_size = 16;
    let fs = Fs::new(&cfg).unwrap();
    Fx { _dir: dir, log, fs }
}

fn memfd_mem(size: usize) -> GuestMemoryMmap {
    let f = tempfile::tempfile().unwrap();
    f.set_len(size as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(f, 0)))])
        .unwrap()
}

#[test]
fn handshake_config_and_features() {
    let fx = fixture(2);
    assert!(wait_until(|| requests(&fx.log).len() == 5));
    assert_eq!(
        requests(&fx.log),
        vec![
            SET_OWNER,
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM
        ]
    );
    let mut cfg = [0u8; 40];
    fx.fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..7], b"rootfs\0");
    assert_eq!(u32::from_le_bytes([cfg[36], cfg[37], cfg[38], cfg[39]]), 2);
    assert_eq!(fx.fs.queue_max_sizes().len(), 3);
    // Only what the backend offers: event index yes, indirect no.
    assert_eq!(fx.fs.features(), 1 << 32 | 1 << 29);
}

#[test]
fn activation_shares_memory_and_rings_then_reset_stops_them() {
    let mut fx = fixture(1);
    let mem = memfd_mem(0x100_0000);
    let q0 = TestQueue::new(&mem, 0x1000, 16, 0x10_0000);
    let q1 = TestQueue::new(&mem, 0x2000, 16, 0x20_0000);
    let irq = recorder();
    fx.fs.ack_features(1 << 32);
    fx.fs
        .activate(
            atomic_mem(&mem),
            irq.clone(),
            vec![q0.active(0), q1.active(1)],
        )
        .unwrap();
    let per_queue = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let mut expect = vec![SET_FEATURES, SET_MEM_TABLE];
    expect.extend(per_queue);
    expect.extend(per_queue);
    assert!(wait_until(|| requests(&fx.log).len() == 5 + expect.len()));
    assert_eq!(requests(&fx.log)[5..], expect[..]);
    {
        let log = fx.log.lock().unwrap();
        let features = &log[5];
        assert_eq!(
            u64::from_le_bytes(features.body[..8].try_into().unwrap()),
            1 << 32 | 1 << 30
        );
        let table = &log[6];
        assert_eq!(table.fds.len(), 1, "the memory fd is passed");
        let region = &table.body[8..40];
        let gpa = u64::from_le_bytes(region[0..8].try_into().unwrap());
        let size = u64::from_le_bytes(region[8..16].try_into().unwrap());
        let uaddr = u64::from_le_bytes(region[16..24].try_into().unwrap());
        assert_eq!((gpa, size), (0, 0x100_0000));
        let addr = &log[8];
        // vhost_vring_addr: index, flags, desc, used, avail, log (u64s after two u32s).
        let desc = u64::from_le_bytes(addr.body[8..16].try_into().unwrap());
        assert_eq!(
            desc,
            uaddr + 0x1000,
            "ring addresses are host virtual addresses"
        );
    }
    // The backend signals queue 1's call fd: the guest gets queue 1's interrupt.
    let call = {
        let log = fx.log.lock().unwrap();
        log[5 + 2 + 6 + 3].fds[0].try_clone().unwrap()
    };
    (&call).write_all(&1u64.to_ne_bytes()).unwrap();
    assert!(wait_until(|| irq
        .raised
        .lock()
        .unwrap()
        .contains(&VirtioInterruptType::Queue(1))));
    assert_eq!(fx.fs.counters(), BTreeMap::from([("interrupts", 1)]));
    // Pausing cannot park virtiofsd: the forwarder keeps forwarding.
    fx.fs.pause();
    (&call).write_all(&1u64.to_ne_bytes()).unwrap();
    assert!(wait_until(|| irq.count() == 2));
    fx.fs.resume();
    assert_eq!(fx.fs.counters()["interrupts"], 2);
    let before = requests(&fx.log).len();
    assert!(fx.fs.reset());
    assert!(wait_until(|| requests(&fx.log).len() == before + 4));
    assert_eq!(
        requests(&fx.log)[before..],
        [
            SET_VRING_ENABLE,
            GET_VRING_BASE,
            SET_VRING_ENABLE,
            GET_VRING_BASE
        ]
    );
}

#[test]
fn anonymous_memory_cannot_be_shared() {
    let mut fx = fixture(1);
    let mem = single_region_mem(0x10_0000);
    let q0 = TestQueue::new(&mem, 0x1000, 16, 0x8000);
    let r = fx
        .fs
        .activate(atomic_mem(&mem), recorder(), vec![q0.active(0)]);
    assert!(matches!(r, Err(ActivateError::MemoryNotShareable(0))));
}

#[test]
fn bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    assert!(matches!(
        Fs::new(&FsConfig::new("", sock.clone())),
        Err(FsError::InvalidTag(_))
    ));
    assert!(matches!(
        Fs::new(&FsConfig::new(&"x".repeat(37), sock.clone())),
        Err(FsError::InvalidTag(_))
    ));
    assert!(matches!(
        Fs::new(&FsConfig::new("tag", sock)),
        Err(FsError::Backend { .. })
    ));
}

/// An interrupt layer with an eventfd per queue vector.
struct Irqfds(Vec<EventFd>);

impl VirtioInterrupt for Irqfds {
    fn trigger(&self, _t: VirtioInterruptType) -> std::io::Result<()> {
        panic!("the backend must signal the irqfd directly");
    }
    fn notifier(&self, t: VirtioInterruptType) -> Option<EventFd> {
        match t {
            VirtioInterruptType::Queue(i) => {
                self.0.get(usize::from(i)).and_then(|e| e.try_clone().ok())
            }
            VirtioInterruptType::Config => None,
        }
    }
}

#[test]
fn irqfds_go_straight_to_the_backend() {
    let mut fx = fixture(1);
    let mem = memfd_mem(0x100_0000);
    let q0 = TestQueue::new(&mem, 0x1000, 16, 0x10_0000);
    let q1 = TestQueue::new(&mem, 0x2000, 16, 0x20_0000);
    let irqfds = Arc::new(Irqfds(vec![
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ]));
    fx.fs.ack_features(1 << 32);
    fx.fs
        .activate(
            atomic_mem(&mem),
            irqfds.clone(),
            vec![q0.active(0), q1.active(1)],
        )
        .unwrap();
    assert!(wait_until(|| requests(&fx.log).len() == 5 + 2 + 12));
    let call = {
        let log = fx.log.lock().unwrap();
        log[5 + 2 + 6 + 3].fds[0].try_clone().unwrap()
    };
    (&call).write_all(&1u64.to_ne_bytes()).unwrap();
    assert_eq!(
        irqfds.0[1].read().unwrap(),
        1,
        "queue 1's irqfd was signalled"
    );
    assert!(irqfds.0[0].read().is_err(), "queue 0's was not");
}

/// Queue 0 is fully handed to the backend, queue 1's ring is outside guest
/// memory: activation fails and the started ring is stopped again (a
/// later reset has nothing left to stop), and the device can be activated
/// afterwards.
#[test]
fn failed_activation_stops_the_rings_it_started() {
    let mut fx = fixture(1);
    let mem = memfd_mem(0x100_0000);
    let q0 = TestQueue::new(&mem, 0x1000, 16, 0x10_0000);
    let q1 = TestQueue::new(&mem, 0x2000, 16, 0x20_0000);
    let mut bad = q1.active(1);
    bad.queue.set_desc_table_address(Some(0), Some(0x40));
    fx.fs.ack_features(1 << 32);
    let r = fx
        .fs
        .activate(atomic_mem(&mem), recorder(), vec![q0.active(0), bad]);
    assert!(matches!(r, Err(ActivateError::BadQueueAddress(_))), "{r:?}");
    let per_queue = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let mut expect = vec![SET_FEATURES, SET_MEM_TABLE];
    expect.extend(per_queue);
    expect.extend([SET_VRING_ENABLE, GET_VRING_BASE]);
    assert!(wait_until(|| requests(&fx.log).len() >= 5 + expect.len()));
    assert_eq!(requests(&fx.log)[5..], expect[..]);
    assert!(fx.fs.reset());
    fx.fs
        .activate(
            atomic_mem(&mem),
            recorder(),
            vec![q0.active(0), q1.active(1)],
        )
        .unwrap();
}

#[test]
fn paused_activation_enables_rings_on_resume_and_snapshots_need_device_state() {
    let mut fx = fixture(1);
    assert_eq!(
        fx.fs.queue_progress().unwrap(),
        vec![],
        "inactive: nothing to save"
    );
    let mem = memfd_mem(0x100_0000);
    let q0 = TestQueue::new(&mem, 0x1000, 16, 0x10_0000);
    let q1 = TestQueue::new(&mem, 0x2000, 16, 0x20_0000);
    fx.fs.ack_features(1 << 32);
    // A restore: paused, then activated; the rings wait for resume.
    fx.fs.pause();
    fx.fs
        .activate(
            atomic_mem(&mem),
            recorder(),
            vec![q0.active(0), q1.active(1)],
        )
        .unwrap();
    let enables = |log: &Log| {
        requests(log)
            .iter()
            .filter(|r| **r == SET_VRING_ENABLE)
            .count()
    };
    assert!(wait_until(|| requests(&fx.log)
        .iter()
        .filter(|r| **r == SET_VRING_KICK)
        .count()
        == 2));
    assert_eq!(enables(&fx.log), 0, "no ring enabled while paused");
    fx.fs.resume();
    assert!(wait_until(|| enables(&fx.log) == 2));
    // This backend cannot hand over its state: a snapshot is refused
    // with an error that says so, and nothing is stopped.
    let before = requests(&fx.log).len();
    let e = fx.fs.queue_progress().unwrap_err();
    assert!(e.to_string().contains("DEVICE_STATE"), "{e}");
    assert_eq!(requests(&fx.log).len(), before);
    assert!(fx.fs.backend_state().is_none());
    let e = fx.fs.restoring(Some(b"state")).unwrap_err();
    assert!(e.to_string().contains("cannot load"), "{e}");
    assert!(fx.fs.reset());
}
