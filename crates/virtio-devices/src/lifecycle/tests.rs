use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::*;
use crate::device::VirtioDevice;
use crate::rng::{Rng, RngHandler};
use crate::test_utils::*;
use crate::worker::{EpollCtx, EventToken};
use virtio_queue::QueueT;

/// An rng handler on a worker, with its queue's driver side and kick.
fn rng_worker(mem: &GuestMemoryMmap) -> (Worker<RngHandler>, TestQueue, EventFd) {
    let tq = TestQueue::new(mem, 0, 16, 0x1_0000);
    let aq = tq.active(0);
    let kick = aq.event.try_clone().unwrap();
    let handler = Rng::new()
        .handler(atomic_mem(mem), recorder(), vec![aq])
        .unwrap();
    (Worker::spawn("test-rng", handler).unwrap(), tq, kick)
}

#[test]
fn a_notification_during_pause_is_handled_after_resume() {
    let mem = single_region_mem(0x10_0000);
    let (worker, mut tq, kick) = rng_worker(&mem);
    worker.pause();
    assert!(worker.is_parked());
    tq.add_chain(&[(Writable, 16)]);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(tq.used_idx(), 0, "a paused worker touched guest memory");
    // Pausing a paused worker returns at once.
    worker.pause();
    assert!(worker.is_parked());
    worker.resume();
    assert!(wait_until(|| tq.used_idx() == 1), "notification lost");
    assert!(!worker.is_parked());
    // Resumed for good: later notifications are handled as usual.
    tq.add_chain(&[(Writable, 16)]);
    kick.write(1).unwrap();
    assert!(wait_until(|| tq.used_idx() == 2));
    let handler = worker.stop().unwrap();
    assert_eq!(handler.queue().queue.next_avail(), 2);
}

#[test]
fn a_paused_worker_stops_and_gives_back_its_handler() {
    let mem = single_region_mem(0x10_0000);
    let (worker, mut tq, kick) = rng_worker(&mem);
    tq.add_chain(&[(Writable, 16)]);
    kick.write(1).unwrap();
    assert!(wait_until(|| tq.used_idx() == 1));
    worker.pause();
    tq.add_chain(&[(Writable, 16)]);
    kick.write(1).unwrap();
    let handler = within(5, move || worker.stop()).unwrap();
    // The handler comes back with the state it stopped in: one chain
    // done, the one that arrived while paused left to the next owner.
    assert_eq!(handler.queue().queue.next_avail(), 1);
    assert_eq!(tq.used_idx(), 1);
}

#[test]
fn device_pause_reset_and_reactivate() {
    let mem = single_region_mem(0x10_0000);
    let mut rng = Rng::new();
    // Paused before activation: the worker starts parked.
    rng.pause();
    let mut tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let aq = tq.active(0);
    let kick = aq.event.try_clone().unwrap();
    rng.activate(atomic_mem(&mem), recorder(), vec![aq])
        .unwrap();
    assert!(rng.lifecycle().is_paused());
    let again = rng.activate(atomic_mem(&mem), recorder(), vec![tq.active(0)]);
    assert!(matches!(again, Err(ActivateError::AlreadyActive)));
    tq.add_chain(&[(Writable, 16)]);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rng.counters()["notifications"], 0);
    rng.resume();
    assert!(wait_until(|| tq.used_idx() == 1));
    assert_eq!(rng.counters()["notifications"], 1);
    rng.pause();
    let (handler, mut rng) = within(5, move || (rng.reset_worker(), rng));
    assert_eq!(handler.unwrap().queue().queue.next_avail(), 1);
    assert!(!rng.lifecycle().is_active());
    assert!(rng.reset_worker().is_none(), "nothing left to stop");
    // Activated again on fresh rings, still paused: parked until resumed.
    let mut tq = TestQueue::new(&mem, 0x4000, 16, 0x8_0000);
    let aq = tq.active(0);
    let kick = aq.event.try_clone().unwrap();
    rng.activate(atomic_mem(&mem), recorder(), vec![aq])
        .unwrap();
    assert!(rng.lifecycle().is_paused());
    tq.add_chain(&[(Writable, 16)]);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(tq.used_idx(), 0);
    rng.resume();
    assert!(wait_until(|| tq.used_idx() == 1));
}

/// A handler whose only event is an error: its worker ends by itself.
struct Failing {
    event: EventFd,
    handled: Arc<AtomicUsize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailToken {
    Event,
}
crate::worker::enum_tokens!(FailToken: Event);

impl EpollHandler for Failing {
    type Token = FailToken;
    fn register(&mut self, ctx: &EpollCtx<FailToken>) -> io::Result<()> {
        ctx.add(self.event.as_raw_fd(), FailToken::Event, EventSet::IN)
    }
    fn handle_event(
        &mut self,
        _ctx: &EpollCtx<FailToken>,
        _token: FailToken,
        _events: EventSet,
    ) -> Result<(), WorkerError> {
        self.handled.fetch_add(1, Ordering::SeqCst);
        Err(WorkerError::CorruptRing)
    }
}

#[test]
fn pause_and_stop_of_a_worker_that_ended_return() {
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let worker = Worker::spawn(
        "test-failing",
        Failing {
            event: event.try_clone().unwrap(),
            handled: handled.clone(),
        },
    )
    .unwrap();
    event.write(1).unwrap();
    assert!(wait_until(|| handled.load(Ordering::SeqCst) == 1));
    let handler = within(5, move || {
        worker.pause();
        worker.resume();
        worker.stop()
    })
    .unwrap();
    assert_eq!(handler.handled.load(Ordering::SeqCst), 1);
}

/// A token type that would collide with the loop's own token.
#[derive(Debug, Clone, Copy)]
struct Greedy(u64);

impl EventToken for Greedy {
    fn to_raw(self) -> u64 {
        self.0
    }
    fn from_raw(raw: u64) -> Option<Self> {
        Some(Greedy(raw))
    }
}

#[test]
fn the_control_token_is_reserved() {
    let ctx = EpollCtx::<Greedy>::new().unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = ctx.add(fd.as_raw_fd(), Greedy(u64::MAX), EventSet::IN);
    assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    ctx.add(fd.as_raw_fd(), Greedy(u64::MAX - 1), EventSet::IN)
        .unwrap();
}

#[test]
fn counted_interrupts_reach_the_transport() {
    let life = Lifecycle::<RngHandler>::new("test");
    let irq = recorder();
    let counted = life.counting(irq.clone());
    counted.trigger(VirtioInterruptType::Queue(0)).unwrap();
    counted.trigger(VirtioInterruptType::Config).unwrap();
    counted.device_needs_reset();
    assert_eq!(life.interrupts(), 2);
    assert_eq!(irq.count(), 2);
    assert_eq!(irq.needs_reset.load(Ordering::SeqCst), 1);
    let map = with_interrupts(BTreeMap::from([("requests", 7)]), &life);
    assert_eq!(map, BTreeMap::from([("interrupts", 2), ("requests", 7)]));
}

#[test]
fn queue_progress_of_a_paused_device_leaves_pending_work_untouched() {
    let mem = single_region_mem(0x10_0000);
    let mut tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
    let aq = tq.active(0);
    let kick = aq.event.try_clone().unwrap();
    let handler = Rng::new()
        .handler(atomic_mem(&mem), recorder(), vec![aq])
        .unwrap();
    let mut life = Lifecycle::new("test-rng");
    life.start(handler).unwrap();
    life.pause();
    // Work that arrives while paused: neither reading the progress nor
    // the worker started again over the handler may do it.
    tq.add_chain(&[(Writable, 16)]);
    kick.write(1).unwrap();
    for _ in 0..20 {
        let p = life.queue_progress().unwrap();
        assert_eq!((p[0].next_avail, p[0].next_used), (0, 0));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(tq.used_idx(), 0, "a paused device touched guest memory");
    life.resume();
    assert!(
        wait_until(|| tq.used_idx() == 1),
        "the pending work was lost"
    );
}
