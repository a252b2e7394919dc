//! A hostile guest's receive ring: the worker neither spins nor ignores
//! its kill event.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::super::packet::*;
use super::super::*;
use super::{Guest, CID};
use crate::test_utils::*;

/// A corrupt receive ring while the muxer has a packet for the guest: the
/// worker must not spin, so a reset (the kill event) still gets through.
#[test]
fn corrupt_rx_ring_does_not_block_reset() {
    let mut g = Guest::new();
    g.rxq.set_avail_idx(1000);
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(b"CONNECT 9\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut dev = g.dev;
    assert!(within(5, move || dev.reset()));
}

/// Driven directly: a corrupt receive ring with a REQUEST waiting is given
/// up after one turn and logged once; transmit still works.
#[test]
fn corrupt_rx_ring_stops_only_that_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mem = single_region_mem(0x100_0000);
    let mut rxq = TestQueue::new(&mem, 0x0, 16, 0x10_0000);
    let mut txq = TestQueue::new(&mem, 0x4000, 16, 0x80_0000);
    let evq = TestQueue::new(&mem, 0x8000, 16, 0xf0_0000);
    rxq.set_avail_idx(1000);
    let (rx, tx, ev) = (rxq.active(0), txq.active(1), evq.active(2));
    let (rx_kick, tx_kick) = (rx.event.try_clone().unwrap(), tx.event.try_clone().unwrap());
    let dev = Vsock::new(CID, &path).unwrap();
    let irq = recorder();
    let handler = dev
        .handler(atomic_mem(&mem), irq.clone(), vec![rx, tx, ev])
        .unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 9\n").unwrap();
    let ((turns, mut el), logs) = within(5, move || {
        capture_logs(|| {
            let mut el = crate::worker::EventLoop::new(handler).unwrap();
            for _ in 0..3 {
                rx_kick.write(1).unwrap();
                el.run_until_idle(10).unwrap();
            }
            (el.run_until_idle(10).unwrap(), el)
        })
    });
    assert_eq!(turns, 0, "nothing left to do");
    let broken: Vec<_> = logs.iter().filter(|l| l.contains("stopped")).collect();
    assert_eq!(broken.len(), 1, "{logs:?}");
    assert_eq!(irq.needs_reset.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The guest's RST for an unknown connection is still read.
    let h = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        type_: TYPE_STREAM,
        op: op::RST,
        ..Header::default()
    };
    let (_, addrs) = txq.add_chain(&[(Readable, HDR_SIZE as u32)]);
    txq.write(addrs[0], &h.to_bytes());
    tx_kick.write(1).unwrap();
    el.run_until_idle(10).unwrap();
    assert_eq!(txq.used_idx(), 1);
}
