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
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{take_queue, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::worker::{
    drain_eventfd, next_chain, signal_used_queue, spawn_worker, EpollCtx, EpollHandler,
    WorkerError, WorkerHandle, WorkerQueue, CHAIN_BUDGET,
};
use crate::GuestMemoryMmap;
use muxer::{Muxer, LISTENER_TOKEN};
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

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    acked_features: u64,
    worker: Option<WorkerHandle>,
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
            worker: None,
        })
    }

    /// The guest's context id.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub(crate) fn handler(
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
            muxer: Muxer::new(self.cid, self.path.clone(), listener),
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
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let handler = self.handler(mem, interrupt, queues)?;
        self.worker = Some(spawn_worker(&format!("vsock-{}", self.cid), handler)?);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
        true
    }
}

/// Events of the vsock worker; host sockets use tokens from
/// [`LISTENER_TOKEN`] up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// The guest added receive buffers.
    RxQueue,
    /// The guest sent packets.
    TxQueue,
    /// The guest added event buffers (unused: we send no events).
    EventQueue,
    /// Connection set-up timeouts (armed only while set-ups are pending).
    Timer,
    /// A host client connects.
    Listener,
    /// A host socket is ready.
    Conn(u64),
}

impl Token {
    fn from_u64(v: u64) -> Token {
        match v {
            0 => Token::RxQueue,
            1 => Token::TxQueue,
            2 => Token::EventQueue,
            3 => Token::Timer,
            LISTENER_TOKEN => Token::Listener,
            t => Token::Conn(t),
        }
    }
}

pub(crate) struct VsockHandler {
    timer: TimerFd,
    timer_armed: bool,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: WorkerQueue,
    tx: WorkerQueue,
    event: ActiveQueue,
    muxer: Muxer,
}

impl VsockHandler {
    fn process_tx(&mut self, ctx: &EpollCtx) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let muxer = &mut self.muxer;
        let irq = self.interrupt.as_ref();
        self.tx.serve(ctx, "vsock", irq, |q| {
            q.process(&mem, irq, |chain| {
                match read_tx_packet(&mem, chain) {
                    Ok((hdr, payload)) => muxer.handle_tx_packet(ctx, &hdr, &payload),
                    Err(e) => {
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
    fn fill_rx(&mut self, ctx: &EpollCtx) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let irq = self.interrupt.as_ref();
        let muxer = &mut self.muxer;
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
                let Some(len) = fill_rx_buffer(muxer, ctx, &mem, chain) else {
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
    ctx: &EpollCtx,
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
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
    Some(buf.write(hdr, &data).unwrap_or_else(|e| {
        let log = muxer.log();
        crate::guest_log!(log, log::Level::Warn, "vsock: rx packet lost: {e}");
        0
    }))
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
    fn register(&mut self, ctx: &EpollCtx) -> io::Result<()> {
        ctx.add(self.rx.event.as_raw_fd(), 0, EventSet::IN)?;
        ctx.add(self.tx.event.as_raw_fd(), 1, EventSet::IN)?;
        ctx.add(self.event.event.as_raw_fd(), 2, EventSet::IN)?;
        ctx.add(self.timer.as_raw_fd(), 3, EventSet::IN)?;
        self.muxer.register(ctx)
    }

    fn handle_event(
        &mut self,
        ctx: &EpollCtx,
        token: u64,
        events: EventSet,
    ) -> Result<(), WorkerError> {
        match Token::from_u64(token) {
            Token::RxQueue => drain_eventfd(&self.rx.event),
            Token::TxQueue => {
                drain_eventfd(&self.tx.event);
                self.process_tx(ctx)?;
            }
            Token::EventQueue => drain_eventfd(&self.event.event),
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
