//! The vsock device's counters against what the simulated guest saw, and
//! the host ports it saves in a snapshot.

use std::io::{Read, Write};

use super::super::packet::*;
use super::super::*;
use super::Guest;

#[test]
fn counters_follow_packets_both_ways() {
    let mut g = Guest::direct();
    g.post_rx(8);
    let (mut s, host_port) = g.host_connect(52);
    s.write_all(b"hello").unwrap();
    let (_, data) = g.recv();
    assert_eq!(data, b"hello");
    g.send(52, host_port, op::RW, 0, b"world!");
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    // Shorter than a header.
    g.send_raw(&[1, 2, 3]);
    let c = g.dev.counters();
    // RESPONSE, RW and the runt.
    assert_eq!(c["tx_packets"], 3);
    assert_eq!(c["tx_bytes"], 6);
    assert_eq!(c["tx_malformed"], 1);
    // REQUEST and RW (and whatever credit updates the guest also got).
    assert_eq!(c["rx_packets"], u64::from(g.rx_seen));
    assert!(c["rx_packets"] >= 2);
    assert_eq!(c["rx_bytes"], 5);
    // One receive kick, three transmit kicks, each handled on its own.
    assert_eq!(c["notifications"], 4);
    // Driven directly, past the counting interrupt of activation.
    assert_eq!(c["interrupts"], 0);
}

/// A restored device goes on with the host ports of its snapshot: the
/// guest may still hold sockets of connections it was closing then, and a
/// REQUEST from a (host port, guest port) one of them has would be reset.
#[test]
fn host_ports_go_on_from_the_snapshot() {
    let mut g = Guest::direct();
    g.post_rx(8);
    let (_a, first) = g.host_connect(52);
    let (_b, second) = g.host_connect(52);
    assert_eq!(second, first + 1);
    let saved = g
        .dev
        .backend_state()
        .expect("vsock saves its next host port");
    assert_eq!(saved, (second + 1).to_le_bytes());

    let mut restored = Guest::direct();
    restored.post_rx(8);
    restored.dev.restoring(Some(&saved)).unwrap();
    let (_c, port) = restored.host_connect(52);
    assert_eq!(port, second + 1);
    // A snapshot of a VMM that kept no port restores as before; a state
    // of another shape is refused.
    restored.dev.restoring(None).unwrap();
    assert!(restored.dev.restoring(Some(&[1, 2, 3])).is_err());
}
