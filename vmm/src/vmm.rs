//! The running VMM: vCPU threads plus the main thread's event loop, which
//! owns the VM and is the only place that changes it.
//!
//! The main thread waits (epoll, no polling) on:
//! * the [`ExitState`] eventfd: a vCPU or device decided the VM stops;
//! * a signalfd for SIGTERM, SIGINT and SIGHUP: the host stops the VM;
//! * stdin, when the serial console is on stdout: input for the guest;
//! * the control API's eventfd: a request is waiting on the channel
//!   ([`crate::api`]);
//! * the PCI hot-plug controller's eventfd: the guest ejected a slot;
//! * the CPU hot-plug controller's eventfd: the guest ejected a vCPU.
//!
//! When the VM stops, the loop ends in order: every vCPU thread is told to
//! finish and joined, then devices and sockets are dropped (their workers
//! stop, the API socket file is removed), and `run` returns why.

mod save;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_vmm_client::types::{self as api_types, VmState};
use vm_device::Bus;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiCall, ApiServer, VmReply, VmRequest};
use crate::config::{SerialSink, VmConfig};
use crate::device_manager::{DeviceError, NewDevice, PciDevices};
use crate::devices::cpu_hotplug::CpuHotplug;
use crate::devices::ged::{event, Ged};
use crate::devices::pci_hotplug::PciHotplug;
use crate::devices::serial::SerialDevice;
use crate::exit::{ExitReason, ExitState};
use crate::memory::GuestRam;
use crate::options::OptionError;
use crate::vstate::vcpu::{ExitCounters, Vcpu, VcpuContext};
use crate::vstate::vcpu_thread::{VcpuHandle, VcpuState, VcpuThreadError};
use crate::vstate::vm::Vm;

/// How long a panicking guest may keep printing before the VMM ends.
const PANIC_GRACE: Duration = Duration::from_millis(500);
/// How long a vCPU may take to answer pause, resume or finish.
const VCPU_ANSWER: Duration = Duration::from_secs(2);
/// How long the guest has to eject a device the VMM asked it to.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Token {
    Exit = 1,
    Signal = 2,
    Stdin = 3,
    Api = 4,
    Eject = 5,
    CpuEject = 6,
}

impl Token {
    fn from_u64(v: u64) -> Option<Self> {
        [Token::Exit, Token::Signal, Token::Stdin, Token::Api, Token::Eject, Token::CpuEject]
            .into_iter()
            .find(|t| *t as u64 == v)
    }
}

/// Errors of the event loop itself (not of the guest).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up the event loop")]
    Epoll(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("cannot start a vCPU")]
    Vcpu(#[source] VcpuThreadError),
    #[error("cannot start the API server")]
    Api(#[source] crate::api::ApiServerError),
}

/// Everything `build_vm` makes, handed to [`Vmm::new`].
pub struct VmmParts {
    pub config: VmConfig,
    pub start: Instant,
    pub vm: Vm,
    pub ram: GuestRam,
    pub vcpus: Vec<Vcpu>,
    pub exit: Arc<ExitState>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub pci: PciDevices,
    pub ged: Arc<Mutex<Ged>>,
    pub pci_hotplug: Arc<Mutex<PciHotplug>>,
    /// Present when vCPUs can be hot-plugged (`--cpus max=` above boot).
    pub cpu_hotplug: Option<Arc<Mutex<CpuHotplug>>>,
    pub counters: Arc<ExitCounters>,
    /// What a vCPU created at runtime is given.
    pub vcpu_ctx: VcpuContext,
}

/// A device removal waiting for the guest to eject the slot.
struct Removal {
    id: String,
    slot: u8,
    reply: Sender<VmReply>,
    deadline: Instant,
}

/// A built VM, ready to run.
pub struct Vmm {
    p: VmmParts,
    handles: Vec<VcpuHandle>,
    /// Hot-removed vCPUs: KVM cannot destroy them, so a later hot-add
    /// starts them again.
    parked: std::collections::BTreeMap<u8, Vcpu>,
    paused: bool,
    removals: Vec<Removal>,
}

fn signal_fd() -> Result<OwnedFd, std::io::Error> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for all of these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // Block them in this thread; threads spawned later inherit the mask, so
    // the signals are only ever read from the signalfd.
    // SAFETY: `set` is initialized; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialized; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: the buffer is exactly one signalfd_siginfo long and writable.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn option_error(e: OptionError) -> VmReply {
    VmReply::error(400, format!("bad device: {e}"))
}

fn device_error(e: DeviceError) -> VmReply {
    let msg = crate::error_chain(&e);
    match e {
        DeviceError::UnknownId(_) => VmReply::error(404, msg),
        e if e.is_conflict() => VmReply::error(409, msg),
        _ => VmReply::error(400, msg),
    }
}

impl Vmm {
    pub(crate) fn new(parts: VmmParts) -> Self {
        Self { p: parts, handles: Vec::new(), parked: Default::default(), paused: false, removals: Vec::new() }
    }

    /// Runs the VM until it stops; returns why.
    pub fn run(mut self) -> Result<ExitReason, RunError> {
        let signals = signal_fd().map_err(RunError::Signals)?;
        let epoll = Epoll::new().map_err(RunError::Epoll)?;
        let add = |fd: RawFd, token: Token| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token as u64)).map_err(RunError::Epoll)
        };
        add(self.p.exit.eventfd().as_raw_fd(), Token::Exit)?;
        add(signals.as_raw_fd(), Token::Signal)?;
        add(lock(&self.p.pci_hotplug).eventfd().as_raw_fd(), Token::Eject)?;
        if let Some(hp) = &self.p.cpu_hotplug {
            add(lock(hp).eventfd().as_raw_fd(), Token::CpuEject)?;
        }
        if self.p.config.serial.output == SerialSink::Stdout {
            let _ = add(0, Token::Stdin);
        }
        let (api_tx, api_rx) = channel::<ApiCall>();
        let api_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::Epoll)?);
        add(api_wake.as_raw_fd(), Token::Api)?;
        let api = match &self.p.config.api_socket {
            Some(path) => Some(ApiServer::start(path, api_tx, api_wake.clone()).map_err(RunError::Api)?),
            None => None,
        };

        for vcpu in std::mem::take(&mut self.p.vcpus) {
            let h = VcpuHandle::spawn(vcpu, VcpuState::Running).map_err(RunError::Vcpu)?;
            self.handles.push(h);
        }

        let result = self.event_loop(&epoll, &signals, &api_rx, &api_wake);
        // Requests not handled get a closed channel; the server then waits
        // for connections still writing an answer (power-off's own).
        drop(api_rx);
        drop(api);
        self.finish_vcpus();
        for r in self.removals.drain(..) {
            let _ = r.reply.send(VmReply::error(503, "the VM stopped before the guest ejected the device"));
        }
        if let Ok(reason) = &result {
            log::debug!("VM ended ({reason}); vCPUs joined, devices stopping");
        }
        result
    }

    fn event_loop(
        &mut self,
        epoll: &Epoll,
        signals: &OwnedFd,
        api_rx: &Receiver<ApiCall>,
        api_wake: &EventFd,
    ) -> Result<ExitReason, RunError> {
        let mut events = vec![EpollEvent::default(); 8];
        let mut panic_deadline: Option<Instant> = None;
        loop {
            let next = self.removals.iter().map(|r| r.deadline).chain(panic_deadline).min();
            let timeout = next.map_or(-1, |d| d.saturating_duration_since(Instant::now()).as_millis() as i32);
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RunError::Epoll(e)),
            };
            for ev in &events[..n] {
                match Token::from_u64(ev.data()) {
                    Some(Token::Signal) => {
                        if let Some(sig) = read_signal(signals) {
                            self.p.exit.request(ExitReason::Stopped(format!("received {}", signal_name(sig))));
                        }
                    }
                    Some(Token::Stdin) => {
                        let mut buf = [0u8; 64];
                        match std::io::stdin().lock().read(&mut buf) {
                            Ok(0) | Err(_) => {
                                let _ = epoll.ctl(ControlOperation::Delete, 0, EpollEvent::default());
                            }
                            Ok(k) => {
                                lock(&self.p.serial).enqueue_input(&buf[..k]);
                            }
                        }
                    }
                    Some(Token::Api) => {
                        let _ = api_wake.read();
                        while let Ok(call) = api_rx.try_recv() {
                            if let Some(reply) = self.handle(call.request, &call.reply) {
                                let _ = call.reply.send(reply);
                            }
                        }
                    }
                    Some(Token::Eject) => self.on_eject(),
                    Some(Token::CpuEject) => self.on_cpu_eject(),
                    Some(Token::Exit) | None => {
                        let _ = self.p.exit.eventfd().read();
                    }
                }
            }
            self.expire_removals();
            match (self.p.exit.reason(), panic_deadline) {
                (Some(ExitReason::GuestPanic(_)), None) => panic_deadline = Some(Instant::now() + PANIC_GRACE),
                (Some(ExitReason::GuestPanic(_)), Some(d)) if Instant::now() < d => {}
                (Some(reason), _) => {
                    lock(&self.p.serial).flush();
                    return Ok(reason);
                }
                (None, _) => {}
            }
        }
    }

    /// Tells every vCPU thread to end and joins it.
    fn finish_vcpus(&mut self) {
        for h in self.handles.drain(..) {
            let id = h.id();
            if let Err(e) = h.finish(VCPU_ANSWER) {
                log::warn!("vCPU {id}: {e}; leaving its thread to the process's end");
            }
        }
    }

    /// Handles one API request; `None` when the answer comes later on
    /// `reply` (a removal waits for the guest).
    fn handle(&mut self, request: VmRequest, reply: &Sender<VmReply>) -> Option<VmReply> {
        let busy = |what: &str| VmReply::error(409, format!("the VM is paused; resume it before {what}"));
        Some(match request {
            VmRequest::Ping => {
                VmReply::json(&api_types::Ping { version: env!("CARGO_PKG_VERSION").into(), pid: std::process::id() })
            }
            VmRequest::Info => VmReply::json(&self.info()),
            VmRequest::Counters => VmReply::json(&api_types::Counters {
                vm_exits: self.p.counters.snapshot(),
                devices: self.p.pci.counters(),
            }),
            VmRequest::Pause => self.pause(),
            VmRequest::Resume => self.resume(),
            VmRequest::Shutdown if self.paused => busy("a shutdown"),
            VmRequest::Shutdown => self.notify_guest(event::POWER_BUTTON).err().unwrap_or_else(VmReply::done),
            VmRequest::PowerOff => {
                self.p.exit.request(ExitReason::Stopped("API power-off".into()));
                VmReply::done()
            }
            VmRequest::AddDisk(_) | VmRequest::AddNet(_) | VmRequest::AddFs(_) | VmRequest::AddVsock(_)
                if self.paused =>
            {
                busy("adding a device")
            }
            // virtiofsd would map the memory file, not the guest's pages.
            VmRequest::AddFs(_) if self.p.ram.private => VmReply::error(
                409,
                "this VM runs on a private mapping of a snapshot's memory file, which virtiofsd cannot share: \
                 a VM restored with a share keeps its memory shared, one restored without cannot get one",
            ),
            VmRequest::AddDisk(d) => self.hot_add(d.try_into().map(NewDevice::Disk)),
            VmRequest::AddNet(n) => self.hot_add(n.try_into().map(NewDevice::Net)),
            VmRequest::AddFs(f) => self.hot_add(f.try_into().map(NewDevice::Fs)),
            VmRequest::AddVsock(v) => self.hot_add(v.try_into().map(NewDevice::Vsock)),
            VmRequest::RemoveDevice(_) if self.paused => busy("removing a device"),
            VmRequest::RemoveDevice(id) => return self.begin_removal(id, reply),
            VmRequest::Resize(_) if self.paused => busy("a resize"),
            VmRequest::Resize(r) => self.resize(r),
            VmRequest::Snapshot(s) => self.snapshot(&s.destination),
        })
    }

    fn info(&self) -> api_types::VmInfo {
        let c = &self.p.config;
        api_types::VmInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            state: if self.paused { VmState::Paused } else { VmState::Running },
            uptime_ms: self.p.start.elapsed().as_millis() as u64,
            cpus: api_types::CpuInfo { boot: c.cpus, max: c.max_cpus, present: self.handles.len() as u8 },
            memory: {
                let m = self.p.pci.memory();
                let (region, requested, plugged) =
                    m.map_or((0, 0, 0), |m| (m.region_size(), m.requested(), m.plugged()));
                api_types::MemoryInfo {
                    boot_mib: c.memory_mib,
                    hotplug_mib: region >> 20,
                    requested_mib: c.memory_mib + (requested >> 20),
                    plugged_mib: c.memory_mib + (plugged >> 20),
                }
            },
            devices: self.p.pci.infos(),
        }
    }

    fn pause(&mut self) -> VmReply {
        if self.paused {
            return VmReply::done();
        }
        for i in 0..self.handles.len() {
            if let Err(e) = self.handles[i].pause(VCPU_ANSWER) {
                // Leave the VM as it was: running.
                for h in &mut self.handles[..i] {
                    let _ = h.resume(VCPU_ANSWER);
                }
                return VmReply::error(500, format!("cannot pause: {e}"));
            }
        }
        self.p.pci.pause_all();
        self.paused = true;
        log::info!("VM paused");
        VmReply::done()
    }

    fn resume(&mut self) -> VmReply {
        if !self.paused {
            return VmReply::done();
        }
        self.p.pci.resume_all();
        for h in &mut self.handles {
            if let Err(e) = h.resume(VCPU_ANSWER) {
                return VmReply::error(500, format!("cannot resume: {e}"));
            }
        }
        self.paused = false;
        log::info!("VM resumed");
        VmReply::done()
    }

    /// Raises the Generic Event Device's `bits` for the guest.
    fn notify_guest(&self, bits: u32) -> Result<(), VmReply> {
        lock(&self.p.ged).notify(bits).map_err(|e| VmReply::error(500, format!("cannot interrupt the guest: {e}")))
    }

    fn hot_add(&mut self, new: Result<NewDevice, OptionError>) -> VmReply {
        let new = match new {
            Ok(n) => n,
            Err(e) => return option_error(e),
        };
        let added = match self.p.pci.add(new, true) {
            Ok(a) => a,
            Err(e) => return device_error(e),
        };
        lock(&self.p.pci_hotplug).announce(added.slot);
        if let Err(reply) = self.notify_guest(event::PCI) {
            return reply;
        }
        VmReply::json(&added)
    }

    fn begin_removal(&mut self, id: String, reply: &Sender<VmReply>) -> Option<VmReply> {
        let slot = match self.p.pci.begin_remove(&id) {
            Ok(s) => s,
            Err(e) => return Some(device_error(e)),
        };
        lock(&self.p.pci_hotplug).request_eject(slot);
        if let Err(r) = self.notify_guest(event::PCI) {
            self.p.pci.abort_remove(&id);
            return Some(r);
        }
        log::info!("asked the guest to eject '{id}' (slot {slot})");
        let deadline = Instant::now() + EJECT_TIMEOUT;
        self.removals.push(Removal { id, slot, reply: reply.clone(), deadline });
        None
    }

    /// The guest ejected one or more slots: unplug them, answer waiters.
    fn on_eject(&mut self) {
        let mut hp = lock(&self.p.pci_hotplug);
        let _ = hp.eventfd().read();
        let slots = hp.take_ejected();
        drop(hp);
        for slot in (1..32u8).filter(|s| slots & (1 << s) != 0) {
            let removed = self.p.pci.finish_remove(slot);
            let waiting = self.removals.iter().position(|r| r.slot == slot);
            match (removed, waiting) {
                (_, Some(i)) => {
                    let _ = self.removals.swap_remove(i).reply.send(VmReply::done());
                }
                (Some(id), None) => log::info!("the guest ejected '{id}' (slot {slot}) by itself"),
                (None, None) => log::debug!("the guest ejected empty slot {slot}"),
            }
        }
    }

    fn expire_removals(&mut self) {
        let now = Instant::now();
        while let Some(i) = self.removals.iter().position(|r| r.deadline <= now) {
            let r = self.removals.swap_remove(i);
            self.p.pci.abort_remove(&r.id);
            let msg = format!(
                "the guest did not eject '{}' (slot {}) within {} s; the device stays",
                r.id,
                r.slot,
                EJECT_TIMEOUT.as_secs()
            );
            log::warn!("{msg}");
            let _ = r.reply.send(VmReply::error(504, msg));
        }
    }

    fn resize(&mut self, r: api_types::Resize) -> VmReply {
        let max = self.p.config.max_cpus;
        if let Some(n) = r.vcpus.filter(|n| *n == 0 || *n > max) {
            return VmReply::error(409, format!("{n} vCPUs: this VM can have 1 to {max} (--cpus max=)"));
        }
        if let Some(m) = r.memory_mib {
            if let Err(reply) = self.resize_memory(m) {
                return reply;
            }
        }
        match r.vcpus {
            Some(n) => self.resize_vcpus(n),
            None => VmReply::done(),
        }
    }

    /// Asks the guest (virtio-mem) to plug or unplug hot-plug memory until
    /// it has `mib` in all; returns at once (`vm.info` shows progress).
    fn resize_memory(&self, mib: u64) -> Result<(), VmReply> {
        let boot = self.p.config.memory_mib;
        let Some(m) = self.p.pci.memory() else {
            return match mib == boot {
                true => Ok(()),
                false => Err(VmReply::error(409, format!("{mib} MiB: this VM has no memory hot-plug region"))),
            };
        };
        let max = boot + (m.region_size() >> 20);
        let block_mib = crate::arch::layout::HOTPLUG_BLOCK_SIZE >> 20;
        if mib < boot || mib > max {
            let msg = format!("{mib} MiB: this VM can have {boot} to {max} MiB (boot memory plus the hot-plug region)");
            return Err(VmReply::error(409, msg));
        }
        if !(mib - boot).is_multiple_of(block_mib) {
            return Err(VmReply::error(409, format!("{mib} MiB: memory hot-plug goes in steps of {block_mib} MiB")));
        }
        m.request((mib - boot) << 20).map_err(|e| VmReply::error(409, format!("{mib} MiB: {e}")))?;
        log::info!("memory: the guest is asked to have {mib} MiB ({} MiB hot-plugged)", mib - boot);
        Ok(())
    }

    /// Starts vCPUs up to `n` or asks the guest to eject those above it.
    /// Adding returns once the vCPUs run (the guest onlines them); removing
    /// returns once the guest was asked (`vm.info` shows when they are gone).
    fn resize_vcpus(&mut self, n: u8) -> VmReply {
        let Some(hp) = self.p.cpu_hotplug.clone() else {
            return VmReply::done(); // n == max == boot here
        };
        if lock(&hp).removal_pending() {
            return VmReply::error(409, "the guest has not ejected the vCPUs of the last resize yet");
        }
        let present = self.handles.len() as u8;
        if n > present {
            for id in present..n {
                let vcpu = match self.parked.remove(&id) {
                    Some(v) => v,
                    None => match self.new_vcpu(id) {
                        Ok(v) => v,
                        Err(e) => return VmReply::error(500, format!("cannot create vCPU {id}: {e}")),
                    },
                };
                match VcpuHandle::spawn(vcpu, VcpuState::Running) {
                    Ok(h) => self.handles.push(h),
                    Err(e) => return VmReply::error(500, format!("cannot start vCPU {id}: {e}")),
                }
                lock(&hp).insert(id);
            }
            log::info!("vCPUs {present}..{n} added");
        } else {
            for id in (n..present).rev() {
                lock(&hp).request_remove(id);
            }
            log::info!("asked the guest to eject vCPUs {n}..{present}");
        }
        self.notify_guest(event::CPU).err().unwrap_or_else(VmReply::done)
    }

    fn new_vcpu(&self, id: u8) -> Result<Vcpu, crate::vstate::vcpu::VcpuError> {
        let vcpu = Vcpu::new(&self.p.vm, id, self.p.vcpu_ctx.clone())?;
        vcpu.configure(self.p.vm.supported_cpuid(), self.p.config.max_cpus, &self.p.vcpu_ctx.mem, None)?;
        Ok(vcpu)
    }

    /// The guest ejected vCPUs: end their threads and keep them parked.
    fn on_cpu_eject(&mut self) {
        let Some(hp) = self.p.cpu_hotplug.clone() else { return };
        let mut hp = lock(&hp);
        let _ = hp.eventfd().read();
        let ids = hp.take_ejected();
        drop(hp);
        for id in ids {
            let Some(i) = self.handles.iter().position(|h| h.id() == id) else { continue };
            match self.handles.remove(i).finish(VCPU_ANSWER) {
                Ok(vcpu) => {
                    self.parked.insert(id, vcpu);
                    log::info!("vCPU {id} ejected by the guest; its thread ended");
                }
                Err(e) => log::warn!("vCPU {id}: {e}"),
            }
        }
    }
}
