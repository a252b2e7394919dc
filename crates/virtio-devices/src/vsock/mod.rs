//! virtio-vsock in userspace with Firecracker's hybrid host side: host
//! programs talk to the guest through Unix sockets, no `/dev/vhost-vsock`.
//!
//! See [`muxer`] for the host-side protocol (`CONNECT <port>\n` /
//! `OK <port>\n`, and `<path>_<port>` for guest-initiated connections) and
//! [`connection`] for flow control.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{take_queue, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::lifecycle::{device_counters, Lifecycle, WorkerDevice};
use crate::worker::{
    drain_eventfd, next_chain, signal_used_queue, EpollCtx, EpollHandler, WorkerError, WorkerQueue,
    CHAIN_BUDGET,
};
use crate::GuestMemoryMmap;
use muxer::Muxer;
pub use muxer::Token;
use packet::{read_tx_packet, RxBuffer};

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Context ids 0-2 are reserved.
    #[error("invalid guest CID {0} (must be 3 or more)")]
    InvalidCid(u64),
    /// The listening socket could not be created.
    #[error("bind vsock socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

device_counters! {
    /// What the vsock device did.
    pub struct VsockCounters {
        /// Queue notifications handled (all three queues).
        notifications,
        /// Packets the guest sent (malformed ones included).
        tx_packets,
        /// Payload bytes of well-formed packets the guest sent.
        tx_bytes,
        /// Packets the guest sent that could not be parsed.
        tx_malformed,
        /// Packets delivered to the guest.
        rx_packets,
        /// Payload bytes of those packets.
        rx_bytes,
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    acked_features: u64,
    /// The next activation follows a restore: tell the guest its
    /// connections are gone.
    reset_on_activate: std::cell::Cell<bool>,
    /// The muxer's next host port, saved in snapshots.
    local_ports: Arc<AtomicU32>,
    life: Lifecycle<VsockHandler>,
    counters: Arc<VsockCounters>,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `path` (a stale
    /// socket there is replaced; any other file is an error). The socket
    /// file is removed when the device is dropped.
    pub fn new(cid: u64, path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        let bind_err = |source| VsockError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = crate::socket::bind_listener(path).map_err(bind_err)?;
        Ok(Vsock {
            cid,
            path: path.to_path_buf(),
            listener,
            acked_features: 0,
            reset_on_activate: std::cell::Cell::new(false),
            local_ports: Arc::new(AtomicU32::new(muxer::FIRST_LOCAL_PORT)),
            life: Lifecycle::new(format!("vsock-{cid}")),
            counters: Arc::default(),
        })
    }

    /// The guest's context id.
    pub fn cid(&self) -> u64 {
        self.cid
    }
}

impl WorkerDevice for Vsock {
    type Handler = VsockHandler;
    fn lifecycle(&mut self) -> &mut Lifecycle<VsockHandler> {
        &mut self.life
    }
    fn handler(
        &self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<VsockHandler, ActivateError> {
        let rx = take_queue(&mut queues, RX_QUEUE)?;
        let tx = take_queue(&mut queues, TX_QUEUE)?;
        let event = take_queue(&mut queues, EVENT_QUEUE)?;
        let listener = self.listener.try_clone().map_err(ActivateError::Io)?;
        let timer = TimerFd::new()
            .map_err(|e| ActivateError::Io(io::Error::from_raw_os_error(e.errno())))?;
        Ok(VsockHandler {
            timer,
            timer_armed: false,
            mem,
            interrupt,
            rx: rx.into(),
            tx: tx.into(),
            event,
            muxer: Muxer::new(self.cid, self.path.clone(), listener)
                .with_local_ports(self.local_ports.clone()),
            counters: self.counters.clone(),
            reset_pending: self.reset_on_activate.take(),
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        crate::device::RING_FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    crate::lifecycle::lifecycle_methods!(snapshot);
    /// The next host port (a le32): see [`Muxer::with_local_ports`].
    fn backend_state(&mut self) -> Option<Vec<u8>> {
        Some(
            self.local_ports
                .load(Ordering::Relaxed)
                .to_le_bytes()
                .to_vec(),
        )
    }
    fn restoring(&mut self, backend_state: Option<&[u8]>) -> Result<(), crate::state::StateError> {
        match backend_state.map(<[u8; 4]>::try_from) {
            // A snapshot of a VMM that did not keep the port.
            None => {}
            Some(Ok(port)) => self.local_ports.store(
                u32::from_le_bytes(port).max(muxer::FIRST_LOCAL_PORT),
                Ordering::Relaxed,
            ),
            Some(Err(_)) => {
                return Err(crate::state::StateError::Mismatch(
                    "the saved vsock state is not a 4-byte port number".into(),
                ))
            }
        }
        // The host side of every connection died with the old process.
        self.reset_on_activate.set(true);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.reset_worker();
        self.acked_features = 0;
        true
    }
}

/// The vsock worker's handler.
pub struct VsockHandler {
    timer: TimerFd,
    timer_armed: bool,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: WorkerQueue,
    tx: WorkerQueue,
    event: ActiveQueue,
    muxer: Muxer,
    counters: Arc<VsockCounters>,
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` is still to be sent.
    reset_pending: bool,
}

impl crate::lifecycle::QueueOwner for VsockHandler {
    fn queue_progress(&self) -> Vec<crate::state::QueueProgress> {
        use crate::state::QueueProgress;
        vec![
            QueueProgress::of(self.rx.index, &self.rx.queue),
            QueueProgress::of(self.tx.index, &self.tx.queue),
            QueueProgress::of(self.event.index, &self.event.queue),
        ]
    }
}

impl VsockHandler {
    /// Sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (event id 0, a le32) in
    /// the driver's next event buffer, if one is due; without a buffer it
    /// stays due until the driver adds one.
    fn send_transport_reset(&mut self) -> Result<(), WorkerError> {
        if !self.reset_pending {
            return Ok(());
        }
        let mem = self.mem.memory();
        let Some(chain) = next_chain(&mut self.event.queue, &mem)? else {
            return Ok(());
        };
        let head = chain.head_index();
        let desc = chain.clone().find(|d| d.is_write_only() && d.len() >= 4);
        let len = match desc {
            Some(d) => match vm_memory::Bytes::write_obj(&*mem, 0u32.to_le(), d.addr()) {
                Ok(()) => 4,
                Err(e) => {
                    log::warn!("vsock: transport reset event: {e}");
                    0
                }
            },
            None => 0,
        };
        self.event
            .queue
            .add_used(&*mem, head, len)
            .map_err(WorkerError::Queue)?;
        signal_used_queue(
            &mut self.event.queue,
            &mem,
            EVENT_QUEUE as u16,
            self.interrupt.as_ref(),
        )?;
        if len == 4 {
            self.reset_pending = false;
            log::info!("vsock: sent the guest a transport reset");
        }
        Ok(())
    }

    fn process_tx(&mut self, ctx: &EpollCtx<Token>) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let (muxer, counters) = (&mut self.muxer, &*self.counters);
        let irq = self.interrupt.as_ref();
        self.tx.serve(ctx, "vsock", irq, |q| {
            q.process(&mem, irq, |chain| {
                counters.tx_packets.inc();
                match read_tx_packet(&mem, chain) {
                    Ok((hdr, payload)) => {
                        counters.tx_bytes.add(payload.len() as u64);
                        muxer.handle_tx_packet(ctx, &hdr, &payload)
                    }
                    Err(e) => {
                        counters.tx_malformed.inc();
                        let log = muxer.log();
                        crate::guest_log!(log, log::Level::Warn, "vsock: bad tx packet: {e}")
                    }
                }
                0
            })
            .map(drop)
        })
    }

    /// Moves the muxer's packets into receive buffers, at most
    /// [`CHAIN_BUDGET`] per turn (then the queue re-arms itself).
    fn fill_rx(&mut self, ctx: &EpollCtx<Token>) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let irq = self.interrupt.as_ref();
        let (muxer, counters) = (&mut self.muxer, &*self.counters);
        self.rx.serve(ctx, "vsock", irq, |q| {
            let mut used = 0;
            while muxer.has_rx_work() {
                if used == CHAIN_BUDGET {
                    q.rearm();
                    break;
                }
                // Out of buffers: notifications are on, the guest's next
                // buffer wakes us.
                let Some(chain) = next_chain(&mut q.queue, &mem)? else {
                    break;
                };
                let head = chain.head_index();
                let Some(len) = fill_rx_buffer(muxer, ctx, &mem, chain, counters) else {
                    // Nothing to send after all: give the buffer back.
                    q.queue.go_to_previous_position();
                    break;
                };
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
}

/// Writes the muxer's next packet into a receive chain; the used length,
/// or `None` when the muxer had nothing after all.
fn fill_rx_buffer(
    muxer: &mut Muxer,
    ctx: &EpollCtx<Token>,
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    counters: &VsockCounters,
) -> Option<u32> {
    let buf = match RxBuffer::new(mem, chain) {
        Ok(buf) => buf,
        Err(e) => {
            let log = muxer.log();
            crate::guest_log!(log, log::Level::Warn, "vsock: bad rx buffer: {e}");
            return Some(0);
        }
    };
    let (hdr, data) = muxer.next_rx_packet(ctx, buf.payload_capacity())?;
    match buf.write(hdr, &data) {
        Ok(len) => {
            counters.rx_packets.inc();
            counters.rx_bytes.add(data.len() as u64);
            Some(len)
        }
        Err(e) => {
            let log = muxer.log();
            crate::guest_log!(log, log::Level::Warn, "vsock: rx packet lost: {e}");
            Some(0)
        }
    }
}

impl VsockHandler {
    /// Ticks once a second while connections are being set up, never
    /// otherwise (an idle device wakes nobody).
    fn sync_timer(&mut self) {
        let want = self.muxer.has_pending_setups();
        if want == self.timer_armed {
            return;
        }
        let tick = std::time::Duration::from_millis(500);
        let r = if want {
            self.timer.reset(tick, Some(tick))
        } else {
            self.timer.clear()
        };
        match r {
            Ok(()) => self.timer_armed = want,
            Err(e) => log::warn!("vsock: timer: {e}"),
        }
    }
}

impl EpollHandler for VsockHandler {
    type Token = Token;

    fn register(&mut self, ctx: &EpollCtx<Token>) -> io::Result<()> {
        ctx.add(self.rx.event.as_raw_fd(), Token::RxQueue, EventSet::IN)?;
        ctx.add(self.tx.event.as_raw_fd(), Token::TxQueue, EventSet::IN)?;
        ctx.add(
            self.event.event.as_raw_fd(),
            Token::EventQueue,
            EventSet::IN,
        )?;
        ctx.add(self.timer.as_raw_fd(), Token::Timer, EventSet::IN)?;
        if self.reset_pending {
            // The first turn sends it.
            self.event.event.write(1)?;
        }
        self.muxer.register(ctx)
    }

    fn handle_event(
        &mut self,
        ctx: &EpollCtx<Token>,
        token: Token,
        events: EventSet,
    ) -> Result<(), WorkerError> {
        if matches!(token, Token::RxQueue | Token::TxQueue | Token::EventQueue) {
            self.counters.notifications.inc();
        }
        match token {
            Token::RxQueue => drain_eventfd(&self.rx.event),
            Token::TxQueue => {
                drain_eventfd(&self.tx.event);
                self.process_tx(ctx)?;
            }
            Token::EventQueue => {
                drain_eventfd(&self.event.event);
                self.send_transport_reset()?;
            }
            Token::Timer => {
                if let Err(e) = self.timer.wait() {
                    log::warn!("vsock: timer: {e}");
                }
                self.muxer.expire(ctx, std::time::Instant::now());
            }
            Token::Listener => self.muxer.handle_listener(ctx),
            Token::Conn(t) => self.muxer.handle_conn_event(ctx, t, events),
        }
        self.fill_rx(ctx)?;
        self.sync_timer();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
