//! skiff-agent: Skiff's guest agent.
//!
//! Serves the protocol of `skiff_agent_proto` on vsock port 1024 (or a Unix
//! socket given with `--listen unix:PATH`, for tests on the host). As PID 1
//! of a thin VM it is also init: boot marker, early mounts, modules,
//! rootfs, switch root, then the main process (see `init` and `mainproc`).

mod bootmark;
mod cli;
mod clock;
mod dhcp;
mod exec;
mod files;
mod hotplug;
mod init;
mod mainproc;
mod mount;
mod netmac;
mod network;
mod power;
mod reaper;
mod server;
mod sink;
mod socket;
mod stdin;
mod sys;

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use skiff_agent_proto::{main_process_from_config, Event, MainProcess};

use crate::cli::{parse_address, Address, Args};
use crate::mainproc::MainSupervisor;
use crate::reaper::Reaper;
use crate::server::Agent;
use crate::sys::{Linux, Syscall};

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        // The kernel hands init the command line words it does not know:
        // init must not die of them.
        Err(e) if std::process::id() == 1 => {
            eprintln!("skiff-agent: ignoring arguments: {e}");
            Args::parse_from(["skiff-agent"])
        }
        Err(e) => e.exit(),
    };
    if let Err(e) = run(args) {
        eprintln!("skiff-agent: {e:#}");
        if std::process::id() == 1 {
            // Init must not exit (the kernel would panic): power off.
            power::shutdown(
                &Linux,
                skiff_agent_proto::PowerAction::Poweroff,
                power::GRACE,
            );
        }
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let pid1 = std::process::id() == 1;
    // A VM's init (not a container's, whose manager set everything up).
    let vm_init = pid1 && !args.container;
    let sys: Arc<dyn Syscall> = Arc::new(Linux);
    let mut main_spec: Option<MainProcess> = None;
    let mut boot_mark_due = vm_init && !args.no_boot_mark;
    if boot_mark_due {
        match bootmark::write() {
            Ok(()) => boot_mark_due = false,
            Err(e) => eprintln!("skiff-agent: boot marker: {e}; trying /dev/port after the mounts"),
        }
    }
    if pid1 {
        // Still single-threaded: setting the environment is sound here.
        std::env::set_var("PATH", &exec::DEFAULT_PATH["PATH=".len()..]);
        std::env::set_var("HOME", "/root");
    }
    if vm_init || args.init {
        let opts = init::InitOptions {
            config: args.config.clone(),
            rootfs: args.rootfs.clone(),
            modules: !args.no_modules,
        };
        match init::run(sys.as_ref(), &opts) {
            Ok(spec) => main_spec = spec,
            // Keep serving: the host can still look at the guest.
            Err(e) => eprintln!("skiff-agent: init: {}", files::error_chain(&e)),
        }
        if boot_mark_due {
            if let Err(e) = bootmark::write_dev_port() {
                eprintln!("skiff-agent: boot marker via /dev/port: {e}");
            }
        }
    } else if let Some(c) = &args.config {
        let json = std::fs::read(c).with_context(|| format!("reading {}", c.display()))?;
        main_spec = Some(
            main_process_from_config(&json).with_context(|| format!("parsing {}", c.display()))?,
        );
    }

    let listen_addr =
        parse_address(&args.listen).ok_or_else(|| anyhow!("bad --listen {:?}", args.listen))?;
    let notify = match args.notify.as_deref() {
        Some("none") => None,
        Some(s) => Some(parse_address(s).ok_or_else(|| anyhow!("bad --notify {s:?}"))?),
        None if vm_init => Some(Address::Vsock(skiff_agent_proto::EVENT_VSOCK_PORT)),
        None => None,
    };
    // Listening before anything else: a connection waits in the backlog
    // until the server runs, and a daemon's parent exits once it can.
    let listener = socket::listen(&listen_addr)?;
    if args.daemon {
        daemonize().context("going to the background")?;
    }
    let reaper = Reaper::start().context("starting the reaper")?;
    let agent = Arc::new(Agent {
        reaper,
        sys,
        pid1,
        host_clock: vm_init,
        main: Arc::new(MainSupervisor::default()),
    });
    // Hot-plugged vCPUs and memory come online; as init, the ACPI power
    // button (skiff-vmm's vm.shutdown) shuts the guest down.
    let shutdown: Option<Box<dyn Fn() + Send>> = pid1.then(|| {
        let sys = agent.sys.clone();
        Box::new(move || {
            power::shutdown(
                sys.as_ref(),
                skiff_agent_proto::PowerAction::Poweroff,
                power::GRACE,
            )
        }) as Box<dyn Fn() + Send>
    });
    // Only in a VM the agent runs as init: as a service (or in the host's
    // tests) it must not touch the machine's CPUs and memory.
    if vm_init {
        hotplug::start(agent.sys.clone(), shutdown);
    }

    if let Some(addr) = notify {
        let ready = agent.welcome(skiff_agent_proto::PROTOCOL_VERSION);
        agent.main.announce(addr, ready);
    }
    if let Some(spec) = main_spec {
        if let Err(e) = agent
            .main
            .start(&agent.reaper, &agent.sys, agent.pid1, spec)
        {
            eprintln!("skiff-agent: main process: {}", files::error_chain(&e));
            if pid1 {
                let status = skiff_agent_proto::ExitStatus::Exited { code: 127 };
                agent.main.emit(Event::MainExited {
                    status,
                    restarting: false,
                });
                power::shutdown(
                    agent.sys.as_ref(),
                    skiff_agent_proto::PowerAction::Poweroff,
                    power::GRACE,
                );
            }
        }
    }
    server::serve(agent, listener);
    Ok(())
}

/// Forks: the parent exits 0 (the socket already listens), the child goes
/// on in a new session with stdio on /dev/null. Called before any thread
/// starts.
fn daemonize() -> std::io::Result<()> {
    // SAFETY: the process is still single-threaded (the reaper and
    // servers start later), so the child may go on running Rust code.
    match unsafe { libc::fork() } {
        -1 => return Err(std::io::Error::last_os_error()),
        0 => {}
        _ => std::process::exit(0),
    }
    // SAFETY: setsid has no memory effects.
    unsafe { libc::setsid() };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, from a valid fd.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
    }
    Ok(())
}
