//! The same thin VM under QEMU, for comparisons in the same box run: QEMU's
//! `microvm` (PCIe, ACPI) with the rootfs and a second share over
//! vhost-user-fs (a real virtiofsd each), vhost-vsock for the agent, guest
//! RAM a shared memfd. Same kernel, initramfs and agent as skiff-vmm's
//! thin VM: a failure that QEMU shows too lies below both VMMs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skiff_agent_client::{AgentClient, Timeouts, Transport};
use skiff_run::vm;
use skiff_run::Share;

/// A running QEMU guest and its virtiofsd processes (killed on drop).
pub struct QemuVm {
    qemu: Child,
    virtiofsd: Vec<Child>,
    serial: PathBuf,
    log: PathBuf,
    cid: u32,
}

impl QemuVm {
    /// Boots `kernel` + `initrd` with `shares` (the first is the rootfs,
    /// tag `rootfs`) and waits until the agent answers.
    pub async fn boot(
        dir: &Path,
        kernel: &Path,
        initrd: &Path,
        shares: &[Share],
        cpus: u8,
        memory_mib: u64,
        hostname: &str,
    ) -> Result<QemuVm> {
        let mut virtiofsd = Vec::new();
        let mut fs_args = Vec::new();
        for (i, share) in shares.iter().enumerate() {
            let sock = dir.join(format!("qemu-fs{i}.sock"));
            let _ = std::fs::remove_file(&sock);
            virtiofsd.push(
                Command::new(vm::find_virtiofsd()?)
                    .arg(format!("--socket-path={}", sock.display()))
                    .arg(format!("--shared-dir={}", share.dir.display()))
                    .arg("--cache=auto")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting virtiofsd")?,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while !sock.exists() {
                if Instant::now() > deadline {
                    bail!("virtiofsd for {} did not start", share.tag);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            fs_args.push("-chardev".to_string());
            fs_args.push(format!("socket,id=fs{i},path={}", sock.display()));
            fs_args.push("-device".to_string());
            fs_args.push(format!("vhost-user-fs-pci,chardev=fs{i},tag={}", share.tag));
        }
        let cid = 100 + (std::process::id() % 10_000);
        let serial = dir.join("qemu-console.log");
        let qemu = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,accel=kvm,pcie=on,acpi=on,memory-backend=mem", "-cpu", "host"])
            .args(["-m", &format!("{memory_mib}M"), "-smp", &cpus.to_string()])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on")])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", &format!("file:{}", serial.display())])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &format!("console=ttyS0 reboot=k panic=-1 quiet skiff.hostname={hostname}")])
            .args(&fs_args)
            .args(["-device", &format!("vhost-vsock-pci,guest-cid={cid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).context("creating qemu.log")?)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let mut vm = QemuVm { qemu, virtiofsd, serial, log: dir.join("qemu.log"), cid };
        let agent = vm.agent();
        let deadline = Instant::now() + Duration::from_secs(300);
        while agent.ping().await.is_err() {
            if Instant::now() > deadline || vm.qemu.try_wait()?.is_some() {
                bail!("QEMU's guest agent never answered\n{}", vm.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(vm)
    }

    /// A client of the agent over AF_VSOCK.
    pub fn agent(&self) -> AgentClient {
        AgentClient::new(Transport::Vsock { cid: self.cid, port: skiff_agent_proto::AGENT_VSOCK_PORT })
            .with_timeouts(Timeouts { connect: Duration::from_secs(60), request: Duration::from_secs(180), exec: None })
    }

    /// Waits up to `limit` for QEMU to exit (the guest powered off).
    pub async fn wait(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.qemu.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// QEMU's own messages and the console's last lines.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- QEMU's log ---\n{}\n--- QEMU guest console (last lines) ---\n{}",
            vm::tail(&self.log, 60),
            vm::tail(&self.serial, 60)
        )
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        for c in &mut self.virtiofsd {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
