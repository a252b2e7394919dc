//! Behaviour checks against a live agent, written only against the client
//! API so the same checks run on the host (agent on a Unix socket) and in
//! a VM (agent as PID 1 behind the hybrid vsock). Each check panics with a
//! message on failure, like an assertion: this is test support.
//!
//! The guest needs a POSIX shell and coreutils or busybox (`sh`, `cat`,
//! `head`, `tee`, `mkfifo`, `sha256sum`, `stat`, `stty`, `sleep`, `uname`).

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use skiff_agent_proto::{ErrorCode, ExecRequest, ExitStatus, Reply, Request, WindowSize};

use crate::{AgentClient, ClientError, ExecEvent, PullOptions, PushOptions};

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    cmd(&["sh", "-c", script])
}

/// Deterministic pseudo-random bytes (xorshift), for payloads.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `uname -a` runs and says Linux.
pub async fn exec_uname(agent: &AgentClient) {
    let out = agent
        .exec_output(cmd(&["uname", "-a"]), None)
        .await
        .expect("exec uname");
    assert_eq!(out.status, ExitStatus::Exited { code: 0 });
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.starts_with("Linux "), "uname -a said {s:?}");
}

/// Exit codes 0 and 3, death by signal (own and forwarded), a missing
/// command (127, like a container runtime).
pub async fn exit_codes_and_signals(agent: &AgentClient) {
    for code in [0, 3] {
        let out = agent
            .exec_output(sh(&format!("exit {code}")), None)
            .await
            .expect("exec");
        assert_eq!(out.status, ExitStatus::Exited { code });
    }
    let out = agent
        .exec_output(sh("kill -9 $$"), None)
        .await
        .expect("exec");
    assert_eq!(out.status, ExitStatus::Signaled { signal: 9 });

    let s = agent.exec(cmd(&["sleep", "60"])).await.expect("exec sleep");
    assert!(s.pid().is_some_and(|p| p > 0));
    s.control().signal(libc::SIGTERM).await.expect("signal");
    let status = tokio::time::timeout(Duration::from_secs(20), s.output())
        .await
        .expect("exit after SIGTERM");
    assert_eq!(
        status.expect("output").status,
        ExitStatus::Signaled {
            signal: libc::SIGTERM
        }
    );

    let out = agent
        .exec_output(cmd(&["skiff-no-such-command"]), None)
        .await
        .expect("exec missing");
    assert_eq!(out.status, ExitStatus::Exited { code: 127 });
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "stderr {:?}",
        out.stderr
    );
}

/// env, cwd and the stdout/stderr split reach the process.
pub async fn env_cwd_and_streams(agent: &AgentClient) {
    let mut req = sh("echo \"$GREETING\"; pwd; echo oops >&2");
    req.env = vec!["GREETING=hello skiff".into()];
    req.cwd = Some("/tmp".into());
    let out = agent.exec_output(req, None).await.expect("exec");
    assert_eq!(out.status.code(), 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello skiff\n/tmp\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
}

/// uid, gid and supplementary groups are applied (when the agent is root;
/// otherwise nothing to check).
pub async fn identity(agent: &AgentClient) {
    let out = agent
        .exec_output(cmd(&["id", "-u"]), None)
        .await
        .expect("exec id");
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        return;
    }
    let mut req = cmd(&["sh", "-c", "id -u; id -g; id -G"]);
    req.user = Some(skiff_agent_proto::User {
        uid: 65534,
        gid: 65533,
        additional_gids: vec![4, 27],
    });
    let out = agent.exec_output(req, None).await.expect("exec as nobody");
    assert_eq!(
        out.status.code(),
        0,
        "stderr {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..2], ["65534", "65533"], "{text}");
    let mut groups: Vec<&str> = lines[2].split_whitespace().collect();
    groups.sort();
    assert_eq!(groups, ["27", "4", "65533"], "{text}");
}

/// 1 MiB through `cat` comes back unchanged.
pub async fn stdin_round_trip(agent: &AgentClient) {
    let data = payload(1 << 20, 7);
    let out = agent
        .exec_output(cmd(&["cat"]), Some(data.clone()))
        .await
        .expect("exec cat");
    assert_eq!(out.status.code(), 0);
    assert!(
        out.stdout == data,
        "cat returned {} bytes, not the {} sent",
        out.stdout.len(),
        data.len()
    );
}

/// Bytes of [`large_stdin`] (and of its stdout counterpart).
pub const LARGE_STDIN_BYTES: u64 = 32 << 20;

/// 32 MiB of pseudo-random bytes piped into `sha256sum` arrive intact (the
/// guest's hash equals the host's), and stdin runs at a rate within 2x of
/// stdout. Same as `large_stdin_of(agent, LARGE_STDIN_BYTES)`.
pub async fn large_stdin(agent: &AgentClient) {
    large_stdin_of(agent, LARGE_STDIN_BYTES).await;
}

/// `bytes` of pseudo-random data (a 4 MiB block, repeated) piped into
/// `sha256sum` arrive intact; then the rate of `bytes` into `cat
/// >/dev/null` is compared with `bytes` out of `head -c .. /dev/zero`
/// (both nearly free for the guest's CPU, so the transport is measured):
/// stdin must be within 2x of stdout. Prints the rates; a transfer too
/// fast to time (under 0.25 s, e.g. on the host) is not compared. Streams:
/// nothing of size `bytes` is held in memory. Moves `bytes` three times.
pub async fn large_stdin_of(agent: &AgentClient, bytes: u64) {
    let block = std::sync::Arc::new(payload(4 << 20, 0x5eed));
    let (secs, out) = feed_stdin(agent, cmd(&["sha256sum"]), bytes, &block).await;
    let mut h = Sha256::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        h.update(&block[..n]);
        left -= n as u64;
    }
    let want = hex::encode(h.finalize());
    let got = String::from_utf8_lossy(&out);
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "guest hashed {got:?}"
    );
    let mib = bytes as f64 / f64::from(1 << 20);
    eprintln!("large_stdin: {mib:.0} MiB into sha256sum intact in {secs:.2} s");

    let (stdin_secs, _) = feed_stdin(agent, sh("cat >/dev/null"), bytes, &block).await;
    let t = Instant::now();
    let mut s = agent
        .exec(sh(&format!("head -c {bytes} /dev/zero")))
        .await
        .expect("exec head");
    let mut n = 0u64;
    let status = loop {
        match s.next_event().await.expect("event") {
            Some(ExecEvent::Stdout(b)) => n += b.len() as u64,
            Some(ExecEvent::Stderr(_)) => {}
            Some(ExecEvent::Exit(st)) => break st,
            None => panic!("no exit"),
        }
    };
    let stdout_secs = t.elapsed().as_secs_f64();
    assert_eq!(status.code(), 0);
    assert_eq!(n, bytes);

    let (stdin_rate, stdout_rate) = (mib / stdin_secs, mib / stdout_secs);
    eprintln!(
        "large_stdin: {mib:.0} MiB of stdin in {stdin_secs:.2} s ({stdin_rate:.1} MiB/s), \
         of stdout in {stdout_secs:.2} s ({stdout_rate:.1} MiB/s)"
    );
    if stdout_secs < 0.25 {
        eprintln!("large_stdin: too fast to compare the rates");
        return;
    }
    assert!(
        stdin_rate * 2.0 >= stdout_rate,
        "stdin at {stdin_rate:.1} MiB/s is not within 2x of stdout at {stdout_rate:.1} MiB/s"
    );
}

/// Runs `req` with `bytes` of `block` (repeated) as stdin; the seconds
/// from start to exit and its stdout. The exit must be 0.
async fn feed_stdin(
    agent: &AgentClient,
    mut req: ExecRequest,
    bytes: u64,
    block: &std::sync::Arc<Vec<u8>>,
) -> (f64, Vec<u8>) {
    req.stdin = true;
    let t = Instant::now();
    let mut s = agent.exec(req).await.expect("exec");
    let ctl = s.control();
    let feed = block.clone();
    let feeder = tokio::spawn(async move {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(feed.len() as u64) as usize;
            ctl.write_stdin(&feed[..n]).await?;
            left -= n as u64;
        }
        ctl.close_stdin().await
    });
    let (status, out, err) = collect(&mut s).await;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(
        status.code(),
        0,
        "stderr {:?}",
        String::from_utf8_lossy(&err)
    );
    feeder.await.expect("feeder").expect("stdin");
    (secs, out)
}

/// A process that reads its stdin only after 3 s holds the client back:
/// writing 32 MiB cannot finish before it reads (only bounded buffers lie
/// between them), the client waits instead of timing out, and everything
/// arrives. Returns how long the write took.
pub async fn stdin_back_pressure(agent: &AgentClient) -> Duration {
    let data = payload(32 << 20, 11);
    let want = hex::encode(Sha256::digest(&data));
    let mut req = sh("sleep 3; sha256sum");
    req.stdin = true;
    let t = Instant::now();
    let mut s = agent.exec(req).await.expect("exec");
    let ctl = s.control();
    let feeder = tokio::spawn(async move {
        ctl.write_stdin(&data).await?;
        let took = t.elapsed();
        ctl.close_stdin().await?;
        Ok::<_, ClientError>(took)
    });
    let (status, out, err) = collect(&mut s).await;
    assert_eq!(
        status.code(),
        0,
        "stderr {:?}",
        String::from_utf8_lossy(&err)
    );
    let took = feeder.await.expect("feeder").expect("stdin");
    let got = String::from_utf8_lossy(&out);
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "{got:?}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "32 MiB were taken in {took:?}, before the process read any"
    );
    took
}

/// A process that never reads its stdin still gets a signal while the
/// client has more stdin for it than any buffer holds, and the writer is
/// released when it ends.
pub async fn signal_with_stdin_pending(agent: &AgentClient) {
    let mut req = cmd(&["sleep", "60"]);
    req.stdin = true;
    let s = agent.exec(req).await.expect("exec sleep");
    let ctl = s.control();
    let feed = ctl.clone();
    let feeder = tokio::spawn(async move { feed.write_stdin(&vec![0u8; 16 << 20]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::time::timeout(Duration::from_secs(10), ctl.signal(libc::SIGTERM))
        .await
        .expect("the signal went out while stdin was held back")
        .expect("signal");
    let out = tokio::time::timeout(Duration::from_secs(20), s.output())
        .await
        .expect("exit after SIGTERM")
        .expect("output");
    assert_eq!(
        out.status,
        ExitStatus::Signaled {
            signal: libc::SIGTERM
        }
    );
    let fed = tokio::time::timeout(Duration::from_secs(10), feeder)
        .await
        .expect("the stdin writer was released")
        .expect("feeder");
    assert!(matches!(fed, Err(ClientError::ExecEnded)), "{fed:?}");
}

/// All events of an exec: its status, stdout and stderr.
async fn collect(s: &mut crate::ExecSession) -> (ExitStatus, Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match s.next_event().await.expect("event") {
            Some(ExecEvent::Stdout(b)) => out.extend_from_slice(&b),
            Some(ExecEvent::Stderr(b)) => err.extend_from_slice(&b),
            Some(ExecEvent::Exit(st)) => return (st, out, err),
            None => panic!("no exit"),
        }
    }
}

async fn read_until(
    s: &mut crate::ExecSession,
    seen: &mut String,
    needle: &str,
) -> Option<ExitStatus> {
    while !seen.contains(needle) {
        let ev = tokio::time::timeout(Duration::from_secs(20), s.next_event())
            .await
            .expect("tty output in time");
        match ev.expect("event") {
            Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => {
                seen.push_str(&String::from_utf8_lossy(&b))
            }
            Some(ExecEvent::Exit(st)) => return Some(st),
            None => return None,
        }
    }
    None
}

/// A TTY exec sees its size, and the new size after a resize.
pub async fn tty_resize(agent: &AgentClient) {
    let mut req = sh("stty size; read line; stty size");
    req.tty = Some(WindowSize { rows: 24, cols: 80 });
    req.stdin = true;
    let mut s = agent.exec(req).await.expect("exec tty");
    let mut seen = String::new();
    assert_eq!(
        read_until(&mut s, &mut seen, "24 80").await,
        None,
        "before resize: {seen:?}"
    );
    s.control().resize(50, 132).await.expect("resize");
    s.control().write_stdin(b"go\n").await.expect("stdin");
    let status = read_until(&mut s, &mut seen, "50 132").await;
    assert_eq!(status, None, "after resize: {seen:?}");
    let out = s.output().await.expect("rest");
    assert_eq!(out.status.code(), 0);
}

/// 100 MiB of stdout arrive intact: the guest hashes what it sends.
pub async fn big_stdout(agent: &AgentClient) {
    let script = "d=$(mktemp -d) && mkfifo $d/f && (sha256sum < $d/f >&2 &) && \
                  head -c 104857600 /dev/urandom | tee $d/f; wait; sleep 0.2; rm -r $d";
    let mut s = agent.exec(sh(script)).await.expect("exec");
    let (mut hasher, mut n, mut err) = (Sha256::new(), 0usize, Vec::new());
    let status = loop {
        match s.next_event().await.expect("event") {
            Some(ExecEvent::Stdout(b)) => {
                n += b.len();
                hasher.update(&b);
            }
            Some(ExecEvent::Stderr(b)) => err.extend_from_slice(&b),
            Some(ExecEvent::Exit(st)) => break st,
            None => panic!("no exit"),
        }
    };
    assert_eq!(
        status.code(),
        0,
        "stderr {:?}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(n, 100 << 20);
    let guest = String::from_utf8_lossy(&err);
    let want = hex::encode(hasher.finalize());
    assert_eq!(
        guest.split_whitespace().next(),
        Some(want.as_str()),
        "guest said {guest:?}"
    );
}

/// 32 execs at once, each gets its own output.
pub async fn concurrent_execs(agent: &AgentClient) {
    let runs = (0..32).map(|i| {
        let agent = agent.clone();
        async move {
            let out = agent
                .exec_output(sh(&format!("sleep 0.3; echo run-{i}")), None)
                .await
                .expect("exec");
            (i, out)
        }
    });
    for (i, out) in futures::future::join_all(runs).await {
        assert_eq!(out.status.code(), 0);
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("run-{i}\n"));
    }
}

fn sha_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hash");
    hex::encode(h.finalize())
}

/// A 50 MiB file pushed to `guest_dir` and pulled back keeps its bytes
/// and mode; so does a small tree with a symlink. `local_dir` is scratch
/// space on the host.
pub async fn push_pull(agent: &AgentClient, local_dir: &Path, guest_dir: &str) {
    use std::os::unix::fs::PermissionsExt;
    let src = local_dir.join("big.bin");
    std::fs::write(&src, payload(50 << 20, 42)).expect("write payload");
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let want = sha_file(&src);
    let remote = format!("{guest_dir}/sub/big.bin");
    let opts = PushOptions {
        parents: true,
        ..Default::default()
    };
    agent.push(&src, &remote, &opts).await.expect("push");

    let out = agent
        .exec_output(cmd(&["sha256sum", &remote]), None)
        .await
        .expect("sha256sum");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "guest sha {:?}",
        out.stdout
    );
    let out = agent
        .exec_output(cmd(&["stat", "-c", "%a", &remote]), None)
        .await
        .expect("stat");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "640");

    let back = local_dir.join("back.bin");
    agent
        .pull(&remote, &back, &PullOptions::default())
        .await
        .expect("pull");
    assert_eq!(sha_file(&back), want);
    assert_eq!(
        std::fs::metadata(&back).expect("stat").permissions().mode() & 0o7777,
        0o640
    );

    let tree = local_dir.join("tree");
    std::fs::create_dir_all(tree.join("d")).expect("mkdir");
    std::fs::write(tree.join("d/x.sh"), b"#!/bin/sh\necho x\n").expect("write");
    std::fs::set_permissions(tree.join("d/x.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::os::unix::fs::symlink("d/x.sh", tree.join("link")).expect("symlink");
    let remote_tree = format!("{guest_dir}/tree");
    agent
        .push(&tree, &remote_tree, &opts)
        .await
        .expect("push tree");
    let out = agent
        .exec_output(cmd(&[&format!("{remote_tree}/link")]), None)
        .await
        .expect("run pushed script");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x\n");
    let tree_back = local_dir.join("tree-back");
    agent
        .pull(&remote_tree, &tree_back, &PullOptions::default())
        .await
        .expect("pull tree");
    assert_eq!(
        std::fs::read_link(tree_back.join("link")).expect("readlink"),
        Path::new("d/x.sh")
    );
    assert_eq!(
        std::fs::read(tree_back.join("d/x.sh")).expect("read"),
        b"#!/bin/sh\necho x\n"
    );

    // Owners are applied when the agent may (it runs as root).
    let root = agent
        .exec_output(cmd(&["id", "-u"]), None)
        .await
        .expect("exec id");
    if String::from_utf8_lossy(&root.stdout).trim() == "0" {
        let small = local_dir.join("owned.txt");
        std::fs::write(&small, b"owned\n").expect("write");
        let owned = PushOptions {
            uid: Some(65534),
            gid: Some(65533),
            mode: Some(0o600),
            parents: true,
        };
        let remote_owned = format!("{guest_dir}/owned.txt");
        agent
            .push(&small, &remote_owned, &owned)
            .await
            .expect("push with owner");
        let out = agent
            .exec_output(cmd(&["stat", "-c", "%u:%g:%a", &remote_owned]), None)
            .await
            .expect("stat");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "65534:65533:600"
        );
    }

    match agent
        .pull(
            &format!("{guest_dir}/nonexistent"),
            &local_dir.join("nothing"),
            &PullOptions::default(),
        )
        .await
    {
        Err(ClientError::Agent(e)) => assert_eq!(e.code, ErrorCode::NotFound),
        other => panic!("pull of a missing file gave {other:?}"),
    }
}

/// Unknown and malformed requests get errors, and the same connection
/// keeps serving.
pub async fn unknown_request(agent: &AgentClient) {
    let mut conn = agent.connect().await.expect("connect");
    match conn
        .raw_request(serde_json::json!({"type": "frobnicate", "level": 11}))
        .await
    {
        Err(ClientError::Agent(e)) => assert_eq!(e.code, ErrorCode::UnknownRequest),
        other => panic!("unknown request gave {other:?}"),
    }
    match conn
        .raw_request(serde_json::json!({"type": "exec", "argv": "not-a-list"}))
        .await
    {
        Err(ClientError::Agent(e)) => assert_eq!(e.code, ErrorCode::BadRequest),
        other => panic!("malformed request gave {other:?}"),
    }
    assert!(matches!(
        conn.request(Request::Ping).await,
        Ok(Reply::Pong(_))
    ));
    agent
        .ping()
        .await
        .expect("agent still serves new connections");
}
