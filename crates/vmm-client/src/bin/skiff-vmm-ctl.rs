//! `skiff-vmm-ctl`: drives a running skiff-vmm through its control socket,
//! in the spirit of Cloud Hypervisor's `ch-remote`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use skiff_vmm_client::types::{DiskSpec, FsSpec, NetSpec, Resize, VsockSpec};
use skiff_vmm_client::Client;

/// Drive a running skiff-vmm: query it, pause it, hot-plug devices.
#[derive(Parser, Debug)]
#[command(name = "skiff-vmm-ctl", version, about)]
struct Args {
    /// skiff-vmm's control socket (its `--api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check that the VMM answers; print its version and pid.
    Ping,
    /// Print state, vCPUs, memory and devices (JSON).
    Info,
    /// Print VM-exit and per-device counters (JSON).
    Counters,
    /// Park every vCPU and device; the guest makes no progress.
    Pause,
    /// Let a paused VM run again.
    Resume,
    /// Press the ACPI power button: the guest shuts down cleanly.
    Shutdown,
    /// End the VM at once.
    PowerOff,
    /// Hot-plug a disk: `path=IMAGE[,format=raw|qcow2][,readonly=on][,serial=S][,id=ID]`.
    AddDisk { spec: String },
    /// Hot-plug a NIC: `tap=NAME[,mac=MAC][,id=ID]`.
    AddNet { spec: String },
    /// Hot-plug a virtio-fs share: `tag=T,socket=PATH[,id=ID]`.
    AddFs { spec: String },
    /// Hot-plug a vsock device: `cid=N,socket=PATH[,id=ID]`.
    AddVsock { spec: String },
    /// Ask the guest to eject a device, and remove it once it has.
    RemoveDevice { id: String },
    /// Change the number of vCPUs or the memory size.
    Resize {
        /// vCPUs wanted.
        #[arg(long)]
        cpus: Option<u8>,
        /// Memory wanted, in MiB.
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
    },
    /// Save the paused VM into DIR (files `state` and `memory`);
    /// `skiff-vmm --restore DIR` brings it back.
    Snapshot { dir: PathBuf },
}

/// `key=value,...` into pairs; every key must be in `known`.
fn pairs(spec: &str, known: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| anyhow::anyhow!("expected key=value, got {item:?}"))?;
        anyhow::ensure!(known.contains(&k), "unknown key {k:?} (known: {})", known.join(", "));
        anyhow::ensure!(!out.iter().any(|(o, _)| o == k), "key {k:?} given twice");
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn get<'a>(p: &'a [(String, String)], key: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn need<'a>(p: &'a [(String, String)], key: &str) -> anyhow::Result<&'a str> {
    get(p, key).ok_or_else(|| anyhow::anyhow!("missing {key}="))
}

fn print(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let c = Client::new(&args.api_socket);
    let id = |p: &[(String, String)]| get(p, "id").map(str::to_string);
    match args.command {
        Command::Ping => {
            let p = c.ping()?;
            println!("skiff-vmm {} (pid {})", p.version, p.pid);
        }
        Command::Info => print(&c.info()?)?,
        Command::Counters => print(&c.counters()?)?,
        Command::Pause => c.pause()?,
        Command::Resume => c.resume()?,
        Command::Shutdown => c.shutdown()?,
        Command::PowerOff => c.power_off()?,
        Command::AddDisk { spec } => {
            let p = pairs(&spec, &["path", "format", "readonly", "serial", "id"])?;
            let readonly = match get(&p, "readonly") {
                None | Some("off") | Some("false") => false,
                Some("on") | Some("true") => true,
                Some(v) => anyhow::bail!("readonly={v}: expected on or off"),
            };
            let spec = DiskSpec {
                id: id(&p),
                path: need(&p, "path")?.into(),
                readonly,
                serial: get(&p, "serial").map(str::to_string),
                format: get(&p, "format").map(str::to_string),
            };
            print(&c.add_disk(&spec)?)?;
        }
        Command::AddNet { spec } => {
            let p = pairs(&spec, &["tap", "mac", "id"])?;
            let spec = NetSpec { id: id(&p), tap: need(&p, "tap")?.into(), mac: get(&p, "mac").map(str::to_string) };
            print(&c.add_net(&spec)?)?;
        }
        Command::AddFs { spec } => {
            let p = pairs(&spec, &["tag", "socket", "id"])?;
            let spec = FsSpec { id: id(&p), tag: need(&p, "tag")?.into(), socket: need(&p, "socket")?.into() };
            print(&c.add_fs(&spec)?)?;
        }
        Command::AddVsock { spec } => {
            let p = pairs(&spec, &["cid", "socket", "id"])?;
            let cid = need(&p, "cid")?.parse().map_err(|_| anyhow::anyhow!("cid must be a number"))?;
            let spec = VsockSpec { id: id(&p), cid, socket: need(&p, "socket")?.into() };
            print(&c.add_vsock(&spec)?)?;
        }
        Command::RemoveDevice { id } => c.remove_device(&id)?,
        Command::Resize { cpus, memory } => {
            anyhow::ensure!(cpus.is_some() || memory.is_some(), "give --cpus, --memory or both");
            c.resize(&Resize { vcpus: cpus, memory_mib: memory })?
        }
        Command::Snapshot { dir } => print(&c.snapshot(&dir)?)?,
    }
    Ok(())
}
