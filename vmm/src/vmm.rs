//! The running VMM: vCPU threads plus the main thread's event loop.
//!
//! The main thread waits (epoll, no polling) on:
//! * the [`ExitState`] eventfd: a vCPU or device decided the VM stops;
//! * a signalfd for SIGTERM, SIGINT and SIGHUP: the host stops the VM;
//! * stdin, when the serial console is on stdout: input for the guest.
//!
//! The API socket, if any, is served by its own thread ([`crate::api`]).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_device::Bus;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::{SerialConfig, VmConfig};
use crate::device_manager::PciDevices;
use crate::devices::serial::SerialDevice;
use crate::exit::{ExitReason, ExitState};
use crate::memory::GuestRam;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// How long a panicking guest may keep printing before the VMM ends.
const PANIC_GRACE: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Token {
    Exit = 1,
    Signal = 2,
    Stdin = 3,
}

/// Errors of the event loop itself (not of the guest).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up the event loop")]
    Epoll(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot start the API server")]
    Api(#[source] crate::api::ApiError),
}

/// A built VM, ready to run.
pub struct Vmm {
    config: VmConfig,
    start: Instant,
    // Kept alive for the VM's lifetime: the memory slots point into `ram`.
    _vm: Vm,
    _ram: GuestRam,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitState>,
    serial: Arc<Mutex<SerialDevice>>,
    _io_bus: Arc<Bus>,
    _mmio_bus: Arc<Bus>,
    _pci: PciDevices,
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

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: VmConfig,
        start: Instant,
        vm: Vm,
        ram: GuestRam,
        vcpus: Vec<Vcpu>,
        exit: Arc<ExitState>,
        serial: Arc<Mutex<SerialDevice>>,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        pci: PciDevices,
    ) -> Self {
        Self { config, start, _vm: vm, _ram: ram, vcpus, exit, serial, _io_bus: io_bus, _mmio_bus: mmio_bus, _pci: pci }
    }

    /// Runs the VM until it stops; returns why.
    pub fn run(mut self) -> Result<ExitReason, RunError> {
        let signals = signal_fd().map_err(RunError::Signals)?;
        let epoll = Epoll::new().map_err(RunError::Epoll)?;
        let add = |fd: RawFd, token: Token| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token as u64)).map_err(RunError::Epoll)
        };
        add(self.exit.eventfd().as_raw_fd(), Token::Exit)?;
        add(signals.as_raw_fd(), Token::Signal)?;
        let mut stdin_open = self.config.serial == SerialConfig::Stdout && add(0, Token::Stdin).is_ok();

        let _api = match &self.config.api_socket {
            Some(path) => Some(
                crate::api::ApiServer::start(
                    path,
                    crate::api::VmInfo::new(&self.config, self.start),
                    self.exit.clone(),
                )
                .map_err(RunError::Api)?,
            ),
            None => None,
        };

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (i, vcpu) in self.vcpus.drain(..).enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu.run())
                .map_err(RunError::Thread)?;
            threads.push(t);
        }

        let mut events = vec![EpollEvent::default(); 8];
        let mut deadline: Option<Instant> = None;
        loop {
            let timeout = deadline.map_or(-1, |d| d.saturating_duration_since(Instant::now()).as_millis() as i32);
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RunError::Epoll(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    t if t == Token::Signal as u64 => {
                        if let Some(sig) = read_signal(&signals) {
                            self.exit.request(ExitReason::Stopped(format!("received {}", signal_name(sig))));
                        }
                    }
                    t if t == Token::Stdin as u64 => {
                        let mut buf = [0u8; 64];
                        match std::io::stdin().lock().read(&mut buf) {
                            Ok(0) | Err(_) => {
                                let _ = epoll.ctl(ControlOperation::Delete, 0, EpollEvent::default());
                                stdin_open = false;
                            }
                            Ok(k) => {
                                self.serial.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(&buf[..k]);
                            }
                        }
                    }
                    _ => {
                        let _ = self.exit.eventfd().read();
                    }
                }
            }
            let _ = stdin_open;
            match (self.exit.reason(), deadline) {
                (Some(ExitReason::GuestPanic(_)), None) => deadline = Some(Instant::now() + PANIC_GRACE),
                (Some(ExitReason::GuestPanic(_)), Some(d)) if Instant::now() < d => {}
                (Some(reason), _) => {
                    self.serial.lock().unwrap_or_else(|e| e.into_inner()).flush();
                    return Ok(reason);
                }
                (None, _) => {}
            }
        }
    }
}
