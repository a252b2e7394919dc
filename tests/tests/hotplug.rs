//! skiff-vmm at runtime (issue 11), in ONE guest: the control API, pause
//! and resume, and hot-plug of a disk, a NIC and a virtio-fs share through
//! ACPI (the Generic Event Device and `acpiphp`), each added, used from
//! both sides, removed, and added again; bad requests get clear errors and
//! the VM goes on. The guest is Debian's cloud kernel with the
//! devices-test initramfs (`tests/guest/devices-init.sh`), driven through
//! `skiff-guest-tools serve` on vsock. Every check runs; the test fails at
//! the end listing the failed ones.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_tests::fixture::{
    counter, disk_by_serial, iface_by_mac, poll, random_bytes, sha256, vcpu_seconds, virtiofsd, Checks, Guest, Network,
};
use skiff_tests::{artifact, scratch, RunningVm, VmSpec};
use skiff_vmm_client::types::{DiskSpec, FsSpec, NetSpec, Resize, VmState, VsockSpec};
use skiff_vmm_client::{Client, ClientError};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;
const HOST0: Ipv4Addr = Ipv4Addr::new(10, 78, 7, 1);
const HOST1: Ipv4Addr = Ipv4Addr::new(10, 78, 8, 1);
const HP_MAC: &str = "52:54:00:78:07:09";

fn refused(r: Result<impl std::fmt::Debug, ClientError>, status: u16, needle: &str) -> Result<()> {
    match r {
        Err(ClientError::Refused { status: s, message, .. }) if s == status && message.contains(needle) => {
            println!("  refused as expected ({s}): {message}");
            Ok(())
        }
        other => bail!("expected a {status} error mentioning {needle:?}, got {other:?}"),
    }
}

fn check_pause(g: &Guest, api: &Client) -> Result<()> {
    g.run("(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid")?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = g.vm.pid();
    let c0 = counter(g)?;
    std::thread::sleep(Duration::from_secs(2));
    let c1 = counter(g)?;
    api.pause()?;
    let paused = (|| {
        ensure!(api.info()?.state == VmState::Paused, "info does not say paused");
        let cpu0 = vcpu_seconds(pid)?;
        std::thread::sleep(Duration::from_secs(2));
        Ok((cpu0, vcpu_seconds(pid)?))
    })();
    api.resume()?;
    let (cpu0, cpu1) = paused?;
    let c2 = counter(g)?;
    let (running, paused) = (c1 - c0, c2 - c1);
    println!(
        "  counter: +{running} in 2 s running, +{paused} across 2 s paused; vCPU CPU while paused {:.3} s",
        cpu1 - cpu0
    );
    ensure!(running > 0, "the guest's counter did not move while running");
    ensure!(paused * 3 < running, "the guest made progress while paused: +{paused} vs +{running} running");
    ensure!(cpu1 - cpu0 < 0.2, "vCPU threads used {:.3} s of CPU while paused", cpu1 - cpu0);
    let t = Instant::now();
    for i in 0..100 {
        api.pause().with_context(|| format!("pause {i}"))?;
        api.resume().with_context(|| format!("resume {i}"))?;
    }
    println!("  100 pause/resume rounds in {:.1} s", t.elapsed().as_secs_f64());
    g.run("kill $(cat /tmp/counter.pid)")?;
    ensure!(g.run("echo alive")?.trim() == "alive", "the guest does not answer after 100 pauses");
    Ok(())
}

fn vmm_has_open(pid: u32, file: &Path) -> Result<bool> {
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))? {
        if fs::read_link(fd?.path()).ok().as_deref() == Some(file) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn check_disk(g: &Guest, api: &Client, dir: &Path) -> Result<()> {
    let image = dir.join("hot.raw");
    fs::File::create(&image)?.set_len(32 * MIB)?;
    let spec = DiskSpec {
        id: Some("hot".into()),
        path: image.clone(),
        readonly: false,
        serial: Some("skiff-hot".into()),
        format: Some("raw".into()),
    };
    let t = Instant::now();
    let added = api.add_disk(&spec)?;
    let dev =
        poll("the hot-plugged disk in the guest", Duration::from_secs(60), || Ok(disk_by_serial(g, "skiff-hot").ok()))?;
    println!("  /dev/{dev} (slot {}) visible {:.1} s after the request", added.slot, t.elapsed().as_secs_f64());
    let sectors: u64 = g.run(&format!("cat /sys/block/{dev}/size"))?.trim().parse()?;
    ensure!(sectors * 512 == 32 * MIB, "/dev/{dev} has {sectors} sectors");
    let data = random_bytes(MIB as usize);
    fs::write(dir.join("pattern.bin"), &data)?;
    // The guest writes a pattern made in the guest; the host reads it back.
    let out = g.run(&format!(
        "dd if=/dev/urandom of=/tmp/p.bin bs=1M count=1 2>/dev/null && dd if=/tmp/p.bin of=/dev/{dev} bs=1M oflag=direct 2>/dev/null && sha256sum /tmp/p.bin"
    ))?;
    let want = out.split_whitespace().next().unwrap_or_default().to_string();
    let mut head = fs::read(&image)?;
    head.truncate(MIB as usize);
    ensure!(sha256(&head) == want, "the host does not see what the guest wrote");

    api.remove_device("hot")?;
    let gone = g.run(&format!("test -e /sys/block/{dev} && echo present || echo gone"))?;
    ensure!(gone.trim() == "gone", "/dev/{dev} is still in the guest after removal");
    ensure!(!vmm_has_open(g.vm.pid(), &image)?, "skiff-vmm still has the image open");
    ensure!(!api.info()?.devices.iter().any(|d| d.id == "hot"), "info still lists the removed disk");
    let again = api.add_disk(&spec)?;
    ensure!(again.slot == added.slot, "re-added on slot {} instead of the freed {}", again.slot, added.slot);
    poll("the re-added disk", Duration::from_secs(60), || Ok(disk_by_serial(g, "skiff-hot").ok()))?;
    api.remove_device("hot")?;
    Ok(())
}

fn check_net(g: &Guest, api: &Client, net: &Network) -> Result<()> {
    let t = Instant::now();
    api.add_net(&NetSpec { id: Some("lan".into()), tap: net.tap0.clone(), mac: Some(HP_MAC.into()) })?;
    let eth = poll("the hot-plugged NIC", Duration::from_secs(60), || Ok(iface_by_mac(g, HP_MAC).ok()))?;
    println!("  {eth} visible {:.1} s after the request", t.elapsed().as_secs_f64());
    let dhcp = g.run(&format!("ip link set {eth} up && udhcpc -i {eth} -f -q -n -t 10 -T 2 -s /etc/udhcpc.sh"))?;
    ensure!(dhcp.contains("bound 10.78.7."), "no DHCP lease on the hot-plugged NIC: {dhcp}");
    let ping = g.run(&format!("ping -c 2 -W 5 {HOST0}"))?;
    ensure!(ping.contains("2 packets received"), "ping: {ping}");
    api.remove_device("lan")?;
    let gone = g.run(&format!("test -e /sys/class/net/{eth} && echo present || echo gone"))?;
    ensure!(gone.trim() == "gone", "{eth} is still in the guest");
    Ok(())
}

fn check_fs(g: &Guest, api: &Client, dir: &Path) -> Result<()> {
    let share = dir.join("hot-share");
    fs::create_dir_all(&share)?;
    fs::write(share.join("from-host.txt"), "hot share\n")?;
    let _fsd = virtiofsd(&share, &dir.join("hot-fs.sock"), &dir.join("hot-virtiofsd.log"))?;
    api.add_fs(&FsSpec { id: Some("share".into()), tag: "hotshare".into(), socket: dir.join("hot-fs.sock") })?;
    poll("mounting the hot-plugged share", Duration::from_secs(60), || {
        Ok(g.exec("mkdir -p /mnt/hot && mount -t virtiofs hotshare /mnt/hot")?.code.eq(&0).then_some(()))
    })?;
    ensure!(g.run("cat /mnt/hot/from-host.txt")? == "hot share\n", "cannot read the host's file");
    g.run("echo from guest > /mnt/hot/from-guest.txt && sync")?;
    ensure!(fs::read_to_string(share.join("from-guest.txt"))? == "from guest\n", "the host does not see the file");
    g.run("umount /mnt/hot")?;
    api.remove_device("share")?;
    Ok(())
}

/// vCPUs online in the guest.
fn online(g: &Guest) -> Result<usize> {
    Ok(g.run("grep -c ^processor /proc/cpuinfo")?.trim().parse()?)
}

fn check_vcpus(g: &Guest, api: &Client) -> Result<()> {
    ensure!(online(g)? == 2, "the guest does not start with 2 vCPUs");
    let possible = g.run("cat /sys/devices/system/cpu/possible")?;
    ensure!(possible.trim() == "0-5", "the guest's possible CPUs are {possible:?}, not 0-5");
    let t = Instant::now();
    api.resize(&Resize { vcpus: Some(6), memory_mib: None })?;
    poll("the guest to see 6 vCPUs", Duration::from_secs(60), || {
        Ok(g.exec("test -e /sys/devices/system/cpu/cpu5/online")?.code.eq(&0).then_some(()))
    })?;
    // What the agent does in a thin VM: online what was added.
    g.run("for c in 2 3 4 5; do echo 1 > /sys/devices/system/cpu/cpu$c/online; done")?;
    ensure!(online(g)? == 6, "nproc does not follow the resize to 6");
    ensure!(api.info()?.cpus.present == 6, "info does not show 6 vCPUs");
    println!("  2 → 6 vCPUs online in {:.1} s", t.elapsed().as_secs_f64());
    api.resize(&Resize { vcpus: Some(3), memory_mib: None })?;
    let ejected = poll("the guest to eject 3 vCPUs", Duration::from_secs(30), || {
        Ok((api.info()?.cpus.present == 3).then_some(()))
    });
    if let Err(e) = ejected {
        let dmesg = g.run("dmesg | tail -40; cat /sys/devices/system/cpu/online")?;
        bail!("{e:#}\n--- guest dmesg ---\n{dmesg}");
    }
    ensure!(online(g)? == 3, "nproc does not follow the resize to 3");
    let threads = fs::read_dir(format!("/proc/{}/task", g.vm.pid()))?
        .filter(|t| {
            t.as_ref()
                .ok()
                .and_then(|t| fs::read_to_string(t.path().join("comm")).ok())
                .is_some_and(|c| c.starts_with("vcpu"))
        })
        .count();
    ensure!(threads == 3, "skiff-vmm has {threads} vCPU threads after the resize to 3");
    // A removed vCPU comes back.
    api.resize(&Resize { vcpus: Some(4), memory_mib: None })?;
    poll("vCPU 3 back", Duration::from_secs(60), || {
        Ok(g.exec("echo 1 > /sys/devices/system/cpu/cpu3/online")?.code.eq(&0).then_some(()))
    })?;
    ensure!(online(g)? == 4, "the re-added vCPU is not online");
    Ok(())
}

/// The guest's MemTotal in KiB.
fn mem_total_kib(g: &Guest) -> Result<u64> {
    let line = g.run("grep MemTotal /proc/meminfo")?;
    Ok(line.split_whitespace().nth(1).context("MemTotal")?.parse()?)
}

/// Bytes of the guest-RAM memfd that hold pages on the host.
fn memfd_allocated(pid: u32) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let target = fs::read_link(fd.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/memfd:skiff-guest-ram") {
            return Ok(fs::metadata(fd.path())?.blocks() * 512);
        }
    }
    bail!("skiff-vmm has no skiff-guest-ram memfd open")
}

/// virtio-mem: 512 MiB boot memory and a 2 GiB hot-plug region; the guest
/// (memhp_default_state=online_movable) follows 512 → 2048 → 1024 MiB, and
/// what it unplugs leaves the host's memfd.
fn check_memory(g: &Guest, api: &Client) -> Result<()> {
    let m = api.info()?.memory;
    ensure!(
        (m.boot_mib, m.hotplug_mib, m.requested_mib, m.plugged_mib) == (512, 2048, 512, 512),
        "memory info at boot: {m:?}"
    );
    ensure!(g.exec("test -d /sys/bus/virtio/drivers/virtio_mem")?.code == 0, "the guest has no virtio_mem driver");
    let base = mem_total_kib(g)?;
    let pid = g.vm.pid();
    let (mut before, mut dirty) = (512, None);
    for target in [2048u64, 1024] {
        if target < before {
            // Dirty the hot-plugged memory first (anonymous, movable), so
            // the host has pages to get back when the guest unplugs.
            g.run("dd if=/dev/zero of=/dev/null bs=1200M count=1 2>/dev/null; true")?;
            let held = memfd_allocated(pid)? >> 20;
            println!("  memfd holds {held} MiB after the guest touched its memory");
            dirty = Some(held);
        }
        let t = Instant::now();
        api.resize(&Resize { vcpus: None, memory_mib: Some(target) })?;
        let want = base + (target - 512) * 1024;
        let got = poll(&format!("MemTotal to follow {target} MiB"), Duration::from_secs(120), || {
            let kib = mem_total_kib(g)?;
            Ok((kib.abs_diff(want) <= 4096).then_some(kib))
        });
        let got = match got {
            Ok(kib) => kib,
            Err(e) => {
                let dmesg = g.run("dmesg | grep -i -e virtio_mem -e memory | tail -20")?;
                bail!(
                    "{e:#} (MemTotal {} KiB, info {:?})\n--- guest dmesg ---\n{dmesg}",
                    mem_total_kib(g)?,
                    api.info()?.memory
                );
            }
        };
        let m = poll("vm.info to agree", Duration::from_secs(10), || {
            let m = api.info()?.memory;
            Ok((m.plugged_mib == target).then_some(m))
        })?;
        ensure!(m.requested_mib == target, "requested {} MiB, not {target}", m.requested_mib);
        let held = memfd_allocated(pid)? >> 20;
        println!(
            "  {before} → {target} MiB in {:.1} s: guest MemTotal {got} KiB (boot {base} KiB), vm.info plugged {} MiB, memfd holds {held} MiB",
            t.elapsed().as_secs_f64(),
            m.plugged_mib
        );
        ensure!(held <= target + 16, "the memfd holds {held} MiB for a {target} MiB guest");
        if let Some(d) = dirty {
            ensure!(d >= held + 256, "unplugging 1 GiB gave back only {} MiB of {d} MiB", d.saturating_sub(held));
        }
        before = target;
    }
    refused(api.resize(&Resize { vcpus: None, memory_mib: Some(2561) }), 409, "512 to 2560")?;
    refused(api.resize(&Resize { vcpus: None, memory_mib: Some(256) }), 409, "512 to 2560")?;
    refused(api.remove_device("mem0"), 409, "cannot be removed")?;
    ensure!(api.info()?.memory.requested_mib == 1024, "a refused resize changed the request");
    Ok(())
}

/// The vsock device the test talks to the guest through goes and comes
/// back on a new host socket; the guest's server is reachable again.
fn check_vsock(g: &Guest, api: &Client, dir: &Path) -> Result<()> {
    api.remove_device("vsock0")?;
    ensure!(g.exec("true").is_err(), "the guest still answers on the removed vsock device");
    let sock = dir.join("v2.sock");
    let added = api.add_vsock(&VsockSpec { id: Some("vsock1".into()), cid: 3, socket: sock.clone() })?;
    let out = poll("the guest's server on the re-added vsock", Duration::from_secs(60), || {
        Ok(skiff_tests::guest_exec(&sock, skiff_tests::fixture::GUEST_PORT, "echo back").ok())
    })?;
    ensure!(out.output.trim() == "back", "exec over the new vsock: {out:?}");
    println!("  vsock re-added on slot {} and answering", added.slot);
    Ok(())
}

fn check_bad_requests(g: &Guest, api: &Client, dir: &Path) -> Result<()> {
    refused(api.remove_device("nope"), 404, "nope")?;
    let spec = |id: &str, path: &Path| DiskSpec {
        id: Some(id.into()),
        path: path.into(),
        readonly: false,
        serial: None,
        format: None,
    };
    refused(api.add_disk(&spec("bad", &dir.join("missing.raw"))), 400, "missing.raw")?;
    let img = dir.join("dup.raw");
    fs::File::create(&img)?.set_len(MIB)?;
    refused(api.add_disk(&spec("vsock0", &img)), 409, "vsock0")?;
    refused(api.resize(&Resize { vcpus: Some(7), memory_mib: None }), 409, "1 to 6")?;
    refused(api.resize(&Resize { vcpus: Some(0), memory_mib: None }), 409, "1 to 6")?;
    refused(api.resize(&Resize { vcpus: None, memory_mib: Some(4096) }), 409, "hot-plug")?;
    api.pause()?;
    refused(api.add_disk(&spec("p", &img)), 409, "paused")?;
    api.resume()?;
    // No free slot: fill the bus, then take everything out again.
    let mut filled = Vec::new();
    let full = loop {
        ensure!(filled.len() < 32, "the bus took {} disks", filled.len());
        let id = format!("fill{}", filled.len());
        let img = dir.join(format!("{id}.raw"));
        fs::File::create(&img)?.set_len(MIB)?;
        match api.add_disk(&spec(&id, &img)) {
            Ok(_) => filled.push(id),
            Err(e) => break e,
        }
    };
    refused(Err::<(), _>(full), 409, "no free PCI slot")?;
    println!("  the bus was full after {} more disks", filled.len());
    for id in &filled {
        api.remove_device(id).with_context(|| format!("removing {id}"))?;
    }
    ensure!(g.run("echo alive")?.trim() == "alive", "the guest does not answer after the bad requests");
    Ok(())
}

#[test]
#[ignore = "boots a guest: needs hardware KVM and root; run through tests/run"]
fn runtime_control_and_hotplug() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "needs root (bridges, taps, virtiofsd): run through tests/run");
    let dir = scratch()?;
    let d = dir.path();
    let net = Network::setup(d, HOST0, HOST1)?;
    let vsock = d.join("v.sock");
    let api_sock = d.join("api.sock");
    let spec = VmSpec {
        kernel: artifact("vmlinux")?,
        initramfs: Some(artifact("devices-test.cpio")?),
        cmdline: "console=ttyS0 reboot=k panic=-1 quiet memhp_default_state=online_movable".into(),
        cpus: 2,
        memory_mib: 512,
        api_socket: Some(api_sock.clone()),
    };
    let args = [
        "--cpus".into(),
        "boot=2,max=6".into(),
        "--memory".into(),
        "size=512,hotplug=2048".into(),
        "--vsock".into(),
        format!("cid=3,socket={}", vsock.display()),
    ];
    let mut vm = RunningVm::start_with(&spec, &args)?;
    vm.wait_for_serial("serving on vsock port", BOOT_TIMEOUT)?;
    let g = Guest { vm, vsock };
    let api = Client::new(&api_sock);

    let mut checks = Checks::default();
    checks.run("info", || {
        let info = api.info()?;
        ensure!(info.devices.iter().any(|d| d.id == "vsock0" && !d.hotplugged), "devices: {:?}", info.devices);
        ensure!(info.state == VmState::Running && info.cpus.present == 2 && info.cpus.max == 6, "info: {info:?}");
        Ok(())
    });
    checks.run("pause and resume", || check_pause(&g, &api));
    checks.run("disk hot-plug", || check_disk(&g, &api, d));
    checks.run("nic hot-plug", || check_net(&g, &api, &net));
    checks.run("virtio-fs hot-plug", || check_fs(&g, &api, d));
    checks.run("vCPU hot-plug", || check_vcpus(&g, &api));
    checks.run("memory hot-plug", || check_memory(&g, &api));
    checks.run("bad requests", || check_bad_requests(&g, &api, d));
    checks.run("vsock hot-plug", || check_vsock(&g, &api, d));
    checks.run("counters", || {
        let c = api.counters()?;
        ensure!(c.vm_exits.get("mmio_write").copied().unwrap_or(0) > 0, "counters: {c:?}");
        Ok(())
    });

    api.power_off()?;
    let out = g.vm.wait(Duration::from_secs(60))?;
    println!("--- stderr ---\n{}", out.stderr);
    checks.run("power-off", || {
        ensure!(out.status.code() == Some(0), "power-off should end the VMM with 0, got {}", out.status);
        ensure!(out.stderr.contains("API power-off"), "no power-off message");
        ensure!(!api_sock.exists(), "the API socket was left behind");
        Ok(())
    });
    if !checks.failed.is_empty() {
        println!("--- serial ---\n{}", out.serial);
        bail!("{} check(s) failed:\n  {}", checks.failed.len(), checks.failed.join("\n  "));
    }
    Ok(())
}
