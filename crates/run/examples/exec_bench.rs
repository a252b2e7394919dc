//! Exec round trip of `true` into a thin VM (the agent as PID 1, its root a
//! busybox rootfs over virtio-fs), under skiff-vmm (hybrid vsock) and QEMU
//! microvm (vhost-vsock-pci, vhost-user-fs-pci) with the same kernel,
//! agent and initramfs, interleaved in one run. Driven by `bench/exec`.
//!
//!   exec_bench --kernel VMLINUX --runs N --boots B [--cpus N] [--memory MIB]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skiff_agent_client::latency::{exec_true, percentile};
use skiff_agent_client::{AgentClient, Transport};
use skiff_agent_proto::PowerAction;
use skiff_run::kernel::{kernel_version, Kernel, KernelOrigin};
use skiff_run::{initramfs, vm, ThinVm, VmOptions};

struct Args {
    kernel: PathBuf,
    runs: usize,
    boots: usize,
    cpus: u8,
    memory: u64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { kernel: PathBuf::new(), runs: 200, boots: 1, cpus: 1, memory: 512 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().context("missing value");
        match k.as_str() {
            "--kernel" => a.kernel = v()?.into(),
            "--runs" => a.runs = v()?.parse()?,
            "--boots" => a.boots = v()?.parse()?,
            "--cpus" => a.cpus = v()?.parse()?,
            "--memory" => a.memory = v()?.parse()?,
            "-h" | "--help" => {
                println!("exec_bench --kernel VMLINUX [--runs N] [--boots B] [--cpus N] [--memory MIB]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.kernel.as_os_str().is_empty() {
        bail!("--kernel is required");
    }
    Ok(a)
}

fn make_rootfs(root: &Path) -> Result<()> {
    for d in ["bin", "dev", "proc", "sys", "run", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static")?;
    for applet in ["sh", "true", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(())
}

async fn skiff_round(a: &Args, dir: &Path, kernel: &Kernel, initrd: &Path, round: usize) -> Result<Vec<f64>> {
    let opts = VmOptions {
        name: format!("bench-{round}"),
        runtime_root: dir.join("run"),
        rootfs: dir.join("rootfs"),
        shares: vec![],
        kernel: kernel.clone(),
        initramfs: initrd.to_path_buf(),
        cpus: a.cpus,
        memory_mib: a.memory,
        hostname: None,
        vmm: vm::find_vmm()?,
        virtiofsd: vm::find_virtiofsd()?,
        boot_timeout: Duration::from_secs(300),
        bundle: "bench".into(),
    };
    let thin = ThinVm::boot(&opts).await?;
    let r = exec_true(&thin.agent(), a.runs).await.map_err(Into::into);
    thin.shutdown(Duration::from_secs(20)).await?;
    r
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn qemu_round(a: &Args, dir: &Path, initrd: &Path, round: usize) -> Result<Vec<f64>> {
    let sock = dir.join(format!("qfs{round}.sock"));
    let _fsd = Killed(
        Command::new(vm::find_virtiofsd()?)
            .arg(format!("--socket-path={}", sock.display()))
            .arg(format!("--shared-dir={}", dir.join("rootfs").display()))
            .arg("--cache=auto")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("virtiofsd did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cid = 100 + (std::process::id() % 1000) + round as u32;
    let serial = dir.join(format!("qemu{round}.log"));
    let mem = a.memory;
    let mut qemu = Killed(
        Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,accel=kvm,pcie=on,acpi=on,memory-backend=mem", "-cpu", "host"])
            .args(["-m", &format!("{mem}M"), "-smp", &a.cpus.to_string()])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", &format!("file:{}", serial.display())])
            .arg("-kernel")
            .arg(&a.kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 reboot=k panic=-1 quiet skiff.rootfs=rootfs"])
            .args(["-chardev", &format!("socket,id=fs0,path={}", sock.display())])
            .args(["-device", "vhost-user-fs-pci,chardev=fs0,tag=rootfs"])
            .args(["-device", &format!("vhost-vsock-pci,guest-cid={cid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("qemu-system-x86_64")?,
    );
    let agent = AgentClient::new(Transport::Vsock { cid, port: skiff_agent_proto::AGENT_VSOCK_PORT });
    let deadline = Instant::now() + Duration::from_secs(300);
    while agent.ping().await.is_err() {
        if Instant::now() > deadline || qemu.0.try_wait()?.is_some() {
            bail!("QEMU's guest agent never answered:\n{}", std::fs::read_to_string(&serial).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = exec_true(&agent, a.runs).await.map_err(Into::into);
    let _ = agent.power(PowerAction::Poweroff).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while qemu.0.try_wait()?.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = parse_args()?;
    let tmp = std::env::temp_dir().join(format!("skiff-exec-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let dir = tmp.as_path();
    make_rootfs(&dir.join("rootfs"))?;
    let version = kernel_version(&a.kernel)?;
    let needs_modules =
        version.as_deref().is_some_and(|v| Path::new("/lib/modules").join(v).join("modules.dep").is_file());
    let kernel = Kernel { path: a.kernel.clone(), version, needs_modules, origin: KernelOrigin::Explicit };
    let initrd = initramfs::ensure(&initramfs::find_agent(None)?, &kernel, Path::new("/"), &dir.join("cache"))?;
    println!(
        "exec_bench: kernel {kernel}, {} boots x {} execs of `true` each, {} vCPU(s), {} MiB",
        a.boots, a.runs, a.cpus, a.memory
    );
    let (mut skiff, mut qemu) = (Vec::new(), Vec::new());
    let mut failed = false;
    for round in 0..a.boots {
        match skiff_round(&a, dir, &kernel, &initrd, round).await {
            Ok(v) => skiff.extend(v),
            Err(e) => {
                eprintln!("exec_bench: skiff-vmm round {round}: {e:#}");
                failed = true;
            }
        }
        match qemu_round(&a, dir, &initrd, round).await {
            Ok(v) => qemu.extend(v),
            Err(e) => {
                eprintln!("exec_bench: qemu round {round}: {e:#}");
                failed = true;
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    for v in [&mut skiff, &mut qemu] {
        v.sort_by(|x, y| x.total_cmp(y));
    }
    println!("\n{:<28} {:>8} {:>12} {:>12}", "VMM", "execs", "p50 (µs)", "p99 (µs)");
    for (name, v) in [("skiff-vmm (hybrid vsock)", &skiff), ("qemu microvm (vhost-vsock)", &qemu)] {
        println!("{:<28} {:>8} {:>12.0} {:>12.0}", name, v.len(), percentile(v, 50.0), percentile(v, 99.0));
    }
    println!(
        "ratio skiff/qemu: p50 {:.2}, p99 {:.2}",
        percentile(&skiff, 50.0) / percentile(&qemu, 50.0),
        percentile(&skiff, 99.0) / percentile(&qemu, 99.0)
    );
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
