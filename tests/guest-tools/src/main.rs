//! `skiff-guest-tools`: what Skiff's device tests and `bench/devices` run
//! inside guests (and, for QEMU's vhost-vsock, on the host), because busybox
//! has no AF_VSOCK.
//!
//! ```text
//! skiff-guest-tools serve PORT                 vsock command server (below)
//! skiff-guest-tools echo-to TARGET CONNS BYTES CONNS connections open at once, each sends "ECHO\n" and BYTES
//! skiff-guest-tools send-to TARGET BYTES       sends a framed transfer of BYTES, expects "<sha256> <n>\n" back
//! skiff-guest-tools recv-from TARGET           reads a framed transfer, answers "<sha256> <n>\n" of what came
//! skiff-guest-tools throughput TARGET BYTES    MB/s of SINK and SOURCE against a server
//! skiff-guest-tools blk-bench DEVICE MIB       O_DIRECT sequential write then read of DEVICE, MB/s
//! ```
//!
//! A framed transfer is `<n>\n`, n bytes, then `<sha256 of them>\n`.
//!
//! TARGET is `cid:CID:PORT` (AF_VSOCK) or `unix:PATH:PORT` (Firecracker's
//! hybrid vsock: connect to PATH and send `CONNECT PORT\n`, answer `OK ...`).
//!
//! The server reads one command line per connection:
//! - `EXEC <shell command>`: runs `/bin/sh -c`, stdout and stderr merged;
//!   answers `EXIT <code> <len>\n` and the output (`code` -1 on a signal);
//! - `ECHO`: writes back everything it reads until EOF;
//! - `SEND <n>`: answers with a framed transfer of n pseudo-random bytes;
//! - `RECV`: reads a framed transfer, answers `<sha256> <n>\n` of the data;
//! - `SINK`: reads to EOF, answers `<count>\n` (no hashing: for benchmarks);
//! - `SOURCE <n>`: writes n bytes, then EOF.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use skiff_guest_tools::{each_chunk, hash_to_eof, read_line, recv_framed, send_framed, vsock, Pattern, CHUNK};

/// Connects to a TARGET (`cid:CID:PORT` or `unix:PATH:PORT`).
fn connect(target: &str) -> Result<BufReader<UnixStream>> {
    let Some((kind, rest)) = target.split_once(':') else { bail!("bad target {target:?}") };
    let Some((addr, port)) = rest.rsplit_once(':') else { bail!("bad target {target:?}") };
    let port: u32 = port.parse().with_context(|| format!("bad port in {target:?}"))?;
    match kind {
        "cid" => {
            let cid: u32 = addr.parse().with_context(|| format!("bad CID in {target:?}"))?;
            Ok(BufReader::new(vsock::connect(cid, port).with_context(|| format!("connect {target}"))?))
        }
        "unix" => {
            let mut s = UnixStream::connect(addr).with_context(|| format!("connect {addr}"))?;
            writeln!(s, "CONNECT {port}")?;
            let mut r = BufReader::new(s);
            let ok = read_line(&mut r)?;
            ensure!(ok.starts_with("OK "), "hybrid vsock answered {ok:?} to CONNECT {port}");
            Ok(r)
        }
        _ => bail!("bad target kind in {target:?}"),
    }
}

/// A buffered connection's reader and a writer on the same socket.
fn split(r: &BufReader<UnixStream>) -> Result<UnixStream> {
    Ok(r.get_ref().try_clone()?)
}

// ---- the server ----

fn serve(port: u32) -> Result<()> {
    let listener = vsock::Listener::bind(port).with_context(|| format!("vsock listen on port {port}"))?;
    eprintln!("skiff-guest-tools: serving on vsock port {port}");
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skiff-guest-tools: accept: {e}");
                continue;
            }
        };
        std::thread::spawn(move || {
            if let Err(e) = handle(conn) {
                eprintln!("skiff-guest-tools: connection: {e:#}");
            }
        });
    }
}

fn handle(conn: UnixStream) -> Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::with_capacity(CHUNK, conn);
    let line = read_line(&mut r)?;
    let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
    match cmd {
        "EXEC" => {
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("exec 2>&1; {arg}"))
                .stdin(Stdio::null())
                .output()
                .context("cannot run /bin/sh")?;
            let code = out.status.code().unwrap_or(-1);
            writeln!(w, "EXIT {code} {}", out.stdout.len())?;
            w.write_all(&out.stdout)?;
        }
        "ECHO" => {
            io::copy(&mut r, &mut w)?;
        }
        "SEND" => {
            let n: u64 = arg.parse().context("SEND needs a byte count")?;
            send_framed(&mut w, n)?;
        }
        "RECV" => {
            let (sha, _, n) = recv_framed(&mut r)?;
            writeln!(w, "{sha} {n}")?;
        }
        "SINK" => {
            let count = io::copy(&mut r, &mut io::sink())?;
            writeln!(w, "{count}")?;
        }
        "SOURCE" => {
            let n: u64 = arg.parse().context("SOURCE needs a byte count")?;
            let buf = vec![0x5au8; CHUNK];
            let mut left = n;
            while left > 0 {
                let len = left.min(CHUNK as u64) as usize;
                w.write_all(&buf[..len])?;
                left -= len as u64;
            }
        }
        _ => {
            writeln!(w, "ERR unknown command {cmd:?}")?;
        }
    }
    w.flush()?;
    w.shutdown(Shutdown::Write)?;
    Ok(())
}

// ---- clients ----

/// CONNS connections, all open before any data moves; each echoes BYTES.
fn echo_to(target: &str, conns: usize, bytes: u64) -> Result<()> {
    let mut open = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut r = connect(target).with_context(|| format!("connection {i}"))?;
        r.get_mut().write_all(b"ECHO\n")?;
        open.push(r);
    }
    let workers: Vec<_> = open
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            std::thread::spawn(move || -> Result<()> {
                let mut w = split(&r)?;
                let seed = Pattern::new().0;
                let writer = std::thread::spawn(move || -> io::Result<()> {
                    each_chunk(Pattern(seed), bytes, |c| w.write_all(c))?;
                    w.shutdown(Shutdown::Write)
                });
                let mut want = Sha256::new();
                each_chunk(Pattern(seed), bytes, |c| {
                    want.update(c);
                    Ok(())
                })?;
                let (got, count) = hash_to_eof(&mut r)?;
                writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
                ensure!(count == bytes, "connection {i}: {count} bytes echoed of {bytes}");
                ensure!(got == hex::encode(want.finalize()), "connection {i}: echoed data differs");
                Ok(())
            })
        })
        .collect();
    let mut failed = 0;
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("echo-to: {e:#}");
                failed += 1;
            }
            Err(_) => failed += 1,
        }
    }
    ensure!(failed == 0, "{failed} of {conns} connections failed");
    println!("echo-to: {conns} connections x {bytes} bytes echoed intact");
    Ok(())
}

fn send_to(target: &str, bytes: u64) -> Result<()> {
    let mut r = connect(target)?;
    let mut w = split(&r)?;
    let t = Instant::now();
    let sha = send_framed(&mut w, bytes)?;
    let reply = read_line(&mut r)?;
    let secs = t.elapsed().as_secs_f64();
    println!("send-to: sent {bytes} bytes sha256 {sha}; peer got {reply} ({:.1} MB/s)", bytes as f64 / secs / 1e6);
    ensure!(reply == format!("{sha} {bytes}"), "the peer received different data");
    Ok(())
}

fn recv_from(target: &str) -> Result<()> {
    let mut r = connect(target)?;
    let mut w = split(&r)?;
    let t = Instant::now();
    let (sha, announced, n) = recv_framed(&mut r)?;
    let secs = t.elapsed().as_secs_f64();
    writeln!(w, "{sha} {n}")?;
    println!("recv-from: got {n} bytes sha256 {sha}; peer sent {announced} ({:.1} MB/s)", n as f64 / secs / 1e6);
    ensure!(announced == sha, "received data differs from what the peer sent");
    Ok(())
}

fn throughput(target: &str, bytes: u64) -> Result<()> {
    let mut r = connect(target)?;
    let mut w = split(&r)?;
    w.write_all(b"SINK\n")?;
    let buf = vec![0xa5u8; CHUNK];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let len = left.min(CHUNK as u64) as usize;
        w.write_all(&buf[..len])?;
        left -= len as u64;
    }
    w.shutdown(Shutdown::Write)?;
    let got = read_line(&mut r)?;
    let tx = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    ensure!(got == bytes.to_string(), "SINK counted {got} of {bytes} bytes");

    let mut r = connect(target)?;
    r.get_mut().write_all(format!("SOURCE {bytes}\n").as_bytes())?;
    let t = Instant::now();
    let count = io::copy(&mut r, &mut io::sink())?;
    let rx = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    ensure!(count == bytes, "SOURCE sent {count} of {bytes} bytes");
    println!("host-to-guest-MBs={tx:.1} guest-to-host-MBs={rx:.1}");
    Ok(())
}

/// A 4 KiB-aligned buffer for O_DIRECT.
fn aligned(len: usize) -> Result<&'static mut [u8]> {
    let layout = std::alloc::Layout::from_size_align(len, 4096)?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    ensure!(!p.is_null(), "out of memory");
    // SAFETY: p points to `len` initialised (zeroed) bytes, leaked for the
    // rest of the process, so no other reference to them exists.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

fn blk_bench(device: &str, mib: u64) -> Result<()> {
    const BLOCK: usize = 1 << 20;
    let buf = aligned(BLOCK)?;
    Pattern::new().fill(buf);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("open {device} O_DIRECT"))?;
    let t = Instant::now();
    for _ in 0..mib {
        f.write_all(buf)?;
    }
    f.sync_all()?;
    let write = mib as f64 * BLOCK as f64 / t.elapsed().as_secs_f64() / 1e6;
    use std::io::Seek;
    f.seek(io::SeekFrom::Start(0))?;
    let t = Instant::now();
    for _ in 0..mib {
        f.read_exact(buf)?;
    }
    let read = mib as f64 * BLOCK as f64 / t.elapsed().as_secs_f64() / 1e6;
    println!("blk-write-MBs={write:.1} blk-read-MBs={read:.1}");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let num = |s: &str| s.parse::<u64>().with_context(|| format!("not a number: {s:?}"));
    match a.as_slice() {
        ["serve", port] => serve(num(port)? as u32),
        ["echo-to", target, conns, bytes] => echo_to(target, num(conns)? as usize, num(bytes)?),
        ["send-to", target, bytes] => send_to(target, num(bytes)?),
        ["recv-from", target] => recv_from(target),
        ["throughput", target, bytes] => throughput(target, num(bytes)?),
        ["blk-bench", device, mib] => blk_bench(device, num(mib)?),
        _ => {
            eprintln!("usage: see the module documentation of tests/guest-tools/src/main.rs");
            std::process::exit(2);
        }
    }
}
