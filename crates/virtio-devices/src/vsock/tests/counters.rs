//! The vsock device's counters against what the simulated guest saw.

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
