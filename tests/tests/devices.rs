//! Issue 3's device tests: ONE guest boots with every virtio device skiff-vmm
//! has (two raw disks, two qcow2 overlays sharing one base image, two NICs, vsock, two virtio-fs shares served by a real
//! virtiofsd, rng, console) and the test checks each of them from both
//! sides. The guest is Debian's cloud kernel with the initramfs of
//! `tests/guest/devices-init.sh`: it loads the virtio modules, lists the PCI
//! devices on the serial console and serves `skiff-guest-tools` on vsock
//! port 1024, through which the test runs guest commands (`EXEC`) and moves
//! data. Each check runs even when an earlier one failed; the test fails at
//! the end listing every failed check.
//!
//! Needs root (bridges, taps, dnsmasq, virtiofsd): it runs inside the KVM box
//! through `tests/run`, like the boot tests.

use std::fs;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_guest_tools::{hash_to_eof, read_line, recv_framed, send_framed};
use skiff_tests::fixture::{
    disk_by_serial, field, host, iface_by_mac, random_bytes, sha256, virtiofsd, Checks, Guest, Network, GUEST_PORT,
};
use skiff_tests::{artifact, guest_values, scratch, vsock_connect, RunningVm, VmSpec};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;
/// Each way, host- and guest-initiated (issue 3: 64 MiB with matching sha256).
const VSOCK_BULK: u64 = 64 * MIB;
/// Over the tap, each way (issue 3: 16 MiB).
const NET_BULK: u64 = 16 * MIB;
const VSOCK_CONNS: usize = 16;
const RW_DISK: u64 = 64 * MIB;
const RO_DISK: u64 = 8 * MIB;
/// The raw base both qcow2 overlays share.
const QCOW2_DISK: u64 = 16 * MIB;
/// Where the guest writes into the first overlay: 3 MiB from 1 MiB + 4 KiB
/// (partial clusters at both ends, so copy-on-write from the base).
const QCOW2_WRITE_AT: u64 = MIB + 4096;
const QCOW2_WRITE_LEN: u64 = 3 * MIB;
const MAC0: &str = "52:54:00:77:07:02";
const MAC1: &str = "52:54:00:77:08:02";
const HOST0: Ipv4Addr = Ipv4Addr::new(10, 77, 7, 1);
const HOST1: Ipv4Addr = Ipv4Addr::new(10, 77, 8, 1);
const GUEST1: &str = "10.77.8.2";

/// The host side of guest-initiated vsock connections: Unix listeners at
/// `<vsock socket>_<port>` (Firecracker's hybrid model).
struct HostVsock {
    /// Most echo connections open at the same time.
    echo_peak: Arc<AtomicUsize>,
    /// `(computed, announced, n)` of the framed transfer the guest sent.
    received: Arc<Mutex<Option<(String, String, u64)>>>,
    /// `(sha256 sent, guest's answer)` of the framed transfer the host sent.
    sent: Arc<Mutex<Option<(String, String)>>>,
    _threads: Vec<JoinHandle<()>>,
}

const ECHO_PORT: u32 = 6000;
const RECV_PORT: u32 = 6001;
const SEND_PORT: u32 = 6002;

impl HostVsock {
    fn listen(vsock: &Path) -> Result<Self> {
        let at = |port: u32| UnixListener::bind(format!("{}_{port}", vsock.display()));
        let (echo, recv, send) = (at(ECHO_PORT)?, at(RECV_PORT)?, at(SEND_PORT)?);
        let echo_peak = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(None));
        let sent = Arc::new(Mutex::new(None));
        let live = Arc::new(AtomicUsize::new(0));
        let peak = echo_peak.clone();
        let t_echo = std::thread::spawn(move || {
            for conn in echo.incoming().flatten() {
                let (live, peak) = (live.clone(), peak.clone());
                std::thread::spawn(move || {
                    let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let _ = echo_one(conn);
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let r = received.clone();
        let t_recv = std::thread::spawn(move || {
            if let Ok((conn, _)) = recv.accept() {
                let mut w = conn.try_clone().expect("clone");
                let mut rd = BufReader::new(conn);
                if let Ok((sha, announced, n)) = recv_framed(&mut rd) {
                    let _ = writeln!(w, "{sha} {n}");
                    *r.lock().unwrap() = Some((sha, announced, n));
                }
            }
        });
        let s = sent.clone();
        let t_send = std::thread::spawn(move || {
            if let Ok((conn, _)) = send.accept() {
                let mut rd = BufReader::new(conn.try_clone().expect("clone"));
                let mut w = conn;
                if let Ok(sha) = send_framed(&mut w, VSOCK_BULK) {
                    let answer = read_line(&mut rd).unwrap_or_default();
                    *s.lock().unwrap() = Some((sha, answer));
                }
            }
        });
        Ok(Self { echo_peak, received, sent, _threads: vec![t_echo, t_recv, t_send] })
    }
}

fn echo_one(conn: UnixStream) -> Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    ensure!(read_line(&mut r)? == "ECHO", "expected ECHO");
    std::io::copy(&mut r, &mut w)?;
    w.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// The host-side files the test prepares and later inspects.
struct Fixture {
    rw: PathBuf,
    ro: PathBuf,
    share1: PathBuf,
    share2: PathBuf,
    /// sha256 of the first MiB of the rw disk (written by the host).
    rw_head_sha: String,
    ro_sha: String,
    big_sha: String,
    /// The raw base, its two qcow2 overlays, and the base's bytes.
    qbase: PathBuf,
    qa: PathBuf,
    qb: PathBuf,
    qbase_data: Vec<u8>,
}

/// Runs a qemu-utils program (the box has the host's).
fn qemu_tool(tool: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(tool).args(args).output().with_context(|| format!("run {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn prepare(dir: &Path) -> Result<Fixture> {
    let rw = dir.join("rw.raw");
    let head = random_bytes(MIB as usize);
    let mut f = fs::File::create(&rw)?;
    f.write_all(&head)?;
    f.set_len(RW_DISK)?;
    let ro = dir.join("ro.raw");
    let ro_data = random_bytes(RO_DISK as usize);
    fs::write(&ro, &ro_data)?;

    let share1 = dir.join("share1");
    let share2 = dir.join("share2");
    fs::create_dir_all(share1.join("sub"))?;
    fs::create_dir_all(&share2)?;
    let hello = share1.join("hello.txt");
    fs::write(&hello, "hello from the host\n")?;
    fs::set_permissions(&hello, fs::Permissions::from_mode(0o640))?;
    std::os::unix::fs::chown(&hello, Some(1234), Some(2345))?;
    let script = share1.join("sub/run.sh");
    fs::write(&script, "#!/bin/sh\necho run\n")?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    let big = random_bytes(4 * MIB as usize);
    fs::write(share1.join("big.bin"), &big)?;
    fs::write(share2.join("only-in-share2.txt"), "second share\n")?;
    let qbase = dir.join("qbase.raw");
    let qbase_data = random_bytes(QCOW2_DISK as usize);
    fs::write(&qbase, &qbase_data)?;
    let (qa, qb) = (dir.join("qa.qcow2"), dir.join("qb.qcow2"));
    for q in [&qa, &qb] {
        // The backing name is relative: resolved next to the overlay.
        qemu_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", "qbase.raw", "-F", "raw", &q.display().to_string()],
        )?;
    }
    Ok(Fixture {
        rw,
        ro,
        share1,
        share2,
        rw_head_sha: sha256(&head),
        ro_sha: sha256(&ro_data),
        big_sha: sha256(&big),
        qbase,
        qa,
        qb,
        qbase_data,
    })
}

fn check_pci(serial: &str, g: &Guest) -> Result<()> {
    // (PCI device ID, virtio driver, how many)
    let want = [
        ("0x1042", "virtio_blk", 4),
        ("0x1041", "virtio_net", 2),
        ("0x1053", "vmw_vsock_virtio_transport", 1),
        ("0x105a", "virtiofs", 2),
        ("0x1044", "virtio_rng", 1),
        ("0x1043", "virtio_console", 1),
    ];
    let pci = guest_values(serial, "PCI");
    println!("guest PCI devices (address vendor device driver MSI-vectors):\n  {}", pci.join("\n  "));
    for (id, _, n) in want {
        let found: Vec<&String> = pci.iter().filter(|l| field(l, 1) == "0x1af4" && field(l, 2) == id).collect();
        ensure!(found.len() == n, "{n} virtio device(s) {id} expected on PCI, found {}", found.len());
        for l in found {
            ensure!(field(l, 3) == "virtio-pci", "{l}: not bound to virtio-pci");
            let vectors: u32 = field(l, 4).parse().unwrap_or(0);
            ensure!(vectors >= 2, "{l}: {vectors} MSI-X vectors (config + queues expected)");
        }
    }
    ensure!(pci.iter().any(|l| field(l, 0) == "0000:00:00.0"), "no host bridge at 00:00.0");
    // Each virtio device has its class driver bound (virtio bus, device ID in decimal).
    let bound = g.run(
        "for d in /sys/bus/virtio/devices/*; do echo \"$(cat $d/device) $(basename $(readlink $d/driver))\"; done",
    )?;
    for (id, driver, n) in want {
        let count = bound.lines().filter(|l| l.ends_with(&format!(" {driver}"))).count();
        ensure!(count == n, "{n} device(s) bound to {driver} expected ({id}), found {count}:\n{bound}");
    }
    Ok(())
}

fn check_rng(g: &Guest) -> Result<()> {
    let current = g.run("cat /sys/class/misc/hw_random/rng_current")?;
    ensure!(current.trim().starts_with("virtio_rng"), "hw_random uses {current:?}");
    let a = g.run("dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 -v | tr -d ' \\n'")?;
    let b = g.run("dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 -v | tr -d ' \\n'")?;
    ensure!(a.len() == 128 && b.len() == 128, "short reads from /dev/hwrng: {a:?} {b:?}");
    ensure!(a != b, "two reads of /dev/hwrng returned the same bytes");
    ensure!(a.chars().any(|c| c != '0'), "/dev/hwrng returned zeros");
    let n = g.run("dd if=/dev/hwrng bs=4096 count=1 iflag=fullblock 2>/dev/null | wc -c")?;
    ensure!(n.trim() == "4096", "4 KiB from /dev/hwrng gave {n:?} bytes");
    Ok(())
}

fn check_console(g: &Guest, file: &Path) -> Result<()> {
    let marker = format!("skiff-hvc0-{}", hex::encode(random_bytes(8)));
    g.run(&format!("echo {marker} > /dev/hvc0"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(file).unwrap_or_default();
        if text.contains(&marker) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "hvc0 output {marker} not in the console file: {text:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_blk(g: &Guest, fx: &Fixture) -> Result<()> {
    let rw = disk_by_serial(g, "skiff-rw-disk")?;
    let ro = disk_by_serial(g, "skiff-ro-disk")?;
    ensure!(rw != ro, "both disks are {rw}");
    let size: u64 = g.run(&format!("cat /sys/block/{rw}/size"))?.trim().parse()?;
    ensure!(size * 512 == RW_DISK, "{rw} has {size} sectors");
    let size: u64 = g.run(&format!("cat /sys/block/{ro}/size"))?.trim().parse()?;
    ensure!(size * 512 == RO_DISK, "{ro} has {size} sectors");
    // Flush is offered: the kernel then runs a write-back cache and sends
    // flushes on fsync.
    let cache = g.run(&format!("cat /sys/block/{rw}/queue/write_cache"))?;
    ensure!(cache.trim() == "write back", "{rw} write_cache is {cache:?}: no flush feature");

    // Reads: what the host wrote before boot.
    let head = g.run(&format!("dd if=/dev/{rw} bs=1M count=1 iflag=direct 2>/dev/null | sha256sum"))?;
    ensure!(field(&head, 0) == fx.rw_head_sha, "guest read {head:?} from the host's first MiB");
    let whole = g.run(&format!("dd if=/dev/{ro} bs=1M iflag=direct 2>/dev/null | sha256sum"))?;
    ensure!(field(&whole, 0) == fx.ro_sha, "guest read {whole:?} from the read-only disk");

    // Writes: 4 MiB at 8 MiB, flushed; the host reads them from the image.
    let out = g.run(&format!(
        "dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null && sha256sum /tmp/pattern && \
         dd if=/tmp/pattern of=/dev/{rw} bs=1M seek=8 oflag=direct conv=fsync 2>&1"
    ))?;
    let guest_sha = field(&out, 0).to_string();
    let mut img = fs::File::open(&fx.rw)?;
    img.seek(SeekFrom::Start(8 * MIB))?;
    let mut buf = vec![0u8; 4 * MIB as usize];
    img.read_exact(&mut buf)?;
    ensure!(sha256(&buf) == guest_sha, "the image holds {} where the guest wrote {guest_sha}", sha256(&buf));
    // And the guest reads its write back past the page cache.
    let back = g.run(&format!("dd if=/dev/{rw} bs=1M skip=8 count=4 iflag=direct 2>/dev/null | sha256sum"))?;
    ensure!(field(&back, 0) == guest_sha, "read back {back:?}, wrote {guest_sha}");

    // The read-only disk: flagged read-only, and a write fails.
    let flag = g.run(&format!("cat /sys/block/{ro}/ro"))?;
    ensure!(flag.trim() == "1", "/sys/block/{ro}/ro is {flag:?}");
    let w = g.exec(&format!("dd if=/dev/zero of=/dev/{ro} bs=4096 count=1 oflag=direct conv=fsync"))?;
    ensure!(w.code != 0, "writing the read-only disk succeeded: {}", w.output);
    ensure!(sha256(&fs::read(&fx.ro)?) == fx.ro_sha, "the read-only image changed");
    Ok(())
}

/// Two qcow2 overlays of one raw base: both read the base; a write to one
/// (copy-on-write of partial clusters) is read back from it and not seen
/// through the other; the base file is untouched.
/// Returns the sha256 of what the guest wrote into overlay a.
fn check_qcow2(g: &Guest, fx: &Fixture) -> Result<String> {
    let a = disk_by_serial(g, "skiff-qcow2-a")?;
    let b = disk_by_serial(g, "skiff-qcow2-b")?;
    for d in [&a, &b] {
        let size: u64 = g.run(&format!("cat /sys/block/{d}/size"))?.trim().parse()?;
        ensure!(size * 512 == QCOW2_DISK, "{d} has {size} sectors");
        let whole = g.run(&format!("dd if=/dev/{d} bs=1M iflag=direct 2>/dev/null | sha256sum"))?;
        ensure!(field(&whole, 0) == sha256(&fx.qbase_data), "{d} does not read as its base: {whole:?}");
    }
    let (blocks, skip) = (QCOW2_WRITE_LEN / 4096, QCOW2_WRITE_AT / 4096);
    let out = g.run(&format!(
        "dd if=/dev/urandom of=/tmp/qpattern bs=4096 count={blocks} 2>/dev/null && sha256sum /tmp/qpattern && \
         dd if=/tmp/qpattern of=/dev/{a} bs=4096 seek={skip} oflag=direct conv=fsync 2>&1"
    ))?;
    let wrote = field(&out, 0).to_string();
    let range =
        |d: &str| format!("dd if=/dev/{d} bs=4096 skip={skip} count={blocks} iflag=direct 2>/dev/null | sha256sum");
    let back = g.run(&range(&a))?;
    ensure!(field(&back, 0) == wrote, "overlay a reads back {back:?}, the guest wrote {wrote}");
    let base_range = &fx.qbase_data[QCOW2_WRITE_AT as usize..(QCOW2_WRITE_AT + QCOW2_WRITE_LEN) as usize];
    let other = g.run(&range(&b))?;
    ensure!(field(&other, 0) == sha256(base_range), "overlay b sees a's write: {other:?}");
    ensure!(sha256(&fs::read(&fx.qbase)?) == sha256(&fx.qbase_data), "the shared base image changed");
    Ok(wrote)
}

/// After the VM ends: qemu-img finds both overlays clean, b still equals
/// the base, and a holds the guest's write where it wrote it.
fn check_qcow2_after(fx: &Fixture, d: &Path, wrote: Option<&str>) -> Result<()> {
    let p = |p: &Path| p.display().to_string();
    for q in [&fx.qa, &fx.qb] {
        qemu_tool("qemu-img", &["check", "-q", &p(q)])?;
    }
    qemu_tool("qemu-img", &["compare", "-q", "-f", "qcow2", "-F", "raw", &p(&fx.qb), &p(&fx.qbase)])?;
    let flat = d.join("qa-flat.raw");
    qemu_tool("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &p(&fx.qa), &p(&flat)])?;
    let got = fs::read(&flat)?;
    ensure!(got.len() as u64 == QCOW2_DISK, "overlay a converts to {} bytes", got.len());
    let (at, end) = (QCOW2_WRITE_AT as usize, (QCOW2_WRITE_AT + QCOW2_WRITE_LEN) as usize);
    ensure!(
        got[..at] == fx.qbase_data[..at] && got[end..] == fx.qbase_data[end..],
        "overlay a changed outside the write"
    );
    let wrote = wrote.context("the guest's write into overlay a failed")?;
    ensure!(sha256(&got[at..end]) == wrote, "overlay a holds {} where the guest wrote {wrote}", sha256(&got[at..end]));
    Ok(())
}

fn check_fs(g: &Guest, fx: &Fixture) -> Result<()> {
    g.run("mkdir -p /mnt/s1 /mnt/s2 && mount -t virtiofs share1 /mnt/s1 && mount -t virtiofs share2 /mnt/s2")?;
    let mounts = g.run("grep virtiofs /proc/mounts")?;
    ensure!(mounts.contains("share1 /mnt/s1") && mounts.contains("share2 /mnt/s2"), "mounts: {mounts}");
    // Host-written files, with their modes and owners.
    ensure!(g.run("cat /mnt/s1/hello.txt")? == "hello from the host\n", "hello.txt differs");
    let st = g.run("stat -c '%a %u %g' /mnt/s1/hello.txt /mnt/s1/sub/run.sh")?;
    ensure!(st == "640 1234 2345\n755 0 0\n", "guest sees modes/owners {st:?}");
    ensure!(g.run("/mnt/s1/sub/run.sh")? == "run\n", "executable on the share did not run");
    let big = g.run("sha256sum /mnt/s1/big.bin")?;
    ensure!(field(&big, 0) == fx.big_sha, "big.bin reads as {big:?}");
    let ls = g.run("ls /mnt/s2")?;
    ensure!(ls == "only-in-share2.txt\n", "share2 lists {ls:?}");
    // Guest-written files, with their modes and owners, seen by the host.
    let out = g.run(
        "echo written by the guest > /mnt/s1/from-guest.txt && chmod 600 /mnt/s1/from-guest.txt && \
         chown 4321:4322 /mnt/s1/from-guest.txt && mkdir /mnt/s1/gdir && chmod 751 /mnt/s1/gdir && \
         dd if=/dev/urandom of=/mnt/s2/guest.bin bs=1M count=2 2>/dev/null && sha256sum /mnt/s2/guest.bin && sync",
    )?;
    let f = fx.share1.join("from-guest.txt");
    ensure!(fs::read_to_string(&f)? == "written by the guest\n", "from-guest.txt differs on the host");
    let m = fs::metadata(&f)?;
    ensure!(
        (m.mode() & 0o7777, m.uid(), m.gid()) == (0o600, 4321, 4322),
        "host sees from-guest.txt as {:o} {}:{}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid()
    );
    let d = fs::metadata(fx.share1.join("gdir"))?;
    ensure!(d.is_dir() && d.mode() & 0o7777 == 0o751, "host sees gdir as {:o}", d.mode());
    let host_sha = sha256(&fs::read(fx.share2.join("guest.bin"))?);
    ensure!(field(&out, 0) == host_sha, "guest.bin: guest wrote {out:?}, host reads {host_sha}");
    ensure!(!fx.share1.join("guest.bin").exists(), "share2's file appeared in share1");
    // A file the host changes while mounted (cache=never) is seen fresh.
    fs::write(fx.share1.join("hello.txt"), "changed by the host\n")?;
    ensure!(g.run("cat /mnt/s1/hello.txt")? == "changed by the host\n", "host change not seen");
    Ok(())
}

/// Host → guest connections through the hybrid socket.
fn check_vsock_host_to_guest(g: &Guest) -> Result<()> {
    // 16 connections open at once, then each echoes 1 MiB concurrently.
    let mut conns = Vec::new();
    for i in 0..VSOCK_CONNS {
        let mut c = vsock_connect(&g.vsock, GUEST_PORT).with_context(|| format!("connection {i}"))?;
        writeln!(c.get_mut(), "ECHO")?;
        conns.push(c);
    }
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut r| {
            std::thread::spawn(move || -> Result<()> {
                let data = random_bytes(MIB as usize);
                let want = sha256(&data);
                let mut w = r.get_ref().try_clone()?;
                let writer = std::thread::spawn(move || -> std::io::Result<()> {
                    w.write_all(&data)?;
                    w.shutdown(std::net::Shutdown::Write)
                });
                let (got, n) = hash_to_eof(&mut r)?;
                writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
                ensure!(n == MIB && got == want, "echoed {n} bytes, sha256 {got}, sent {want}");
                Ok(())
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?.with_context(|| format!("connection {i}"))?;
    }
    // 64 MiB host → guest.
    let t = Instant::now();
    let mut c = vsock_connect(&g.vsock, GUEST_PORT)?;
    writeln!(c.get_mut(), "RECV")?;
    let mut w = c.get_ref().try_clone()?;
    let sha = send_framed(&mut w, VSOCK_BULK)?;
    let answer = read_line(&mut c)?;
    ensure!(answer == format!("{sha} {VSOCK_BULK}"), "guest received {answer:?}, host sent {sha}");
    println!("vsock host→guest {VSOCK_BULK} bytes in {:.1} s", t.elapsed().as_secs_f64());
    // 64 MiB guest → host.
    let t = Instant::now();
    let mut c = vsock_connect(&g.vsock, GUEST_PORT)?;
    writeln!(c.get_mut(), "SEND {VSOCK_BULK}")?;
    let (got, announced, n) = recv_framed(&mut c)?;
    ensure!(n == VSOCK_BULK && got == announced, "host received {n} bytes {got}, guest sent {announced}");
    println!("vsock guest→host {VSOCK_BULK} bytes in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Guest → host connections (to `<socket>_<port>`).
fn check_vsock_guest_to_host(g: &Guest, hv: &HostVsock) -> Result<()> {
    let out = g.run(&format!("skiff-guest-tools echo-to cid:2:{ECHO_PORT} {VSOCK_CONNS} {MIB}"))?;
    println!("  {}", out.trim());
    let peak = hv.echo_peak.load(Ordering::SeqCst);
    ensure!(peak >= VSOCK_CONNS, "at most {peak} guest connections were open at once");
    let out = g.run(&format!("skiff-guest-tools send-to cid:2:{RECV_PORT} {VSOCK_BULK}"))?;
    println!("  {}", out.trim());
    let got = hv.received.lock().unwrap().clone().context("the host got no transfer")?;
    ensure!(got.2 == VSOCK_BULK && got.0 == got.1, "host received {} bytes {}, guest sent {}", got.2, got.0, got.1);
    let out = g.run(&format!("skiff-guest-tools recv-from cid:2:{SEND_PORT}"))?;
    println!("  {}", out.trim());
    let (sha, answer) = hv.sent.lock().unwrap().clone().context("the host sent nothing")?;
    ensure!(answer == format!("{sha} {VSOCK_BULK}"), "guest received {answer:?}, host sent {sha}");
    Ok(())
}

/// CPU time (user + system, in seconds) of process `pid`, all threads.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// With every device attached and the guest idle, skiff-vmm (vCPU and
/// device threads together) uses little CPU: nothing busy-polls.
fn check_idle(pid: u32) -> Result<()> {
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let used = (cpu_seconds(pid)? - c0) / t0.elapsed().as_secs_f64();
    println!("  idle guest: skiff-vmm used {:.1}% of a CPU", used * 100.0);
    ensure!(used < 0.25, "skiff-vmm used {:.0}% of a CPU with the guest idle", used * 100.0);
    Ok(())
}

/// Accepts one TCP connection on `addr` and runs `f` on it, in a thread.
fn tcp_once<T: Send + 'static>(
    addr: (Ipv4Addr, u16),
    f: impl FnOnce(std::net::TcpStream) -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let l = TcpListener::bind(addr)?;
    Ok(std::thread::spawn(move || {
        let (s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        f(s)
    }))
}

fn check_net(g: &Guest, net: &Network) -> Result<()> {
    // NIC 0: the pre-created tap on br0, address from dnsmasq.
    let t = Instant::now();
    let eth0 = iface_by_mac(g, MAC0)?;
    let dhcp = g.run(&format!("ip link set {eth0} up && udhcpc -i {eth0} -f -q -n -t 10 -T 2 -s /etc/udhcpc.sh"))?;
    let addr = g.run(&format!("ip -4 -o addr show dev {eth0}"))?;
    let ip = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .with_context(|| format!("no IPv4 address on {eth0}: {addr}\n{dhcp}"))?
        .to_string();
    let last: u8 = ip.strip_prefix("10.77.7.").and_then(|l| l.parse().ok()).unwrap_or(0);
    ensure!((100..=150).contains(&last), "{eth0} got {ip}, outside dnsmasq's range");
    let leases = fs::read_to_string(&net.leases).unwrap_or_default();
    ensure!(leases.contains(MAC0) && leases.contains(&ip), "dnsmasq has no lease for {MAC0} {ip}: {leases:?}");
    println!("  {eth0} got {ip} from dnsmasq ({:.1} s)", t.elapsed().as_secs_f64());
    let ping = g.run(&format!("ping -c 3 -W 5 {HOST0}"))?;
    ensure!(ping.contains("3 packets received"), "ping: {ping}");
    let t = Instant::now();

    // 16 MiB guest → host with busybox nc.
    let rx = tcp_once((HOST0, 7000), |mut s| hash_to_eof(&mut s).map_err(Into::into))?;
    let out = g.run(&format!(
        "dd if=/dev/urandom of=/tmp/net.bin bs=1M count={} 2>/dev/null && sha256sum /tmp/net.bin && nc {HOST0} 7000 < /tmp/net.bin",
        NET_BULK / MIB
    ))?;
    let (got, n) = rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    ensure!(n == NET_BULK && got == field(&out, 0), "host received {n} bytes {got}; guest sent {out:?}");
    println!("  {NET_BULK} bytes guest→host with nc ({:.1} s)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    // 16 MiB host → guest.
    let data = random_bytes(NET_BULK as usize);
    let want = sha256(&data);
    let tx = tcp_once((HOST0, 7001), move |mut s| {
        s.write_all(&data)?;
        Ok(())
    })?;
    let out =
        g.run(&format!("nc {HOST0} 7001 </dev/null > /tmp/in.bin; wc -c < /tmp/in.bin; sha256sum /tmp/in.bin"))?;
    tx.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    ensure!(
        field(&out, 0) == NET_BULK.to_string() && field(&out, 1) == want,
        "guest received {out:?}, host sent {want}"
    );
    println!("  {NET_BULK} bytes host→guest with nc ({:.1} s)", t.elapsed().as_secs_f64());

    // NIC 1: the tap skiff-vmm created (it did not exist), put on br1; static address.
    host("ip", &["link", "set", &net.tap1, "master", &net.br1])?;
    let eth1 = iface_by_mac(g, MAC1)?;
    let ping =
        g.run(&format!("ip addr add {GUEST1}/24 dev {eth1} && ip link set {eth1} up && ping -c 2 -W 5 {HOST1}"))?;
    ensure!(ping.contains("2 packets received"), "ping over {eth1}: {ping}");
    Ok(())
}

#[test]
#[ignore = "boots a guest: needs hardware KVM and root; run through tests/run"]
fn every_device_in_one_guest() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "needs root (bridges, taps, virtiofsd): run through tests/run");
    let dir = scratch()?;
    let d = dir.path();
    let fx = prepare(d)?;
    let _fsd1 = virtiofsd(&fx.share1, &d.join("fs1.sock"), &d.join("virtiofsd1.log"))?;
    let _fsd2 = virtiofsd(&fx.share2, &d.join("fs2.sock"), &d.join("virtiofsd2.log"))?;
    let net = Network::setup(d, HOST0, HOST1)?;
    let vsock = d.join("v.sock");
    let hv = HostVsock::listen(&vsock)?;
    let console = d.join("hvc0.log");

    let spec = VmSpec {
        kernel: artifact("vmlinux")?,
        initramfs: Some(artifact("devices-test.cpio")?),
        cmdline: "console=ttyS0 reboot=k panic=-1 quiet".into(),
        cpus: 2,
        memory_mib: 512,
        api_socket: None,
    };
    let p = |p: &Path| p.display().to_string();
    let args = [
        "--disk".into(),
        format!("path={},serial=skiff-rw-disk", p(&fx.rw)),
        "--disk".into(),
        format!("path={},readonly=on,serial=skiff-ro-disk", p(&fx.ro)),
        "--disk".into(),
        format!("path={},format=qcow2,serial=skiff-qcow2-a", p(&fx.qa)),
        "--disk".into(),
        format!("path={},format=qcow2,serial=skiff-qcow2-b", p(&fx.qb)),
        "--net".into(),
        format!("tap={},mac={MAC0}", net.tap0),
        "--net".into(),
        format!("tap={},mac={MAC1}", net.tap1),
        "--vsock".into(),
        format!("cid=3,socket={}", p(&vsock)),
        "--fs".into(),
        format!("tag=share1,socket={}", p(&d.join("fs1.sock"))),
        "--fs".into(),
        format!("tag=share2,socket={}", p(&d.join("fs2.sock"))),
        "--rng".into(),
        "--console".into(),
        format!("file={}", p(&console)),
    ];
    let t0 = Instant::now();
    let mut vm = RunningVm::start_with(&spec, &args)?;
    vm.wait_for_serial("serving on vsock port", BOOT_TIMEOUT)?;
    println!("guest ready after {:.1} s", t0.elapsed().as_secs_f64());
    let g = Guest { vm, vsock };
    let serial = g.vm.serial();

    let mut checks = Checks::default();
    checks.run("modules", || {
        let failed = guest_values(&serial, "INSMOD-FAILED");
        ensure!(failed.is_empty(), "insmod failed: {failed:?}");
        Ok(())
    });
    checks.run("pci", || check_pci(&serial, &g));
    checks.run("rng", || check_rng(&g));
    checks.run("console", || check_console(&g, &console));
    checks.run("blk", || check_blk(&g, &fx));
    let mut qcow2_wrote = None;
    checks.run("qcow2", || {
        qcow2_wrote = Some(check_qcow2(&g, &fx)?);
        Ok(())
    });
    checks.run("fs", || check_fs(&g, &fx));
    checks.run("vsock host to guest", || check_vsock_host_to_guest(&g));
    checks.run("vsock guest to host", || check_vsock_guest_to_host(&g, &hv));
    checks.run("net", || check_net(&g, &net));

    checks.run("idle", || check_idle(g.vm.pid()));

    // Power off from inside; the VMM must end cleanly with every device live.
    let _ = g.exec("umount /mnt/s1 /mnt/s2; sync; (sleep 1; poweroff -f) </dev/null >/dev/null 2>&1 &");
    let out = g.vm.wait(Duration::from_secs(60))?;
    println!("--- serial ({:?}) ---\n{}\n--- stderr ---\n{}", out.elapsed, out.serial, out.stderr);
    checks.run("poweroff", || {
        ensure!(out.status.code() == Some(0), "poweroff should end the VMM with 0, got {}", out.status);
        ensure!(out.stderr.contains("guest powered off"), "no poweroff message");
        ensure!(!out.stderr.contains("panicked"), "the VMM panicked");
        ensure!(sha256(&fs::read(&fx.ro)?) == fx.ro_sha, "the read-only image changed");
        Ok(())
    });
    checks.run("qcow2 after", || check_qcow2_after(&fx, d, qcow2_wrote.as_deref()));
    if !checks.failed.is_empty() {
        bail!("{} check(s) failed:\n  {}", checks.failed.len(), checks.failed.join("\n  "));
    }
    Ok(())
}
