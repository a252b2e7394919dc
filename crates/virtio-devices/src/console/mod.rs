//! virtio-console (`hvc0`): one port, output to a file or to a Unix socket
//! whose client can also type into the guest.
//!
//! Guest output never blocks the device: a slow socket client gets up to
//! [`MAX_PENDING_OUTPUT`] bytes buffered, and output beyond that is dropped.

use std::collections::VecDeque;

use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::device::{
    read_config_bytes, take_queue, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt,
};
use crate::lifecycle::{device_counters, Lifecycle, WorkerDevice};
use crate::ratelimit::LogLimiter;
use crate::rotating_log::{RotatingLog, DEFAULT_LOG_CAP};
use crate::worker::{
    drain_eventfd, enum_tokens, next_chain, signal_used_queue, EpollCtx, EpollHandler, WorkerError,
    WorkerQueue, CHAIN_BUDGET,
};
use crate::GuestMemoryMmap;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Output buffered for a slow socket client before output is dropped.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Bytes taken from one transmit chain.
const MAX_CHAIN_OUTPUT: usize = 64 * 1024;
/// Input read from the client before it is handed to the guest.
const INPUT_CHUNK: usize = 4096;

/// Errors creating a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file could not be opened.
    #[error("open console file {path}")]
    File {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The socket could not be bound.
    #[error("bind console socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Where the console goes.
#[derive(Debug, Clone)]
pub enum ConsoleOutput {
    /// Appended to a file, rotated to `PATH.1` at 16 MiB
    /// ([`crate::rotating_log`]).
    File(PathBuf),
    /// Served on a Unix socket (one client at a time; a new one replaces it).
    Socket(PathBuf),
}

enum Backend {
    File(Arc<Mutex<RotatingLog>>),
    Socket(UnixListener),
}

device_counters! {
    /// What the console did.
    pub struct ConsoleCounters {
        /// Queue notifications handled (receive and transmit).
        notifications,
        /// Output bytes the guest wrote.
        tx_bytes,
        /// Output bytes dropped (no client, or a client too slow).
        tx_dropped_bytes,
        /// Input bytes handed to the guest.
        rx_bytes,
    }
}

/// The virtio-console device.
pub struct Console {
    log: Arc<LogLimiter>,
    backend: Backend,
    acked_features: u64,
    life: Lifecycle<ConsoleHandler>,
    counters: Arc<ConsoleCounters>,
}

impl Console {
    /// Opens the file or binds the socket.
    pub fn new(output: &ConsoleOutput) -> Result<Self, ConsoleError> {
        let backend = match output {
            ConsoleOutput::File(path) => Backend::File(Arc::new(Mutex::new(
                RotatingLog::open(path, DEFAULT_LOG_CAP).map_err(|source| ConsoleError::File {
                    path: path.clone(),
                    source,
                })?,
            ))),
            ConsoleOutput::Socket(path) => Backend::Socket(bind(path)?),
        };
        Ok(Console {
            log: Arc::new(LogLimiter::new("virtio-console")),
            backend,
            acked_features: 0,
            life: Lifecycle::new("virtio-console"),
            counters: Arc::default(),
        })
    }
}

impl WorkerDevice for Console {
    type Handler = ConsoleHandler;
    fn lifecycle(&mut self) -> &mut Lifecycle<ConsoleHandler> {
        &mut self.life
    }
    fn handler(
        &self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<ConsoleHandler, ActivateError> {
        let rx = take_queue(&mut queues, RX_QUEUE)?;
        let tx = take_queue(&mut queues, TX_QUEUE)?;
        let out = match &self.backend {
            Backend::File(f) => Output::File(f.clone()),
            Backend::Socket(l) => Output::Socket {
                listener: l.try_clone().map_err(ActivateError::Io)?,
                client: None,
                pending: VecDeque::new(),
            },
        };
        Ok(ConsoleHandler {
            mem,
            interrupt,
            rx: rx.into(),
            tx: tx.into(),
            out,
            input: Vec::new(),
            client_events: EventSet::empty(),
            log: self.log.clone(),
            counters: self.counters.clone(),
        })
    }
}

fn bind(path: &Path) -> Result<UnixListener, ConsoleError> {
    let err = |source| ConsoleError::Bind {
        path: path.to_path_buf(),
        source,
    };
    crate::socket::bind_listener(path).map_err(err)
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        crate::device::RING_FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports (1), emerg_wr.
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }
    crate::lifecycle::lifecycle_methods!();
    fn reset(&mut self) -> bool {
        self.reset_worker();
        self.acked_features = 0;
        true
    }
}

enum Output {
    File(Arc<Mutex<RotatingLog>>),
    Socket {
        listener: UnixListener,
        client: Option<UnixStream>,
        pending: VecDeque<u8>,
    },
}

/// Events of the console worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The guest added receive buffers.
    RxQueue,
    /// The guest wrote output.
    TxQueue,
    /// A socket client connects.
    Listener,
    /// The socket client is readable or writable.
    Client,
}
enum_tokens!(Token: RxQueue, TxQueue, Listener, Client);

/// The console worker's handler.
pub struct ConsoleHandler {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: WorkerQueue,
    tx: WorkerQueue,
    out: Output,
    /// Client input not yet given to the guest.
    input: Vec<u8>,
    client_events: EventSet,
    log: Arc<LogLimiter>,
    counters: Arc<ConsoleCounters>,
}

impl ConsoleHandler {
    fn process_tx(&mut self, ctx: &EpollCtx<Token>) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let (out, log, counters) = (&mut self.out, &*self.log, &*self.counters);
        let irq = self.interrupt.as_ref();
        self.tx.serve(ctx, "virtio-console", irq, |q| {
            q.process(&mem, irq, |chain| {
                if let Some(text) = read_tx_chain(&mem, chain, log) {
                    counters.tx_bytes.add(text.len() as u64);
                    let dropped = write_output(out, &text, log);
                    counters.tx_dropped_bytes.add(dropped as u64);
                }
                0
            })
            .map(drop)
        })
    }

    /// Hands client input to the guest's receive buffers, at most
    /// [`CHAIN_BUDGET`] of them per turn (then the queue re-arms itself).
    fn fill_rx(&mut self, ctx: &EpollCtx<Token>) -> Result<(), WorkerError> {
        if self.input.is_empty() {
            return Ok(());
        }
        let mem = self.mem.memory();
        let irq = self.interrupt.as_ref();
        let (input, log, counters) = (&mut self.input, &*self.log, &*self.counters);
        self.rx.serve(ctx, "virtio-console", irq, |q| {
            let mut used = 0;
            while !input.is_empty() {
                if used == CHAIN_BUDGET {
                    q.rearm();
                    break;
                }
                let Some(chain) = next_chain(&mut q.queue, &mem)? else {
                    break;
                };
                let head = chain.head_index();
                let len = write_input(&mem, chain, input, log);
                counters.rx_bytes.add(u64::from(len));
                q.queue
                    .add_used(&*mem, head, len)
                    .map_err(WorkerError::Queue)?;
                used += 1;
            }
            if used > 0 {
                signal_used_queue(&mut q.queue, &mem, q.index as u16, irq)?;
            }
            Ok(())
        })
    }

    fn accept(&mut self, ctx: &EpollCtx<Token>) {
        let Output::Socket {
            listener,
            client,
            pending,
        } = &mut self.out
        else {
            return;
        };
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        if let Some(old) = client.take() {
            let _ = ctx.remove(old.as_raw_fd());
        }
        pending.clear();
        self.client_events = EventSet::empty();
        *client = Some(stream);
    }

    fn client_event(&mut self, events: EventSet) {
        let Output::Socket {
            client, pending, ..
        } = &mut self.out
        else {
            return;
        };
        let Some(stream) = client else { return };
        let mut gone = false;
        if events.contains(EventSet::IN) && self.input.is_empty() {
            let mut buf = [0u8; INPUT_CHUNK];
            match stream.read(&mut buf) {
                Ok(0) => gone = true,
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => gone = true,
            }
        }
        if !gone && !pending.is_empty() {
            gone = flush_pending(stream, pending).is_err();
        }
        if gone || events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            *client = None;
            pending.clear();
        }
    }

    /// Watches the client for what we can act on: input when the guest
    /// has taken the previous input, output when some is pending.
    fn sync_client(&mut self, ctx: &EpollCtx<Token>) {
        let Output::Socket {
            client, pending, ..
        } = &self.out
        else {
            return;
        };
        let Some(stream) = client else {
            self.client_events = EventSet::empty();
            return;
        };
        let mut want = EventSet::empty();
        if self.input.is_empty() {
            want |= EventSet::IN;
        }
        if !pending.is_empty() {
            want |= EventSet::OUT;
        }
        if want == self.client_events {
            return;
        }
        let fd = stream.as_raw_fd();
        let token = Token::Client;
        let r = match (self.client_events.is_empty(), want.is_empty()) {
            (true, _) => ctx.add(fd, token, want),
            (false, true) => ctx.remove(fd),
            (false, false) => ctx.modify(fd, token, want),
        };
        match r {
            Ok(()) => self.client_events = want,
            Err(e) => log::warn!("virtio-console: epoll: {e}"),
        }
    }
}

/// Moves as much of `input` as fits into a receive chain; returns the
/// bytes written.
fn write_input(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    input: &mut Vec<u8>,
    log: &LogLimiter,
) -> u32 {
    let mut w = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            crate::guest_log!(log, log::Level::Warn, "virtio-console: bad rx chain: {e}");
            return 0;
        }
    };
    let n = w.available_bytes().min(input.len());
    if let Err(e) = w.write_all(&input[..n]) {
        crate::guest_log!(log, log::Level::Warn, "virtio-console: {e}");
        return 0;
    }
    input.drain(..n);
    n as u32
}

/// The output in a transmit chain (at most 64 KiB of it).
pub fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    log: &LogLimiter,
) -> Option<Vec<u8>> {
    let mut reader = match Reader::new(mem, chain) {
        Ok(r) => r,
        Err(e) => {
            crate::guest_log!(log, log::Level::Warn, "virtio-console: bad tx chain: {e}");
            return None;
        }
    };
    let mut buf = vec![0u8; reader.available_bytes().min(MAX_CHAIN_OUTPUT)];
    match reader.read_exact(&mut buf) {
        Ok(()) => Some(buf),
        Err(e) => {
            crate::guest_log!(log, log::Level::Warn, "virtio-console: {e}");
            None
        }
    }
}

fn flush_pending(stream: &mut UnixStream, pending: &mut VecDeque<u8>) -> io::Result<()> {
    while !pending.is_empty() {
        let (front, _) = pending.as_slices();
        match stream.write(front) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes guest output; returns the bytes dropped.
fn write_output(out: &mut Output, data: &[u8], log: &LogLimiter) -> usize {
    match out {
        Output::File(f) => {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = f.write_all(data) {
                crate::guest_log!(log, log::Level::Warn, "virtio-console: output file: {e}");
                return data.len();
            }
            0
        }
        Output::Socket {
            client, pending, ..
        } => {
            let Some(stream) = client else {
                return data.len();
            };
            let room = MAX_PENDING_OUTPUT - pending.len();
            if data.len() > room {
                crate::guest_log!(
                    log,
                    log::Level::Debug,
                    "virtio-console: client too slow, {} bytes dropped",
                    data.len() - room
                );
            }
            pending.extend(&data[..data.len().min(room)]);
            if flush_pending(stream, pending).is_err() {
                *client = None;
                pending.clear();
            }
            data.len().saturating_sub(room)
        }
    }
}

impl EpollHandler for ConsoleHandler {
    type Token = Token;

    fn register(&mut self, ctx: &EpollCtx<Token>) -> io::Result<()> {
        ctx.add(self.rx.event.as_raw_fd(), Token::RxQueue, EventSet::IN)?;
        ctx.add(self.tx.event.as_raw_fd(), Token::TxQueue, EventSet::IN)?;
        if let Output::Socket { listener, .. } = &self.out {
            ctx.add(listener.as_raw_fd(), Token::Listener, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        ctx: &EpollCtx<Token>,
        token: Token,
        events: EventSet,
    ) -> Result<(), WorkerError> {
        match token {
            Token::RxQueue => {
                drain_eventfd(&self.rx.event);
                self.counters.notifications.inc();
            }
            Token::TxQueue => {
                drain_eventfd(&self.tx.event);
                self.counters.notifications.inc();
                self.process_tx(ctx)?;
            }
            Token::Listener => self.accept(ctx),
            Token::Client => self.client_event(events),
        }
        self.fill_rx(ctx)?;
        if let Output::Socket { client: None, .. } = &self.out {
            if !self.client_events.is_empty() {
                // The client went away; its fd is closed, which removed it
                // from the epoll set.
                self.client_events = EventSet::empty();
            }
        }
        self.sync_client(ctx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use std::time::Duration;

    fn start(
        output: ConsoleOutput,
    ) -> (
        Console,
        GuestMemoryMmap,
        TestQueue,
        TestQueue,
        ActiveQueueKicks,
    ) {
        let mem = single_region_mem(0x10_0000);
        let rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let txq = TestQueue::new(&mem, 0x1000, 16, 0x8_0000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let kicks = ActiveQueueKicks {
            rx: rx.event.try_clone().unwrap(),
            tx: tx.event.try_clone().unwrap(),
        };
        let mut c = Console::new(&output).unwrap();
        c.activate(atomic_mem(&mem), recorder(), vec![rx, tx])
            .unwrap();
        (c, mem, rxq, txq, kicks)
    }

    struct ActiveQueueKicks {
        rx: vmm_sys_util::eventfd::EventFd,
        tx: vmm_sys_util::eventfd::EventFd,
    }

    fn guest_print(txq: &mut TestQueue, kick: &vmm_sys_util::eventfd::EventFd, text: &[u8]) {
        let (_, addrs) = txq.add_chain(&[(Readable, text.len() as u32)]);
        txq.write(addrs[0], text);
        let n = txq.used_idx();
        kick.write(1).unwrap();
        assert!(wait_until(|| txq.used_idx() == n + 1));
    }

    #[test]
    fn output_to_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (_c, _mem, _rxq, mut txq, k) = start(ConsoleOutput::File(path.clone()));
        guest_print(&mut txq, &k.tx, b"Linux version 6.1\n");
        guest_print(&mut txq, &k.tx, b"login: ");
        assert_eq!(std::fs::read(&path).unwrap(), b"Linux version 6.1\nlogin: ");
        // A chain outside memory completes with 0 and is skipped.
        txq.add_raw_chain(&[(0x4000_0000, 10, Readable)]);
        k.tx.write(1).unwrap();
        assert!(wait_until(|| txq.used_idx() == 3));
    }

    #[test]
    fn socket_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let (c, _mem, mut rxq, mut txq, k) = start(ConsoleOutput::Socket(path.clone()));
        // Output with no client is dropped, not blocking.
        guest_print(&mut txq, &k.tx, b"early\n");
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        guest_print(&mut txq, &k.tx, b"hello\n");
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello\n");
        // Input waits for a receive buffer.
        client.write_all(b"ls\n").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let (_, addrs) = rxq.add_chain(&[(Writable, 64)]);
        k.rx.write(1).unwrap();
        assert!(wait_until(|| rxq.used_idx() == 1));
        assert_eq!(rxq.used_entry(0).1, 3);
        assert_eq!(rxq.read(addrs[0], 3), b"ls\n");
        let n = c.counters();
        assert_eq!((n["tx_bytes"], n["tx_dropped_bytes"]), (12, 6));
        assert_eq!(n["rx_bytes"], 3);
        assert_eq!(n["notifications"], 3);
        assert!(wait_until(|| c.counters()["interrupts"] == 3));
    }

    /// A corrupt receive ring while the client typed something: the
    /// worker must not spin, so a reset (the stop request) still gets through.
    #[test]
    fn corrupt_rx_ring_does_not_block_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let (mut c, _mem, mut rxq, _txq, _k) = start(ConsoleOutput::Socket(path.clone()));
        rxq.set_avail_idx(1000);
        let mut client = UnixStream::connect(&path).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        client.write_all(b"ls\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(within(5, move || c.reset()));
    }

    /// Driven directly: a corrupt receive ring with input waiting is given
    /// up after one turn, logged once; output still works.
    #[test]
    fn corrupt_rx_ring_stops_only_that_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let mem = single_region_mem(0x10_0000);
        let mut rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let mut txq = TestQueue::new(&mem, 0x1000, 16, 0x8_0000);
        rxq.set_avail_idx(1000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let (rx_kick, tx_kick) = (rx.event.try_clone().unwrap(), tx.event.try_clone().unwrap());
        let c = Console::new(&ConsoleOutput::Socket(path.clone())).unwrap();
        let irq = recorder();
        let handler = c
            .handler(atomic_mem(&mem), irq.clone(), vec![rx, tx])
            .unwrap();
        let mut el = crate::worker::EventLoop::new(handler).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        el.run_until_idle(10).unwrap();
        client.write_all(b"ls\n").unwrap();
        let ((turns, mut el), logs) = within(5, move || {
            capture_logs(|| {
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
        let (_, addrs) = txq.add_chain(&[(Readable, 3)]);
        txq.write(addrs[0], b"ok\n");
        tx_kick.write(1).unwrap();
        el.run_until_idle(10).unwrap();
        assert_eq!(txq.used_idx(), 1);
        let mut buf = [0u8; 3];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok\n");
    }
}
