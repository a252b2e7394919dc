//! virtio-mem through its queue: requests crafted as a driver would lay
//! them out, answered by the worker.

use super::*;
use crate::test_utils::*;

const BLOCK: u64 = 2 << 20;
const BASE: u64 = 1 << 32;

struct NoDiscard;
impl MemoryBackend for NoDiscard {
    fn discard(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fn device(blocks: u64) -> VirtioMem {
    let g = MemGeometry {
        addr: BASE,
        region_size: blocks * BLOCK,
        block_size: BLOCK,
    };
    VirtioMem::new(g, Arc::new(NoDiscard)).unwrap()
}

fn req(kind: u16, addr: u64, nb: u16) -> [u8; REQ_SIZE] {
    let mut r = [0u8; REQ_SIZE];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[8..16].copy_from_slice(&addr.to_le_bytes());
    r[16..18].copy_from_slice(&nb.to_le_bytes());
    r
}

/// Queues `request` with a response buffer of `resp_len`; returns the
/// response buffer's address.
fn send(tq: &mut TestQueue, request: &[u8], resp_len: u32) -> u64 {
    let (_, addrs) = tq.add_chain(&[(Readable, request.len() as u32), (Writable, resp_len)]);
    tq.write(addrs[0], request);
    addrs[1]
}

fn kind(tq: &TestQueue, addr: u64) -> u16 {
    u16::from_le_bytes(tq.read(addr, 2).try_into().unwrap())
}

fn config_u64(dev: &VirtioMem, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.read_config(offset, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn config_space_describes_the_region() {
    let dev = device(16);
    let h = dev.handle();
    assert_eq!(dev.device_type(), 24);
    assert_eq!(config_u64(&dev, 0), BLOCK);
    assert_eq!(config_u64(&dev, 16), BASE);
    assert_eq!(config_u64(&dev, 24), 16 * BLOCK);
    assert_eq!(config_u64(&dev, 32), 16 * BLOCK);
    assert_eq!(config_u64(&dev, 48), 0);
    h.set_requested_size(4 * BLOCK).unwrap();
    assert_eq!(config_u64(&dev, 48), 4 * BLOCK);
    assert!(h.set_requested_size(17 * BLOCK).is_err());
    assert_eq!(h.requested_size(), 4 * BLOCK);
    let mut beyond = [0xffu8; 8];
    dev.read_config(CONFIG_SIZE as u64, &mut beyond);
    assert_eq!(beyond, [0; 8]);
}

#[test]
fn requests_through_the_queue() {
    let mem = single_region_mem(0x10_0000);
    let mut tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let aq = tq.active(0);
    let kick = aq.event.try_clone().unwrap();
    let irq = recorder();
    let mut dev = device(16);
    let h = dev.handle();
    h.set_requested_size(2 * BLOCK).unwrap();
    dev.activate(atomic_mem(&mem), irq.clone(), vec![aq])
        .unwrap();

    let plug = send(&mut tq, &req(REQ_PLUG, BASE, 2), RESP_SIZE as u32);
    let nack = send(
        &mut tq,
        &req(REQ_PLUG, BASE + 4 * BLOCK, 1),
        RESP_SIZE as u32,
    );
    let state = send(&mut tq, &req(REQ_STATE, BASE, 4), RESP_SIZE as u32);
    let misaligned = send(&mut tq, &req(REQ_UNPLUG, BASE + 512, 1), RESP_SIZE as u32);
    kick.write(1).unwrap();
    assert!(wait_until(|| tq.used_idx() == 4));
    assert_eq!(tq.used_entry(0).1, RESP_SIZE as u32);
    assert_eq!(kind(&tq, plug), RESP_ACK);
    assert_eq!(kind(&tq, nack), RESP_NACK);
    assert_eq!(kind(&tq, state), RESP_ACK);
    assert_eq!(tq.read(state + 8, 2), STATE_MIXED.to_le_bytes());
    assert_eq!(kind(&tq, misaligned), RESP_ERROR);
    assert_eq!(h.plugged_size(), 2 * BLOCK);
    assert_eq!(config_u64(&dev, 40), 2 * BLOCK);

    // Shrinking: the driver unplugs.
    h.set_requested_size(0).unwrap();
    let unplug = send(&mut tq, &req(REQ_UNPLUG, BASE + BLOCK, 1), RESP_SIZE as u32);
    let all = send(&mut tq, &REQ_UNPLUG_ALL.to_le_bytes(), RESP_SIZE as u32);
    kick.write(1).unwrap();
    assert!(wait_until(|| tq.used_idx() == 6));
    assert_eq!(kind(&tq, unplug), RESP_ACK);
    assert_eq!(kind(&tq, all), RESP_ACK);
    assert_eq!(h.plugged_size(), 0);

    let c = dev.counters();
    assert_eq!(c["requests"], 6);
    assert_eq!(c["plugged_blocks"], 2);
    assert_eq!(c["unplugged_blocks"], 1);
    assert_eq!(c["unplug_all"], 1);
    assert_eq!(c["nacks"], 1);
    assert_eq!(c["errors"], 1);
    assert!(wait_until(|| irq.count() >= 1));
    assert!(dev.reset());
}

#[test]
fn reset_keeps_plugged_blocks() {
    let mem = single_region_mem(0x10_0000);
    let mut tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let aq = tq.active(0);
    let kick = aq.event.try_clone().unwrap();
    let mut dev = device(4);
    let h = dev.handle();
    h.set_requested_size(4 * BLOCK).unwrap();
    dev.activate(atomic_mem(&mem), recorder(), vec![aq])
        .unwrap();
    send(&mut tq, &req(REQ_PLUG, BASE, 4), RESP_SIZE as u32);
    kick.write(1).unwrap();
    assert!(wait_until(|| tq.used_idx() == 1));
    assert!(dev.reset());
    assert_eq!(h.plugged_size(), 4 * BLOCK);
    assert_eq!(h.requested_size(), 4 * BLOCK);
}

#[test]
fn chains_without_room_for_a_response_are_not_executed() {
    let mem = single_region_mem(0x10_0000);
    let mut tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let aq = tq.active(0);
    let kick = aq.event.try_clone().unwrap();
    let mut dev = device(4);
    let h = dev.handle();
    h.set_requested_size(4 * BLOCK).unwrap();
    dev.activate(atomic_mem(&mem), recorder(), vec![aq])
        .unwrap();
    send(&mut tq, &req(REQ_PLUG, BASE, 1), 4); // response buffer too small
    tq.add_chain(&[(Readable, REQ_SIZE as u32)]); // no response buffer
    tq.add_raw_chain(&[
        (0x1000_0000, REQ_SIZE as u32, Readable),
        (0x2_0000, 16, Writable),
    ]);
    let short = send(&mut tq, &req(REQ_PLUG, BASE, 1)[..10], RESP_SIZE as u32); // truncated
    kick.write(1).unwrap();
    assert!(wait_until(|| tq.used_idx() == 4));
    for i in 0..3 {
        assert_eq!(tq.used_entry(i).1, 0, "chain {i}");
    }
    assert_eq!(kind(&tq, short), RESP_ERROR);
    assert_eq!(h.plugged_size(), 0);
    assert_eq!(dev.counters()["errors"], 4);
}
