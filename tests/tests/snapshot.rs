//! VM snapshot and restore (issue 14), in ONE guest boot: a guest with a
//! counter process, a disk, a NIC on a bridge with DHCP and a vsock
//! command server is saved once (`snap0`), gets a hot-plugged virtio-fs
//! share (a real virtiofsd), is saved again with `vm.snapshot` (and goes
//! on when resumed), its VMM and virtiofsd killed, and restored in a new
//! skiff-vmm process with a fresh virtiofsd for the same directory: the
//! counter goes on from where it was, what the guest kept in memory is
//! there, the server answers over a new vsock connection (the guest got a
//! transport reset), the disk's data is intact and takes new writes, the
//! NIC pings, a file the guest opened on the share before the snapshot
//! reads through its old descriptor and the share takes new writes both
//! ways; a file opened and then deleted before the snapshot cannot be
//! migrated by virtiofsd (it has no path), and the test prints what the
//! guest gets. Between the kill and the restore, bad snapshots are refused
//! with clear errors before any vCPU runs: a damaged, truncated or
//! other-version state file, a memory file of the wrong size, more vCPUs
//! than the VM's max, a missing disk or virtiofsd. Last, `snap0` is
//! restored onto a private mapping of its memory file: it goes on, and a
//! share cannot be added to it. The guest is Debian's cloud kernel with
//! the devices-test initramfs (`tests/guest/devices-init.sh`), as in the
//! hot-plug test. Every check runs; the test fails at the end listing the
//! failed ones.
//!
//! Then a thin VM (see [`thin_clones_from_one_snapshot`]).

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use skiff_agent_client::{AgentClient, Timeouts, Transport};
use skiff_agent_proto::{Addressing, ExecRequest, NetworkConfig};
use skiff_run::kernel::{kernel_version, Kernel, KernelOrigin};
use skiff_run::vm::{Nic, VmExtras, VMM_API_SOCKET};
use skiff_run::{initramfs, vm, ThinVm, VmOptions};
use skiff_tests::fixture::{
    counter, disk_by_serial, field, iface_by_mac, poll, sha256, vcpu_seconds, virtiofsd_with, Checks, Daemon, Guest,
    Network, GUEST_PORT,
};
use skiff_tests::thin::{make_rootfs, BOOT_TIMEOUT as THIN_BOOT_TIMEOUT};
use skiff_tests::{artifact, guest_exec, scratch, vmm_binary, RunningVm, VmSpec};
use skiff_vmm_client::types::{FsSpec, VmState};
use skiff_vmm_client::Client;

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;
const HOST0: Ipv4Addr = Ipv4Addr::new(10, 78, 9, 1);
const HOST1: Ipv4Addr = Ipv4Addr::new(10, 78, 10, 1);
const MAC: &str = "52:54:00:78:09:02";
const SERIAL: &str = "skiff-snap";
const TAG: &str = "share";
/// Background readers on the share: each opens its file before the
/// snapshot and reads it through that descriptor once /tmp/go exists.
const KEPT_READERS: &str = "{ mkdir -p /mnt/share && mount -t virtiofs share /mnt/share && \
    echo kept-before > /mnt/share/kept && echo gone-before > /mnt/share/gone || exit 1; } ; \
    (exec 3</mnt/share/kept; while [ ! -e /tmp/go ]; do sleep 0.2; done; cat <&3 >/tmp/kept.out 2>&1; echo $? >/tmp/kept.rc) </dev/null >/dev/null 2>&1 & \
    (exec 4</mnt/share/gone; while [ ! -e /tmp/go ]; do sleep 0.2; done; cat <&4 >/tmp/gone.out 2>&1; echo $? >/tmp/gone.rc) </dev/null >/dev/null 2>&1 & \
    sleep 1; rm /mnt/share/gone; cat /mnt/share/from-host-before";

/// What the guest holds before the snapshot, checked after the restore.
struct Before {
    count: u64,
    marker: String,
    disk_sha: String,
    dev: String,
    eth: String,
}

fn prepare(g: &Guest, api: &Client) -> Result<Before> {
    let dev = disk_by_serial(g, SERIAL)?;
    let out = g.run(&format!(
        "dd if=/dev/urandom of=/tmp/p.bin bs=1M count=1 2>/dev/null && dd if=/tmp/p.bin of=/dev/{dev} bs=1M oflag=direct 2>/dev/null && sha256sum /tmp/p.bin"
    ))?;
    let disk_sha = out.split_whitespace().next().unwrap_or_default().to_string();
    let eth = iface_by_mac(g, MAC)?;
    let dhcp = g.run(&format!("ip link set {eth} up && udhcpc -i {eth} -f -q -n -t 10 -T 2 -s /etc/udhcpc.sh"))?;
    let ip = dhcp.split("bound ").nth(1).and_then(|r| r.split('/').next()).unwrap_or_default().to_string();
    ensure!(ip.starts_with("10.78.9."), "no DHCP lease: {dhcp}");
    let ping = g.exec(&format!("ping -c 1 -W 5 {HOST0}"))?.output;
    ensure!(ping.contains("1 packets received"), "ping before the snapshot: {ping}");
    let marker = g.run("head -c 4096 /dev/urandom | sha256sum | tee /tmp/marker")?;
    g.run("(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; done) </dev/null >/dev/null 2>&1 &")?;
    std::thread::sleep(Duration::from_secs(1));
    let c0 = counter(g)?;
    std::thread::sleep(Duration::from_secs(1));
    let count = counter(g)?;
    ensure!(count > c0, "the counter does not run before the snapshot");
    api.pause()?;
    Ok(Before { count, marker, disk_sha, dev, eth })
}

/// Runs `skiff-vmm --restore dir extra...`, which must fail (status 2)
/// before any vCPU runs with an error containing `needle`.
fn refused(dir: &Path, extra: &[&str], needle: &str) -> Result<()> {
    let t = Instant::now();
    let mut child = Command::new(vmm_binary()?)
        .arg("--restore")
        .arg(dir)
        .args(["--serial", "off"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("skiff-vmm --restore {} did not exit", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().context("stderr")?, &mut err)?;
    ensure!(!err.contains("restored "), "it restored: {err}");
    ensure!(status.code() == Some(2) && err.contains(needle), "expected status 2 and {needle:?}, got {status}: {err}");
    println!("  refused in {} ms: {}", t.elapsed().as_millis(), err.trim());
    Ok(())
}

/// A copy of the snapshot in `snap` (the memory file hard-linked) whose
/// state file is `state`.
fn variant(root: &Path, name: &str, snap: &Path, state: &[u8]) -> Result<PathBuf> {
    let dir = root.join(name);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("state"), state)?;
    fs::hard_link(snap.join("memory"), dir.join("memory"))?;
    Ok(dir)
}

/// `state` with its JSON body changed by `f` and the checksum made right.
fn reencode(state: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Result<Vec<u8>> {
    let mut body: serde_json::Value = serde_json::from_slice(&state[56..])?;
    f(&mut body);
    let body = serde_json::to_vec(&body)?;
    let mut out = state[..56].to_vec();
    out[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    out[24..56].copy_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

fn check_bad_snapshots(root: &Path, snap: &Path) -> Result<()> {
    let state = fs::read(snap.join("state"))?;
    let mut damaged = state.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x01;
    refused(&variant(root, "damaged", snap, &damaged)?, &[], "damaged (checksum mismatch)")?;
    refused(&variant(root, "truncated", snap, &state[..state.len() - 100])?, &[], "truncated")?;
    let mut other = state.clone();
    other[8] = 99;
    refused(&variant(root, "version", snap, &other)?, &[], "format version 99")?;
    let cpus = reencode(&state, |v| {
        v["boot_cpus"] = 1.into();
        v["max_cpus"] = 1.into();
    })?;
    refused(&variant(root, "cpus", snap, &cpus)?, &[], "more than its max of 1")?;
    let dir = root.join("memsize");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("state"), &state)?;
    fs::File::create(dir.join("memory"))?.set_len(128 * MIB)?;
    refused(&dir, &[], "memory file")?;
    refused(snap, &["--disk", "path=/nonexistent/disk.raw,id=data"], "/nonexistent/disk.raw")?;
    refused(snap, &["--fs", "tag=x,socket=/nonexistent"], "device 'fs0' is given on the command line but is not in")?;
    refused(snap, &["--fs", &format!("tag={TAG},socket=/nonexistent,id={TAG}")], "/nonexistent")?;
    Ok(())
}

/// virtiofsd serving `dir` on `socket` with `--cache=CACHE`; a destination
/// takes a saved state and makes inodes it cannot open again errors for
/// the guest (instead of failing the restore).
fn virtiofsd(dir: &Path, socket: &Path, log: &Path, cache: &str) -> Result<Daemon> {
    let cache = format!("--cache={cache}");
    virtiofsd_with(dir, socket, log, &[&cache, "--migration-on-error=guest-error"])
}

/// The share after the restore: the file opened before reads through its
/// old descriptor, new writes go both ways; prints what the guest gets
/// from the file deleted while open.
fn check_share(g: &Guest, share: &Path) -> Result<()> {
    g.run("touch /tmp/go")?;
    let rc = poll("the readers of files opened before the snapshot", Duration::from_secs(30), || {
        let out = g.run("cat /tmp/kept.rc /tmp/gone.rc 2>/dev/null; true")?;
        Ok((out.lines().count() == 2).then_some(out))
    });
    let rc = match rc {
        Ok(rc) => rc,
        Err(e) => {
            let diag = g.exec(
                "ps; ls -la /tmp; timeout 5 cat /mnt/share/from-host-before; echo cat=$?; timeout 5 ls -la /mnt/share; \
                 echo ls=$?; grep -i virtio /proc/interrupts; for p in /proc/[0-9]*; do [ -e $p/fd/3 ] && ls -l $p/fd; done",
            );
            bail!("{e:#}\nguest: {diag:?}");
        }
    };
    let kept = g.run("cat /tmp/kept.out")?;
    let gone = g.run("cat /tmp/gone.out")?;
    println!("  share: the deleted-while-open file read through its old descriptor: exit {}, {gone:?}", field(&rc, 1));
    ensure!(
        field(&rc, 0) == "0" && kept.trim() == "kept-before",
        "the file opened before the snapshot: exit {rc:?}, {kept:?}"
    );
    g.run("echo guest-after > /mnt/share/from-guest-after")?;
    let got = fs::read_to_string(share.join("from-guest-after")).context("the guest's new file on the host")?;
    ensure!(got.trim() == "guest-after", "the host reads {got:?}");
    fs::write(share.join("from-host-after"), "host-after\n")?;
    let got = g.run("cat /mnt/share/from-host-after && ls /mnt/share | sort | tr '\\n' ' '")?;
    ensure!(got.starts_with("host-after"), "the guest reads {got:?}");
    println!("  share after the restore: {}", got.replace('\n', " | "));
    Ok(())
}

fn check_restored(g: &Guest, api: &Client, before: &Before, image: &Path) -> Result<()> {
    let t = Instant::now();
    let out = poll("the guest's server over a new vsock connection", Duration::from_secs(60), || {
        guest_exec(&g.vsock, GUEST_PORT, "echo back").map(Some)
    });
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let c0 = api.counters()?;
            std::thread::sleep(Duration::from_secs(1));
            let c1 = api.counters()?;
            let c = vcpu_seconds(g.vm.pid())?;
            std::thread::sleep(Duration::from_secs(2));
            let c2 = vcpu_seconds(g.vm.pid())?;
            bail!("{e:#}\n  counters: {c0:?}\n  a second later: {c1:?}\n  vCPU CPU seconds over 2 s: {:.2}", c2 - c);
        }
    };
    ensure!(out.output.trim() == "back", "exec after restore: {out:?}");
    println!("  the guest answers exec {} ms after the restore began", t.elapsed().as_millis());
    let info = api.info()?;
    ensure!(info.state == VmState::Running && info.cpus.present == 2, "info: {info:?}");
    let c1 = counter(g)?;
    std::thread::sleep(Duration::from_secs(1));
    let c2 = counter(g)?;
    println!("  counter: {} at the snapshot, {c1} after the restore, {c2} a second later", before.count);
    ensure!(c1 >= before.count, "the counter went back: {} -> {c1}", before.count);
    ensure!(c2 > c1, "the counter does not run after the restore");
    let marker = g.run("cat /tmp/marker")?;
    ensure!(marker == before.marker, "guest memory changed: {marker:?} vs {:?}", before.marker);
    let dev = &before.dev;
    let read = g.run(&format!("dd if=/dev/{dev} bs=1M count=1 iflag=direct 2>/dev/null | sha256sum"))?;
    ensure!(read.split_whitespace().next() == Some(&before.disk_sha), "the disk's data changed");
    let out = g.run(&format!(
        "dd if=/dev/urandom of=/tmp/q.bin bs=1M count=1 2>/dev/null && dd if=/tmp/q.bin of=/dev/{dev} bs=1M seek=1 oflag=direct 2>/dev/null && sha256sum /tmp/q.bin"
    ))?;
    let mut second = fs::read(image)?;
    second.drain(..MIB as usize);
    second.truncate(MIB as usize);
    ensure!(Some(sha256(&second).as_str()) == out.split_whitespace().next(), "the host does not see the new write");
    let ping = g.exec(&format!("ping -c 2 -W 5 {HOST0}"))?.output;
    if !ping.contains("2 packets received") {
        let snmp0 = g.run("cat /proc/net/snmp | grep -e Ip: -e Icmp: ; grep virtio /proc/interrupts")?;
        let ping2 = g.exec(&format!("sleep 3; ping -c 3 -W 5 {HOST0}"))?.output;
        let guest = g.run("cat /proc/net/snmp | grep -e Ip: -e Icmp: ; grep virtio /proc/interrupts; cat /proc/net/dev; ip neigh; ip addr")?;
        let guest = format!("{snmp0}\nsecond ping: {ping2}\n{guest}");
        let mut host = String::new();
        for cmd in [&["-s", "link", "show"][..], &["neigh"], &["addr"]] {
            host.push_str(&skiff_tests::fixture::host("ip", cmd).unwrap_or_default());
        }
        host.push_str(&skiff_tests::fixture::host("bridge", &["link"]).unwrap_or_default());
        let c = api.counters()?;
        bail!("ping on {} after the restore: {ping}\nguest: {guest}\nhost: {host}\ncounters: {c:?}", before.eth);
    }
    let dmesg = g.run("dmesg | grep -i -e vsock -e 'clocksource' -e watchdog | tail -5; true")?;
    println!("  guest dmesg after restore:\n{dmesg}");
    Ok(())
}

#[test]
#[ignore = "boots a guest: needs hardware KVM and root; run through tests/run"]
fn snapshot_and_restore() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "needs root (bridges, taps): run through tests/run");
    let dir = scratch()?;
    let d = dir.path();
    let net = Network::setup(d, HOST0, HOST1)?;
    let (vsock, api_sock, image) = (d.join("v.sock"), d.join("api.sock"), d.join("disk.raw"));
    fs::File::create(&image)?.set_len(32 * MIB)?;
    let share = d.join("share");
    fs::create_dir(&share)?;
    fs::write(share.join("from-host-before"), "host-before\n")?;
    let fsd = virtiofsd(&share, &d.join("fs.sock"), &d.join("virtiofsd.log"), "never")?;
    let spec = VmSpec {
        kernel: artifact("vmlinux")?,
        initramfs: Some(artifact("devices-test.cpio")?),
        cmdline: "console=ttyS0 reboot=k panic=-1 quiet".into(),
        cpus: 2,
        memory_mib: 256,
        api_socket: Some(api_sock.clone()),
    };
    let devices = [
        "--disk".into(),
        format!("path={},serial={SERIAL},id=data", image.display()),
        "--net".into(),
        format!("tap={},mac={MAC},id=lan", net.tap0),
        "--vsock".into(),
        format!("cid=3,socket={}", vsock.display()),
    ];
    let t = Instant::now();
    let mut vm = RunningVm::start_with(&spec, &devices)?;
    vm.wait_for_serial("serving on vsock port", BOOT_TIMEOUT)?;
    println!("booted in {:.1} s", t.elapsed().as_secs_f64());
    let g = Guest { vm, vsock: vsock.clone() };
    let api = Client::new(&api_sock).with_timeout(Duration::from_secs(120));
    let before = prepare(&g, &api)?;
    // A snapshot without the share: restored onto a private mapping.
    let snap0 = d.join("snap0");
    api.snapshot(&snap0)?;
    api.resume()?;
    api.add_fs(&FsSpec { id: Some(TAG.into()), tag: TAG.into(), socket: d.join("fs.sock") })?;
    let share_out = poll("the hot-plugged share mounted", Duration::from_secs(60), || {
        let out = g.exec(KEPT_READERS)?;
        Ok((out.code == 0).then_some(out.output))
    })?;
    ensure!(share_out.trim() == "host-before", "the share before the snapshot: {share_out:?}");
    api.pause()?;

    let snap = d.join("snap");
    let mut checks = Checks::default();
    checks.run("vm.snapshot refuses a running VM", || {
        api.resume()?;
        let e = api.snapshot(&snap).err().context("a running VM was snapshotted")?;
        ensure!(e.to_string().contains("pause it"), "{e}");
        api.pause()?;
        Ok(())
    });
    let t = Instant::now();
    let saved = api.snapshot(&snap)?;
    println!(
        "snapshot: {} ms in the VMM ({} ms with the request), state {} KiB, {} MiB of memory written",
        saved.elapsed_ms,
        t.elapsed().as_millis(),
        saved.state_bytes >> 10,
        saved.memory_bytes >> 20
    );
    ensure!(fs::metadata(snap.join("memory"))?.len() == 256 * MIB, "the memory file is not the guest's size");
    checks.run("the saved VM goes on after the snapshot", || {
        ensure!(api.info()?.state == VmState::Paused, "vm.snapshot resumed the VM");
        api.resume()?;
        let c = counter(&g)?;
        std::thread::sleep(Duration::from_millis(500));
        ensure!(counter(&g)? > c, "the counter does not run after vm.snapshot and vm.resume");
        Ok(())
    });
    let old = g.vm.report();
    g.vm.signal(libc::SIGKILL)?;
    drop(g);
    drop(fsd);
    checks.run("bad snapshots are refused", || check_bad_snapshots(d, &snap));

    // A fresh virtiofsd for the same directory, on another socket.
    let fs_log = d.join("virtiofsd2.log");
    let _fsd = virtiofsd(&share, &d.join("fs2.sock"), &fs_log, "never")?;
    let t = Instant::now();
    let extra = [
        "--api-socket".into(),
        api_sock.display().to_string(),
        "--fs".into(),
        format!("tag={TAG},socket={},id={TAG}", d.join("fs2.sock").display()),
    ];
    let vm = RunningVm::restore(&snap, &extra)?;
    let g = Guest { vm, vsock };
    checks.run("the restored guest goes on", || check_restored(&g, &api, &before, &image));
    checks.run("the share goes on", || check_share(&g, &share));
    println!("restore to all checks done: {:.1} s", t.elapsed().as_secs_f64());
    let log = fs::read_to_string(&fs_log).unwrap_or_default();
    let log: Vec<&str> = log.lines().take(40).collect();
    println!("--- the restore's virtiofsd log ---\n{}", log.join("\n"));

    api.power_off()?;
    let out = g.vm.wait(Duration::from_secs(60))?;
    println!("--- restored skiff-vmm stderr ---\n{}", out.stderr);
    if !checks.failed.is_empty() {
        println!("--- first VMM ---\n{old}\n--- restored serial ---\n{}", out.serial);
        bail!("{} check(s) failed:\n  {}", checks.failed.len(), checks.failed.join("\n  "));
    }
    ensure!(out.status.code() == Some(0), "power-off should end the restored VMM with 0, got {}", out.status);

    // The snapshot taken before the share was added: a private mapping of
    // the memory file, on which a share cannot be added.
    let t = Instant::now();
    let extra = ["--api-socket".into(), api_sock.display().to_string()];
    let g = Guest { vm: RunningVm::restore(&snap0, &extra)?, vsock: g.vsock };
    let private = check_private(&g, &api, &before, t);
    api.power_off()?;
    let out = g.vm.wait(Duration::from_secs(60))?;
    if let Err(e) = private {
        bail!("the restore without a share: {e:#}\n{}\n{}", out.stderr, out.serial);
    }
    Ok(())
}

/// The VM restored from the snapshot without a share goes on; `vm.add-fs`
/// is refused (virtiofsd cannot map a private mapping's pages).
fn check_private(g: &Guest, api: &Client, before: &Before, t: Instant) -> Result<()> {
    let out = poll("exec after the restore without a share", Duration::from_secs(60), || {
        guest_exec(&g.vsock, GUEST_PORT, "echo back").map(Some)
    })?;
    ensure!(out.output.trim() == "back", "{out:?}");
    println!(
        "  restored without a share (private mapping): exec answers {} ms after the restore began",
        t.elapsed().as_millis()
    );
    let c = counter(g)?;
    ensure!(c >= before.count, "the counter went back: {} -> {c}", before.count);
    ensure!(g.run("cat /tmp/marker")? == before.marker, "guest memory changed");
    let e = api.add_fs(&FsSpec { id: None, tag: "late".into(), socket: "/nonexistent".into() }).err();
    let e = e.context("a share was added to a VM on a private mapping")?.to_string();
    ensure!(e.contains("private mapping"), "{e}");
    Ok(())
}

// ---- A thin VM: the agent, the VM generation ID, clones with new MACs ----

const THIN_HOST0: Ipv4Addr = Ipv4Addr::new(10, 78, 11, 1);
const THIN_HOST1: Ipv4Addr = Ipv4Addr::new(10, 78, 12, 1);
const THIN_MAC: &str = "52:54:00:78:11:02";
const CLONE_MACS: [&str; 2] = ["52:54:00:78:11:0a", "52:54:00:78:11:0b"];
/// How long the snapshot waits before its clones start: their clocks lag
/// by this much until the agent sets them.
const SAVED_FOR: Duration = Duration::from_secs(6);

/// `sh -c script` in the guest; its stdout, or an error unless it exits 0.
async fn sh(agent: &AgentClient, script: &str) -> Result<String> {
    let req = ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() };
    let out = agent.exec_output(req, None).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == 0,
        "{script}: exit {:?}: {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// How far the guest's wall clock is from this host's, in seconds.
async fn clock_skew(agent: &AgentClient) -> Result<f64> {
    let before = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let out = sh(agent, "adjtimex").await?;
    let after = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let value =
        |key: &str| out.lines().find_map(|l| l.trim().strip_prefix(key)).and_then(|v| v.trim().parse::<f64>().ok());
    let (Some(sec), Some(usec)) = (value("time.tv_sec:"), value("time.tv_usec:")) else {
        bail!("adjtimex: {out}");
    };
    Ok(sec + usec / 1e6 - (before + after) / 2.0)
}

fn generation_ids(report: &str) -> Option<(String, String)> {
    let line = report.lines().find(|l| l.contains("VM generation ID "))?;
    let rest = line.split("VM generation ID ").nth(1)?;
    let (new, old) = rest.split_once(" (was ")?;
    Some((new.to_string(), old.trim_end_matches(')').to_string()))
}

/// A tap on `bridge`, deleted on drop.
struct Tap(String);

impl Tap {
    fn new(name: String, bridge: &str) -> Result<Self> {
        skiff_tests::fixture::host("ip", &["tuntap", "add", &name, "mode", "tap"])?;
        let tap = Tap(name);
        skiff_tests::fixture::host("ip", &["link", "set", &tap.0, "master", bridge, "up"])?;
        Ok(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).stderr(Stdio::null()).status();
    }
}

/// One clone: its VMM, virtiofsd, agent and tap.
struct Clone {
    vm: RunningVm,
    agent: AgentClient,
    _fsd: Daemon,
    _tap: Tap,
}

fn start_clone(d: &Path, snap: &Path, rootfs: &Path, i: usize, bridge: &str) -> Result<Clone> {
    let dir = d.join(format!("clone{i}"));
    fs::create_dir_all(&dir)?;
    let tap = Tap::new(format!("{bridge}c{i}"), bridge)?;
    // As skiff-run starts the booted VM's.
    let fsd = virtiofsd(rootfs, &dir.join("fs.sock"), &dir.join("virtiofsd.log"), "auto")?;
    let vsock = dir.join("v.sock");
    let extra = [
        "--fs".into(),
        format!("tag=rootfs,socket={}", dir.join("fs.sock").display()),
        "--vsock".into(),
        format!("cid=3,socket={}", vsock.display()),
        "--net".into(),
        format!("tap={},mac={}", tap.0, CLONE_MACS[i]),
    ];
    let vm = RunningVm::restore(snap, &extra)?;
    let timeouts = Timeouts { connect: Duration::from_secs(60), request: Duration::from_secs(120), exec: None };
    let agent = AgentClient::new(Transport::vsock(&vsock)).with_timeouts(timeouts);
    Ok(Clone { vm, agent, _fsd: fsd, _tap: tap })
}

/// A clone after the restore: answers exec (how soon), its clock was set,
/// it got a new generation ID and reseeded, it takes its new MAC and a
/// lease. Returns its address.
async fn check_clone(c: &Clone, i: usize, started: Instant, old_ip: &str) -> Result<String> {
    let out = poll_async("the clone's agent", Duration::from_secs(120), || async {
        Ok(sh(&c.agent, "echo back").await.ok())
    })
    .await?;
    ensure!(out.trim() == "back");
    println!("  clone {i}: the agent answers exec {} ms after the restores began", started.elapsed().as_millis());
    let skew = clock_skew(&c.agent).await?;
    let serial = c.vm.serial();
    let set = serial.lines().find(|l| l.contains("clock set to the host's")).unwrap_or("(no clock line)");
    println!("  clone {i}: clock {skew:+.3} s from the host's; the agent said: {set}");
    ensure!(skew.abs() < 1.0, "the clone's clock is {skew:+.3} s off");
    ensure!(set.contains("behind"), "the agent did not set the clock: {set}");
    let (new, old) = generation_ids(&c.vm.report()).context("no 'VM generation ID' in the VMM's log")?;
    ensure!(new != old && !old.is_empty(), "generation ID {new} (was {old})");
    let dmesg = poll_async("the guest's reseed", Duration::from_secs(30), || async {
        let d = sh(&c.agent, "dmesg | grep -e 'virtual machine fork' ; true").await?;
        Ok((!d.trim().is_empty()).then_some(d))
    })
    .await?;
    println!("  clone {i}: generation ID {new} (was {old}); guest: {}", dmesg.trim());
    c.agent.set_mac(None, CLONE_MACS[i]).await?;
    let dhcp = NetworkConfig { addressing: Addressing::Dhcp, ..Default::default() };
    c.agent.configure_network(dhcp).await?;
    let link = sh(&c.agent, "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0").await?;
    ensure!(link.starts_with(CLONE_MACS[i]), "eth0 after set_mac: {link}");
    let ip = link.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap_or_default();
    let ip = ip.split('/').next().unwrap_or_default().to_string();
    ensure!(ip.starts_with("10.78.11.") && ip != old_ip, "the clone's lease: {link}");
    let ping = sh(&c.agent, &format!("ping -c 1 -W 5 {THIN_HOST0}")).await?;
    ensure!(ping.contains("1 packets received"), "{ping}");
    Ok(ip)
}

async fn poll_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let t = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        ensure!(t.elapsed() < timeout, "{what}: nothing within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A thin VM (the project's kernel, the agent as init, its root on
/// virtio-fs, a NIC) is snapshotted; two clones are restored from the one
/// snapshot at once, each with its own virtiofsd, tap and MAC, after the
/// snapshot waited [`SAVED_FOR`]: both answer exec, their clocks are right
/// within a second (the agent set them from the host's hello), each got a
/// new VM generation ID and the guest reseeded its RNG, each takes its new
/// MAC and its own DHCP lease, and pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a guest: needs hardware KVM and root; run through tests/run"]
async fn thin_clones_from_one_snapshot() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "needs root (bridges, taps): run through tests/run");
    let dir = scratch()?;
    let d = dir.path();
    let net = Network::setup(d, THIN_HOST0, THIN_HOST1)?;
    let rootfs = d.join("rootfs");
    make_rootfs(&rootfs)?;
    let path = artifact("skiff-vmlinux")?;
    let kernel = Kernel { version: kernel_version(&path)?, path, needs_modules: false, origin: KernelOrigin::Explicit };
    let initrd = initramfs::ensure(&initramfs::find_agent(None)?, &kernel, Path::new("/"), &d.join("cache"))?;
    let opts = VmOptions {
        name: "snapthin".into(),
        runtime_root: d.join("run"),
        rootfs: rootfs.clone(),
        shares: vec![],
        kernel,
        initramfs: initrd,
        cpus: 1,
        memory_mib: 256,
        hostname: Some("snapthin".into()),
        vmm: vmm_binary()?,
        virtiofsd: vm::find_virtiofsd()?,
        boot_timeout: THIN_BOOT_TIMEOUT,
        bundle: rootfs.display().to_string(),
    };
    let extras = VmExtras { nic: Some(Nic { tap: net.tap0.clone(), mac: THIN_MAC.into() }), ..Default::default() };
    let t = Instant::now();
    let mut thin = ThinVm::boot_with(&opts, &extras).await.context("booting the thin VM")?;
    println!("thin VM booted in {:.1} s", t.elapsed().as_secs_f64());
    let agent =
        thin.agent_with(Timeouts { connect: Duration::from_secs(60), request: Duration::from_secs(120), exec: None });
    let mut checks = Checks::default();
    let dhcp = NetworkConfig { addressing: Addressing::Dhcp, ..Default::default() };
    agent.configure_network(dhcp).await?;
    let link = sh(&agent, "ip -4 -o addr show eth0").await?;
    let old_ip = link.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap_or_default();
    let old_ip = old_ip.split('/').next().unwrap_or_default().to_string();
    println!("  booted VM's lease: {old_ip}");
    let acpi = sh(&agent, "ls /sys/bus/acpi/drivers/vmgenid/; true").await?;
    checks.run("the guest's vmgenid driver bound the VM generation ID device", || {
        ensure!(acpi.contains("VMGENCTR:00"), "/sys/bus/acpi/drivers/vmgenid: {acpi:?}");
        Ok(())
    });
    let api = Client::new(thin.runtime_dir().join(VMM_API_SOCKET)).with_timeout(Duration::from_secs(120));
    api.pause()?;
    let snap = d.join("snap");
    let saved = api.snapshot(&snap)?;
    println!("  snapshot: {} ms in the VMM, {} MiB of memory", saved.elapsed_ms, saved.memory_bytes >> 20);
    thin.kill_vmm();
    let _ = thin.shutdown(Duration::from_secs(10)).await;
    tokio::time::sleep(SAVED_FOR).await;

    let started = Instant::now();
    let clones = [start_clone(d, &snap, &rootfs, 0, &net.br0)?, start_clone(d, &snap, &rootfs, 1, &net.br0)?];
    let (a, b) =
        tokio::join!(check_clone(&clones[0], 0, started, &old_ip), check_clone(&clones[1], 1, started, &old_ip));
    let mut ips = Vec::new();
    for (i, r) in [a, b].into_iter().enumerate() {
        checks.run(&format!("clone {i}"), || r.map(|ip| ips.push(ip)));
    }
    checks.run("the clones have their own leases and generation IDs", || {
        ensure!(ips.len() < 2 || ips[0] != ips[1], "both clones leased {}", ips[0]);
        let ids: Vec<_> = clones.iter().filter_map(|c| generation_ids(&c.vm.report()).map(|(n, _)| n)).collect();
        ensure!(ids.len() < 2 || ids[0] != ids[1], "both clones got generation ID {}", ids[0]);
        Ok(())
    });
    if !checks.failed.is_empty() {
        for (i, c) in clones.iter().enumerate() {
            println!("--- clone {i} ---\n{}", c.vm.report());
        }
        bail!("{} check(s) failed:\n  {}", checks.failed.len(), checks.failed.join("\n  "));
    }
    Ok(())
}
