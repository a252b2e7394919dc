//! The monitor's wire types: the launch spec it reads, the boot report it
//! writes on its status pipe, and the JSON lines of its control socket
//! (see the protocol in [`crate::monitor`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use skiff_agent_proto::{ExitStatus, MainProcess, NetworkConfig};

use crate::vm::{Nic, OsBoot, Share};

/// Everything a monitor needs to boot and keep one thin VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The VM's name (logs, `skiff-run list`).
    pub name: String,
    /// The runtime directory: sockets, `state.json`, the monitor's control
    /// socket. Keep it short (unix socket paths are limited to 108 bytes),
    /// e.g. `/run/skiff/vm/<short id>`; its last component must be a valid
    /// [`crate::runtime::check_name`] name. Removed when the VM ends.
    pub runtime_dir: PathBuf,
    /// The root filesystem, shared as virtio-fs tag `rootfs`.
    pub rootfs: PathBuf,
    /// More virtio-fs shares (mounted later through the agent).
    #[serde(default)]
    pub shares: Vec<Share>,
    /// Guest kernel (`None`: [`crate::kernel::KernelSearch`]).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (`None`: built and cached by [`crate::initramfs::ensure`]).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// The static skiff-agent for the initramfs (`None`: the usual search).
    #[serde(default)]
    pub agent: Option<PathBuf>,
    /// skiff-vmm (`None`: [`crate::vm::find_vmm`]).
    #[serde(default)]
    pub vmm: Option<PathBuf>,
    /// virtiofsd (`None`: [`crate::vm::find_virtiofsd`]).
    #[serde(default)]
    pub virtiofsd: Option<PathBuf>,
    /// The skiff-run binary that runs the monitor (`None`: `$SKIFF_RUN`,
    /// next to the calling executable, or in PATH). Only [`super::launch`]
    /// reads it.
    #[serde(default)]
    pub monitor_program: Option<PathBuf>,
    /// vCPUs.
    pub cpus: u8,
    /// Most vCPUs the VM may grow to (`resize`); `None`: `cpus`.
    #[serde(default)]
    pub max_cpus: Option<u8>,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// MiB the memory may grow by (`resize`); a multiple of 128, 0: none.
    #[serde(default)]
    pub memory_hotplug_mib: u64,
    /// Devices added once the agent is up, before the main process starts
    /// (removable later with `remove_device`).
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    /// Hostname on the kernel command line.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Seconds the agent may take to announce itself.
    pub boot_timeout_secs: u64,
    /// A tap network device.
    #[serde(default)]
    pub nic: Option<Nic>,
    /// Network set-up sent to the agent once it is ready (before the main
    /// process starts).
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// The main process, started through the agent's `start_main` (its
    /// restart policy is the agent's).
    pub main: MainProcess,
    /// The guest console (kernel, agent and main process output), outside
    /// the runtime directory; truncated at each boot.
    pub console_log: PathBuf,
    /// Where the monitor writes an [`ExitInfo`] when the VM ends.
    pub exit_file: PathBuf,
    /// The monitor's own stdout and stderr (truncated at each launch).
    pub monitor_log: PathBuf,
    /// A free-form label for `skiff-run list` (e.g. the bundle or image).
    #[serde(default)]
    pub label: String,
    /// Start the VM from this snapshot directory (made by the `snapshot`
    /// request) instead of booting it: skiff-vmm `--restore`, with fresh
    /// virtiofsd, vsock socket and tap, the devices of the snapshot's
    /// [`SavedRun`] given anew, and the main process of the snapshot going
    /// on (`main` is not started). `kernel`, `initramfs`, `cpus`,
    /// `memory_mib` and `devices` are the snapshot's then; `network` is
    /// sent to the agent again when the VM is a clone (another name).
    #[serde(default)]
    pub restore: Option<PathBuf>,
    /// A full OS VM: boot this firmware, variable store and disk instead of
    /// a kernel, an initramfs and `rootfs` over virtio-fs (which are then
    /// unused). The guest's own init runs and `main` is not started; its
    /// agent (a service inside) gives exec and files; `network` is not sent
    /// (the guest configures its NIC itself, e.g. DHCP from the bridge);
    /// a stop presses the ACPI power button; a reboot boots it again.
    #[serde(default)]
    pub os: Option<OsBoot>,
}

/// The file in a snapshot directory that records what skiff-vmm's state
/// does not: the VM's devices by name, its main process, its size.
pub const SAVED_RUN: &str = "run.json";

/// What a monitor writes next to skiff-vmm's `state` and `memory` when it
/// snapshots its VM ([`SAVED_RUN`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRun {
    /// The VM's name when it was saved.
    pub name: String,
    /// vCPUs.
    pub cpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The rootfs it had (a restore may give another with the same content).
    pub rootfs: PathBuf,
    /// The main process it was launched with (running in the saved guest).
    pub main: MainProcess,
    /// The shares after `rootfs`, in the order skiff-vmm got them (ids `fs1`, ...).
    #[serde(default)]
    pub shares: Vec<Share>,
    /// The devices added by name (through the spec or `add_device`).
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    /// The main process's pid in the guest, if known.
    #[serde(default)]
    pub main_pid: Option<i32>,
    /// How often the agent had restarted it.
    #[serde(default)]
    pub restarts: u32,
    /// The VM's NIC (the guest keeps its MAC until told another).
    #[serde(default)]
    pub nic: Option<Nic>,
}

/// A device a running thin VM gets through hot-plug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceSpec {
    /// Host directory `source` shared with virtio-fs (tag `name`) and
    /// mounted by the agent at `path`.
    Share {
        /// The device name.
        name: String,
        /// The host directory.
        source: PathBuf,
        /// The guest path.
        path: String,
        /// Mount it read-only.
        #[serde(default)]
        readonly: bool,
    },
    /// An image or block device attached as virtio-blk, serial `name`
    /// (`/dev/disk/by-id/virtio-NAME` in the guest).
    Disk {
        /// The device name.
        name: String,
        /// The image or block device.
        source: PathBuf,
        /// Refuse guest writes.
        #[serde(default)]
        readonly: bool,
    },
}

impl DeviceSpec {
    /// The device's name.
    pub fn name(&self) -> &str {
        match self {
            DeviceSpec::Share { name, .. } | DeviceSpec::Disk { name, .. } => name,
        }
    }
}

/// A VM the monitor booted: the agent is ready and the main process runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launched {
    /// The VM's name.
    pub name: String,
    /// The monitor's pid.
    pub monitor_pid: u32,
    /// skiff-vmm's pid.
    pub vmm_pid: u32,
    /// The main process's pid in the guest.
    pub main_pid: i32,
    /// The runtime directory.
    pub runtime_dir: PathBuf,
    /// The hybrid vsock socket the agent is behind
    /// (`AgentClient::new(Transport::vsock(..))`).
    pub vsock_socket: PathBuf,
    /// The kernel booted, as shown to people.
    pub kernel: String,
    /// Seconds since the epoch when the VM became ready.
    pub started_at: u64,
}

/// The one line a monitor writes on its status pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum BootReport {
    /// Booted; the monitor serves its control socket.
    Ready(Launched),
    /// Booting failed; the monitor stopped what it started and exits.
    Failed {
        /// The error with its causes and the boot report.
        message: String,
    },
}

/// A request on the control socket (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Answered with [`ControlReply::Status`].
    Status,
    /// Stops the VM; answered with [`ControlReply::Stopped`] once it ended.
    Stop {
        /// Seconds the main process gets between its stop signal and SIGKILL.
        #[serde(default = "default_stop_timeout")]
        timeout_secs: u64,
        /// SIGKILL skiff-vmm at once.
        #[serde(default)]
        force: bool,
    },
    /// Answered with [`ControlReply::Subscribed`], then one
    /// [`MonitorEvent`] per line until [`MonitorEvent::Stopped`].
    Events,
    /// Parks the VM's vCPUs and devices; [`ControlReply::Done`].
    Pause,
    /// Lets a paused VM run again; [`ControlReply::Done`].
    Resume,
    /// Adds a device; [`ControlReply::Done`] once the guest has it
    /// (a share: mounted).
    AddDevice {
        /// The device.
        device: DeviceSpec,
    },
    /// Removes a device added with `add_device` or through the spec's
    /// `devices`; [`ControlReply::Done`] once the guest let go of it.
    RemoveDevice {
        /// The device name.
        name: String,
    },
    /// Saves the paused VM into `dir`: skiff-vmm's `state` and `memory`
    /// and the monitor's [`SavedRun`]; [`ControlReply::Done`]. The VM
    /// stays paused.
    Snapshot {
        /// The directory (created if missing).
        dir: PathBuf,
    },
    /// Changes vCPUs and/or memory; [`ControlReply::Done`].
    Resize {
        /// vCPUs wanted.
        #[serde(default)]
        cpus: Option<u8>,
        /// Memory wanted, MiB.
        #[serde(default)]
        memory_mib: Option<u64>,
    },
}

fn default_stop_timeout() -> u64 {
    skiff_agent_proto::oci::DEFAULT_STOP_TIMEOUT_SECS
}

/// An answer on the control socket (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ControlReply {
    /// The VM's state.
    Status(MonitorStatus),
    /// The VM ended.
    Stopped(ExitInfo),
    /// Events follow.
    Subscribed,
    /// A runtime change was made.
    Done,
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Where a monitored VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitorState {
    /// The VM runs.
    Running,
    /// A stop is under way.
    Stopping,
}

/// What `status` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorStatus {
    /// The VM's name.
    pub name: String,
    /// Running or stopping.
    pub state: MonitorState,
    /// The monitor's pid.
    pub monitor_pid: u32,
    /// skiff-vmm's pid.
    pub vmm_pid: u32,
    /// The main process's pid in the guest; `None` after its first exit
    /// (the agent's events do not carry a restarted process's pid).
    pub main_pid: Option<i32>,
    /// How often the agent restarted the main process.
    pub restarts: u32,
    /// How the main process last ended.
    pub last_main_exit: Option<ExitStatus>,
    /// Seconds since the epoch when the VM became ready.
    pub started_at: u64,
}

/// Why a monitored VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The guest powered off by itself (e.g. the main process exited and
    /// was not restarted), or reset.
    Poweroff,
    /// A `stop` request (or SIGTERM to the monitor) stopped it cleanly.
    Stopped,
    /// A forced stop killed skiff-vmm.
    Killed,
    /// skiff-vmm failed (guest panic, VM error) or was killed from outside.
    Failed,
}

/// What the monitor writes to the exit file when the VM ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The VM's name.
    pub name: String,
    /// Why it ended.
    pub reason: EndReason,
    /// skiff-vmm's exit code (0 poweroff or stop, 1 VM error, 3 guest panic).
    pub vmm_exit_code: Option<i32>,
    /// The signal that killed skiff-vmm.
    pub vmm_signal: Option<i32>,
    /// How the main process last ended.
    pub last_main_exit: Option<ExitStatus>,
    /// How often the agent restarted it.
    pub restarts: u32,
    /// Seconds since the epoch when the VM became ready.
    pub started_at: u64,
    /// Seconds since the epoch when it ended.
    pub ended_at: u64,
    /// skiff-vmm's log and the console's last lines.
    pub diagnostics: String,
}

/// An event on an `events` subscription (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MonitorEvent {
    /// The main process ended.
    MainExited {
        /// How.
        status: ExitStatus,
        /// Whether the agent restarts it.
        restarting: bool,
        /// Restarts so far (this one included).
        restarts: u32,
    },
    /// The VM ended; the last event.
    Stopped(ExitInfo),
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_agent_proto::{Addressing, RestartPolicy};

    pub(crate) fn sample_spec() -> LaunchSpec {
        LaunchSpec {
            name: "web".into(),
            runtime_dir: "/run/skiff/vm/0123abcd".into(),
            rootfs: "/var/lib/skiff/storage/web/rootfs".into(),
            shares: vec![Share { tag: "data".into(), dir: "/srv/data".into() }],
            kernel: None,
            initramfs: Some("/cache/initrd".into()),
            agent: None,
            vmm: None,
            virtiofsd: None,
            monitor_program: None,
            cpus: 2,
            max_cpus: Some(4),
            memory_mib: 1024,
            memory_hotplug_mib: 1024,
            devices: vec![DeviceSpec::Disk {
                name: "scratch".into(),
                source: "/srv/scratch.img".into(),
                readonly: false,
            }],
            hostname: Some("web".into()),
            boot_timeout_secs: 60,
            nic: Some(Nic { tap: "skt0123abcd".into(), mac: "52:54:00:12:34:56".into() }),
            network: Some(NetworkConfig {
                addressing: Addressing::Dhcp,
                hostname: Some("web".into()),
                dns: vec!["10.0.0.1".into()],
                search: vec!["skiff".into()],
                ..Default::default()
            }),
            main: skiff_agent_proto::MainProcess {
                args: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
                env: vec!["A=b".into()],
                cwd: "/".into(),
                user: Default::default(),
                terminal: false,
                hostname: None,
                stop_signal: 3,
                stop_timeout_secs: 10,
                restart: RestartPolicy::Always,
            },
            console_log: "/var/lib/skiff/instances/web/console.log".into(),
            exit_file: "/var/lib/skiff/instances/web/exit.json".into(),
            monitor_log: "/var/lib/skiff/instances/web/monitor.log".into(),
            label: "docker.io/library/nginx".into(),
            restore: None,
            os: None,
        }
    }

    #[test]
    fn launch_spec_round_trips_and_defaults_optional_fields() {
        let spec = sample_spec();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<LaunchSpec>(&json).unwrap(), spec);
        assert!(json.contains(r#""tap":"skt0123abcd""#) && json.contains(r#""method":"dhcp""#), "{json}");
        let minimal = r#"{"name":"a","runtime_dir":"/r/a","rootfs":"/x","cpus":1,"memory_mib":512,
            "boot_timeout_secs":60,"main":{"args":["sh"]},"console_log":"/c","exit_file":"/e","monitor_log":"/m"}"#;
        let s: LaunchSpec = serde_json::from_str(minimal).unwrap();
        assert!(s.kernel.is_none() && s.nic.is_none() && s.network.is_none() && s.shares.is_empty());
        assert_eq!(s.main.cwd, "/");
    }

    #[test]
    fn control_lines_have_a_stable_shape() {
        let r: ControlRequest = serde_json::from_str(r#"{"op":"stop"}"#).unwrap();
        assert_eq!(r, ControlRequest::Stop { timeout_secs: 10, force: false });
        let r: ControlRequest = serde_json::from_str(r#"{"op":"stop","timeout_secs":3,"force":true}"#).unwrap();
        assert_eq!(r, ControlRequest::Stop { timeout_secs: 3, force: true });
        assert_eq!(serde_json::to_string(&ControlRequest::Status).unwrap(), r#"{"op":"status"}"#);
        let r: ControlRequest = serde_json::from_str(
            r#"{"op":"add_device","device":{"type":"share","name":"d","source":"/x","path":"/data"}}"#,
        )
        .unwrap();
        let share = DeviceSpec::Share { name: "d".into(), source: "/x".into(), path: "/data".into(), readonly: false };
        assert_eq!(r, ControlRequest::AddDevice { device: share });
        let r: ControlRequest = serde_json::from_str(r#"{"op":"snapshot","dir":"/s/1"}"#).unwrap();
        assert_eq!(r, ControlRequest::Snapshot { dir: "/s/1".into() });
        let r: ControlRequest = serde_json::from_str(r#"{"op":"resize","cpus":3}"#).unwrap();
        assert_eq!(r, ControlRequest::Resize { cpus: Some(3), memory_mib: None });
        assert_eq!(serde_json::to_string(&ControlReply::Done).unwrap(), r#"{"reply":"done"}"#);
        let ev = MonitorEvent::MainExited { status: ExitStatus::Exited { code: 7 }, restarting: true, restarts: 1 };
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"event":"main_exited","status":{"kind":"exited","code":7},"restarting":true,"restarts":1}"#
        );
        let info = ExitInfo {
            name: "a".into(),
            reason: EndReason::Poweroff,
            vmm_exit_code: Some(0),
            vmm_signal: None,
            last_main_exit: Some(ExitStatus::Exited { code: 0 }),
            restarts: 0,
            started_at: 1,
            ended_at: 2,
            diagnostics: String::new(),
        };
        let line = serde_json::to_string(&MonitorEvent::Stopped(info.clone())).unwrap();
        assert!(line.starts_with(r#"{"event":"stopped","name":"a","reason":"poweroff""#), "{line}");
        assert_eq!(serde_json::from_str::<MonitorEvent>(&line).unwrap(), MonitorEvent::Stopped(info.clone()));
        let reply = serde_json::to_string(&ControlReply::Stopped(info)).unwrap();
        assert!(reply.starts_with(r#"{"reply":"stopped""#), "{reply}");
        let ready = BootReport::Failed { message: "x".into() };
        assert_eq!(serde_json::to_string(&ready).unwrap(), r#"{"result":"failed","message":"x"}"#);
    }
}
