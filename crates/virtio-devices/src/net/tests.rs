use super::*;
use crate::test_utils::*;
use crate::worker::EventLoop;
use std::os::unix::net::UnixDatagram;
use vmm_sys_util::eventfd::EventFd;

struct Fx {
    net: Net,
    peer: UnixDatagram,
    txq: TestQueue,
    tx_kick: EventFd,
}

fn fixture() -> Fx {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mem = single_region_mem(0x40_0000);
    let rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
    let (rx, tx) = (rxq.active(0), txq.active(1));
    let tx_kick = tx.event.try_clone().unwrap();
    let mut net = Net::with_backend(
        tap::raw_backend(OwnedFd::from(a)),
        parse_mac("52:54:00:12:34:56").unwrap(),
    );
    net.activate(atomic_mem(&mem), recorder(), vec![rx, tx])
        .unwrap();
    Fx {
        net,
        peer: b,
        txq,
        tx_kick,
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(payload);
    f
}

#[test]
fn mac_parsing_and_config() {
    assert_eq!(
        parse_mac("52:54:00:ab:CD:ef").unwrap(),
        [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
    );
    for bad in [
        "",
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:ef:00",
        "5:54:00:ab:cd:ef",
        "zz:54:00:ab:cd:ef",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad}");
    }
    let (a, _b) = UnixDatagram::pair().unwrap();
    let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(7));
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 0, 0, 7]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    // A snapshot of a NIC with another MAC restores onto this one (a
    // clone); other configuration must match.
    let mut saved = [0u8; 16];
    net.read_config(0, &mut saved);
    let mut other_mac = saved;
    other_mac[5] = 9;
    assert!(net.config_restorable(&other_mac, &saved));
    let mut other_status = saved;
    other_status[6] = 0;
    assert!(!net.config_restorable(&other_status, &saved));
    assert!(!net.config_restorable(&saved[..8], &saved));
}

#[test]
fn tx_frames_reach_the_tap() {
    let mut fx = fixture();
    let f = frame(b"\xff\xff\xff\xff\xff\xffethernet frame");
    // Header and payload in separate descriptors.
    let (_, addrs) = fx.txq.add_chain(&[
        (Readable, VNET_HDR_LEN as u32),
        (Readable, (f.len() - VNET_HDR_LEN) as u32),
    ]);
    fx.txq.write(addrs[0], &f[..VNET_HDR_LEN]);
    fx.txq.write(addrs[1], &f[VNET_HDR_LEN..]);
    fx.tx_kick.write(1).unwrap();
    let mut buf = [0u8; 256];
    let n = fx.peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
    // A runt without a full header is dropped, not sent.
    fx.txq.add_chain(&[(Readable, 4)]);
    fx.tx_kick.write(1).unwrap();
    assert!(wait_until(|| fx.txq.used_idx() == 2));
    assert!(wait_until(|| fx.net.counters()["interrupts"] >= 1));
    let c = fx.net.counters();
    assert_eq!((c["tx_frames"], c["tx_bytes"]), (1, f.len() as u64));
    assert_eq!(c["dropped"], 1);
    // The second kick may find its chain already taken by the first turn.
    assert!((1..=2).contains(&c["notifications"]), "{c:?}");
    assert_eq!((c["rx_frames"], c["rx_bytes"]), (0, 0));
}

/// Driven directly, so "nothing was delivered" is a fact: frames wait
/// in the tap until the guest posts buffers.
#[test]
fn rx_frames_wait_for_buffers() {
    let (a, peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mem = single_region_mem(0x40_0000);
    let mut rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
    let (rx, tx) = (rxq.active(0), txq.active(1));
    let rx_kick = rx.event.try_clone().unwrap();
    let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(6));
    let handler = net
        .handler(atomic_mem(&mem), recorder(), vec![rx, tx])
        .unwrap();
    let mut el = EventLoop::new(handler).unwrap();
    peer.send(&frame(b"first")).unwrap();
    peer.send(&frame(b"second")).unwrap();
    el.run_until_idle(10).unwrap();
    assert_eq!(rxq.used_idx(), 0);
    let (_, a1) = rxq.add_chain(&[(Writable, 1526)]);
    let (_, a2) = rxq.add_chain(&[(Writable, 1526)]);
    rx_kick.write(1).unwrap();
    el.run_until_idle(10).unwrap();
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(rxq.used_entry(0).1 as usize, VNET_HDR_LEN + 5);
    let got = rxq.read(a1[0], VNET_HDR_LEN + 5);
    assert_eq!(&got[VNET_HDR_LEN..], b"first");
    assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
    assert_eq!(
        &rxq.read(a2[0], VNET_HDR_LEN + 6)[VNET_HDR_LEN..],
        b"second"
    );
    // Too small a buffer: the frame is dropped, the buffer returned empty.
    peer.send(&frame(&[0u8; 100])).unwrap();
    rxq.add_chain(&[(Writable, 20)]);
    rx_kick.write(1).unwrap();
    el.run_until_idle(10).unwrap();
    assert_eq!(rxq.used_idx(), 3);
    assert_eq!(rxq.used_entry(2).1, 0);
    let c = net.counters();
    assert_eq!(c["rx_frames"], 2);
    assert_eq!(c["rx_bytes"], 2 * VNET_HDR_LEN as u64 + 11);
    assert_eq!((c["dropped"], c["notifications"]), (1, 2));
}

#[test]
fn corrupt_rx_ring_does_not_block_reset() {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.send(&frame(b"waiting")).unwrap();
    let mem = single_region_mem(0x40_0000);
    let mut rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
    rxq.set_avail_idx(1000);
    let mut net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(3));
    net.activate(
        atomic_mem(&mem),
        recorder(),
        vec![rxq.active(0), txq.active(1)],
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(within(5, move || net.reset()));
    assert_eq!(rxq.used_idx(), 0);
}

/// Driven directly: the corrupt receive ring is given up after one
/// turn, logged once, the driver asked for a reset, and transmit
/// still works.
#[test]
fn corrupt_rx_ring_stops_only_that_queue() {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    for _ in 0..3 {
        b.send(&frame(b"waiting")).unwrap();
    }
    let mem = single_region_mem(0x40_0000);
    let mut rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let mut txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
    rxq.set_avail_idx(1000);
    let (rx, tx) = (rxq.active(0), txq.active(1));
    let (rx_kick, tx_kick) = (rx.event.try_clone().unwrap(), tx.event.try_clone().unwrap());
    let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(3));
    let irq = recorder();
    let handler = net
        .handler(atomic_mem(&mem), irq.clone(), vec![rx, tx])
        .unwrap();
    let ((turns, mut el), logs) = within(5, move || {
        capture_logs(|| {
            let mut el = EventLoop::new(handler).unwrap();
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
    assert_eq!(rxq.used_idx(), 0);
    assert_eq!(irq.needs_reset.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Transmit is unaffected.
    let f = frame(b"still here");
    let (_, addrs) = txq.add_chain(&[(Readable, f.len() as u32)]);
    txq.write(addrs[0], &f);
    tx_kick.write(1).unwrap();
    el.run_until_idle(10).unwrap();
    assert_eq!(txq.used_idx(), 1);
    b.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let n = b.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
}

/// The backend hangs up (read returns 0): the worker neither loops in
/// `read_frame` nor spins on the level-triggered end-of-file, logs it
/// once, and transmit is still served.
#[test]
fn backend_eof_is_not_a_loop() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    drop(b);
    let mem = single_region_mem(0x40_0000);
    let rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let mut txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
    let (rx, tx) = (rxq.active(0), txq.active(1));
    let tx_kick = tx.event.try_clone().unwrap();
    let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(4));
    let handler = net
        .handler(atomic_mem(&mem), recorder(), vec![rx, tx])
        .unwrap();
    let ((turns, mut el), logs) = within(5, move || {
        capture_logs(|| {
            let mut el = EventLoop::new(handler).unwrap();
            (el.run_until_idle(10).unwrap(), el)
        })
    });
    assert!(turns < 10, "still busy after {turns} turns");
    let eof: Vec<_> = logs.iter().filter(|l| l.contains("hung up")).collect();
    assert_eq!(eof.len(), 1, "{logs:?}");
    txq.add_chain(&[(Readable, 4)]);
    tx_kick.write(1).unwrap();
    el.run_until_idle(10).unwrap();
    assert_eq!(txq.used_idx(), 1);
}

/// Bad transmit chains by the hundred log a bounded number of lines.
#[test]
fn bad_tx_chains_are_logged_at_a_bounded_rate() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mem = single_region_mem(0x40_0000);
    let rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let mut txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
    let (rx, tx) = (rxq.active(0), txq.active(1));
    let tx_kick = tx.event.try_clone().unwrap();
    let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(5));
    let handler = net
        .handler(atomic_mem(&mem), recorder(), vec![rx, tx])
        .unwrap();
    let mut el = EventLoop::new(handler).unwrap();
    let ((), logs) = capture_logs(|| {
        for _ in 0..20 {
            for _ in 0..10 {
                txq.add_raw_chain(&[(0x4000_0000, 64, Readable)]);
            }
            tx_kick.write(1).unwrap();
            el.run_until_idle(10).unwrap();
        }
    });
    assert_eq!(txq.used_idx(), 200);
    let limit = crate::ratelimit::LINES_PER_SECOND as usize;
    assert!(
        logs.len() <= limit + 1,
        "{} lines: {:?}",
        logs.len(),
        &logs[..3]
    );
}

#[test]
fn real_tap_opens_when_permitted() {
    match tap::open_tap("skifftest0") {
        Ok(t) => {
            let flags = std::fs::read_to_string("/sys/class/net/skifftest0/flags").unwrap();
            let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
            assert_eq!(flags & 1, 1, "IFF_UP set");
            let net = Net::with_backend(t, generated_mac(1));
            assert_eq!(net.mac()[0], 0x52);
        }
        // Unprivileged environments cannot create taps.
        Err(e @ (TapError::OpenTun(_) | TapError::Ioctl { .. })) => {
            eprintln!("SKIPPED: real_tap_opens_when_permitted: cannot create a tap: {e}");
        }
        Err(e) => panic!("{e}"),
    }
    assert!(matches!(
        tap::open_tap("this-name-is-too-long"),
        Err(TapError::InvalidName(_))
    ));
}

/// The kernel answers an ARP request sent by the guest through a real
/// tap: the virtio-net header and frame layout match what the tap
/// expects, both ways. Needs CAP_NET_ADMIN and `ip`; otherwise it
/// only checks that the tap cannot be opened.
#[test]
fn kernel_answers_arp_through_a_real_tap() {
    let name = format!("skt{}", std::process::id() % 100_000);
    let tap = match tap::open_tap(&name) {
        Ok(tap) => tap,
        Err(e) => {
            eprintln!("SKIPPED: kernel_answers_arp_through_a_real_tap: no tap ({e}; needs CAP_NET_ADMIN and /dev/net/tun)");
            return;
        }
    };
    let subnet = 10 + std::process::id() % 200;
    let host_ip = [10, 99, subnet as u8, 1];
    let guest_ip = [10, 99, subnet as u8, 2];
    let ok = std::process::Command::new("ip")
        .args(["addr", "add", &format!("10.99.{subnet}.1/24"), "dev", &name])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: kernel_answers_arp_through_a_real_tap: `ip addr add` failed");
        return;
    }
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mem = single_region_mem(0x40_0000);
    let rxq = TestQueue::new(&mem, 0, 64, 0x1_0000);
    let mut txq = TestQueue::new(&mem, 0x2000, 16, 0x20_0000);
    let (rx, tx) = (rxq.active(0), txq.active(1));
    let rx_kick = rx.event.try_clone().unwrap();
    let tx_kick = tx.event.try_clone().unwrap();
    let mut net = Net::with_backend(tap, mac);
    net.activate(atomic_mem(&mem), recorder(), vec![rx, tx])
        .unwrap();
    let mut rxq = rxq;
    let bufs: Vec<u64> = (0..32)
        .map(|_| rxq.add_chain(&[(Writable, 1526)]).1[0])
        .collect();
    rx_kick.write(1).unwrap();

    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&guest_ip);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&host_ip);
    let (_, addrs) = txq.add_chain(&[(Readable, frame.len() as u32)]);
    txq.write(addrs[0], &frame);
    tx_kick.write(1).unwrap();

    // Other frames (IPv6 router solicitations, ...) may come first.
    let found = wait_until(|| {
        (0..rxq.used_idx()).any(|i| {
            let (head, len) = rxq.used_entry(i);
            let f = rxq.read(bufs[usize::from(head)], len as usize);
            let eth = &f[VNET_HDR_LEN..];
            eth.len() >= 42
                && eth[..6] == mac
                && eth[12..14] == [0x08, 0x06]
                && eth[20..22] == [0, 2]
                && eth[28..32] == host_ip
        })
    });
    assert!(found, "ARP reply from the host kernel");
    assert!(net.reset());
}
