//! The real `skiff-agent` binary on the host, listening on a Unix socket
//! (not as PID 1), driven through `skiff-agent-client`. The behaviour
//! checks are the shared `conformance` ones, which the VM tests run too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skiff_agent_client::{
    conformance, AgentClient, ClientError, EventListener, Timeouts, Transport,
};
use skiff_agent_proto::{
    Event, ExecRequest, ExitStatus, MainProcess, PowerAction, RestartPolicy, User,
};
use tempfile::TempDir;

/// A `skiff-agent` process serving a Unix socket in a temporary dir.
struct HostAgent {
    child: Child,
    dir: TempDir,
    client: AgentClient,
}

impl HostAgent {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    fn start_in(dir: TempDir, extra: &[&str]) -> Self {
        Self::start_wrapped(dir, &[], extra).expect("agent started")
    }

    /// Starts the agent under `wrapper` (e.g. `unshare ...`); `None` if it
    /// exited before listening.
    fn start_wrapped(dir: TempDir, wrapper: &[&str], extra: &[&str]) -> Option<Self> {
        let sock = dir.path().join("agent.sock");
        // SKIFF_AGENT_BIN: run the checks against another build (e.g. the
        // static one from scripts/build-guest).
        let bin = std::env::var("SKIFF_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_skiff-agent").into());
        let (program, args) = match wrapper.split_first() {
            Some((p, rest)) => (
                p.to_string(),
                rest.iter().map(|s| s.to_string()).chain([bin]).collect(),
            ),
            None => (bin, Vec::new()),
        };
        let mut child = Command::new(program)
            .args(args)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start skiff-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        // The file appears at bind(), a moment before listen(): wait until
        // a connection is accepted, not only for the file.
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if child.try_wait().expect("try_wait").is_some() {
                return None;
            }
            assert!(Instant::now() < deadline, "agent socket never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = AgentClient::new(Transport::Unix(sock));
        Some(HostAgent { child, dir, client })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_basics() {
    let a = HostAgent::start(&[]);
    let w = a.client.ping().await.expect("ping");
    assert!(!w.pid1);
    conformance::exec_uname(&a.client).await;
    conformance::exit_codes_and_signals(&a.client).await;
    conformance::env_cwd_and_streams(&a.client).await;
    conformance::identity(&a.client).await;
    conformance::stdin_round_trip(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tty_sees_resize() {
    let a = HostAgent::start(&[]);
    conformance::tty_resize(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_mib_of_stdout() {
    let a = HostAgent::start(&[]);
    conformance::big_stdout(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_execs() {
    let a = HostAgent::start(&[]);
    conformance::concurrent_execs(&a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_and_pull() {
    let a = HostAgent::start(&[]);
    let local = a.path("local");
    std::fs::create_dir(&local).expect("mkdir");
    let guest = a.path("guest");
    conformance::push_pull(&a.client, &local, guest.to_str().expect("utf-8")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_request_keeps_serving() {
    let a = HostAgent::start(&[]);
    conformance::unknown_request(&a.client).await;
}

fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(300),
        request: Duration::from_millis(300),
        exec: None,
    }
}

#[tokio::test]
async fn silent_agent_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Accepts and then never says a word.
    let sock = dir.path().join("silent.sock");
    let l = tokio::net::UnixListener::bind(&sock).expect("bind");
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let client = AgentClient::new(Transport::Unix(sock.clone())).with_timeouts(short_timeouts());
    let t = Instant::now();
    assert!(matches!(client.ping().await, Err(ClientError::Timeout(_))));
    assert!(t.elapsed() < Duration::from_secs(5));
    // Same behind a hybrid-vsock socket that never answers CONNECT.
    let client = AgentClient::new(Transport::vsock(&sock)).with_timeouts(short_timeouts());
    assert!(matches!(
        client.ping().await,
        Err(ClientError::Transport(_))
    ));
    // A listener that never accepts: the handshake times out.
    let backlog = dir.path().join("backlog.sock");
    let _never = std::os::unix::net::UnixListener::bind(&backlog).expect("bind");
    let client = AgentClient::new(Transport::Unix(backlog)).with_timeouts(short_timeouts());
    assert!(matches!(client.ping().await, Err(ClientError::Timeout(_))));
}

fn write_config(dir: &Path, script: &str) -> PathBuf {
    let cfg = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", script], "cwd": "/", "env": ["PATH=/usr/bin:/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
    });
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).expect("json")).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_process_exit_reaches_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events_path = dir.path().join("events.sock");
    let events = EventListener::bind(&events_path).expect("bind events");
    let config = write_config(dir.path(), "sleep 0.5; exit 7");
    let notify = format!("unix:{}", events_path.display());
    let a = HostAgent::start_in(
        dir,
        &[
            "--notify",
            &notify,
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    let mut stream = events
        .accept(Duration::from_secs(10))
        .await
        .expect("event connection");
    let first = stream.next(Duration::from_secs(10)).await.expect("event");
    assert!(matches!(first, Some(Event::Ready(_))), "{first:?}");
    assert_eq!(
        a.client.wait_main().await.expect("wait_main"),
        ExitStatus::Exited { code: 7 }
    );
    let second = stream.next(Duration::from_secs(10)).await.expect("event");
    assert_eq!(
        second,
        Some(Event::MainExited {
            status: ExitStatus::Exited { code: 7 },
            restarting: false
        })
    );
}

fn main_spec(script: &str, restart: RestartPolicy) -> MainProcess {
    MainProcess {
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: "/".into(),
        user: User::default(),
        terminal: false,
        hostname: None,
        stop_signal: libc::SIGTERM,
        stop_timeout_secs: 1,
        restart,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_process_restarts_on_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events_path = dir.path().join("events.sock");
    let events = EventListener::bind(&events_path).expect("bind events");
    let marker = dir.path().join("ran-once");
    let notify = format!("unix:{}", events_path.display());
    let a = HostAgent::start_in(dir, &["--notify", &notify]);
    let mut stream = events
        .accept(Duration::from_secs(10))
        .await
        .expect("event connection");
    assert!(matches!(
        stream.next(Duration::from_secs(10)).await.expect("ready"),
        Some(Event::Ready(_))
    ));
    let script = format!(
        "test -e {m} && exit 0; touch {m}; exit 1",
        m = marker.display()
    );
    a.client
        .start_main(main_spec(&script, RestartPolicy::OnFailure))
        .await
        .expect("start main");
    // The first run fails and is restarted; wait_main sees only the end.
    assert_eq!(
        a.client.wait_main().await.expect("wait"),
        ExitStatus::Exited { code: 0 }
    );
    let ev = |code, restarting| {
        Some(Event::MainExited {
            status: ExitStatus::Exited { code },
            restarting,
        })
    };
    assert_eq!(
        stream.next(Duration::from_secs(10)).await.expect("event"),
        ev(1, true)
    );
    assert_eq!(
        stream.next(Duration::from_secs(10)).await.expect("event"),
        ev(0, false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_main_escalates_to_sigkill() {
    let a = HostAgent::start(&[]);
    let spec = |script: &str| main_spec(script, RestartPolicy::Never);
    a.client
        .start_main(spec("exec sleep 60"))
        .await
        .expect("start main");
    let st = a
        .client
        .stop_main(Duration::from_secs(5))
        .await
        .expect("stop");
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: libc::SIGTERM
        }
    );
    // SIGTERM must come after the shell ignores it, or it ends the shell.
    let trapped = a.dir.path().join("trap-set");
    a.client
        .start_main(spec(&format!(
            "trap '' TERM; touch {}; exec sleep 60",
            trapped.display()
        )))
        .await
        .expect("start main again");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !trapped.exists() {
        assert!(
            Instant::now() < deadline,
            "the main process never set its trap"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    let st = a
        .client
        .stop_main(Duration::from_secs(1))
        .await
        .expect("stop");
    assert_eq!(
        st,
        ExitStatus::Signaled {
            signal: libc::SIGKILL
        }
    );
    assert!(t.elapsed() >= Duration::from_secs(1));
}

/// The agent as PID 1 of a new pid and mount namespace: the init sequence
/// runs for real (early mounts; no modules, no rootfs: this is the host's
/// kernel and filesystem), orphans are reaped, and power-off ends the namespace.
/// Needs root and util-linux's unshare; skipped without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid1_in_a_namespace_reaps_orphans_and_powers_off() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let wrapper = [
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--propagation",
        "private",
    ];
    let Some(mut a) = HostAgent::start_wrapped(
        dir,
        &wrapper,
        &[
            "--no-boot-mark",
            "--no-modules",
            "--rootfs",
            "none",
            "--notify",
            "none",
        ],
    ) else {
        eprintln!("skipped: unshare could not create the namespaces");
        return;
    };
    let w = a.client.ping().await.expect("ping");
    assert!(w.pid1, "agent should be PID 1 in the namespace");
    conformance::exec_uname(&a.client).await;

    // The init sequence mounted a /proc of the new pid namespace.
    let out = a
        .client
        .exec_output(sh_req("cat /proc/1/comm"), None)
        .await
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "skiff-agent");

    // Orphans are re-parented to PID 1, which must reap them.
    let out = a
        .client
        .exec_output(sh_req("(sleep 0.2 &); (sleep 0.3 &); exit 0"), None)
        .await
        .expect("exec");
    assert_eq!(out.status.code(), 0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = a
        .client
        .exec_output(sh_req("cat /proc/[0-9]*/stat"), None)
        .await
        .expect("exec");
    let stats = String::from_utf8_lossy(&out.stdout);
    let zombies: Vec<&str> = stats
        .lines()
        .filter(|l| l.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')))
        .collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");

    a.client
        .power(PowerAction::Poweroff)
        .await
        .expect("power off");
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "namespace did not end after power-off"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sh_req(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// A client whose version range the agent does not speak gets an
/// unsupported_version error; anything but a hello first gets bad_request.
#[test]
fn version_handshake_refuses_unknown_versions() {
    use skiff_agent_proto::frame::{encode_control, read_frame};
    use skiff_agent_proto::{AgentMessage, ClientMessage, ErrorCode, Frame, Hello, Reply};
    use std::os::unix::net::UnixStream;

    let a = HostAgent::start(&[]);
    let sock = a.path("agent.sock");
    let ask = |msg: &ClientMessage| -> ErrorCode {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        std::io::Write::write_all(&mut s, &encode_control(msg).expect("encode")).expect("send");
        match read_frame::<AgentMessage, _>(&mut s).expect("read") {
            Some(Frame::Control(AgentMessage::Reply {
                id: 0,
                reply: Reply::Error(e),
            })) => e.code,
            other => panic!("expected an error reply, got {other:?}"),
        }
    };
    let future = Hello {
        min_version: 7,
        max_version: 9,
        client: "from the future".into(),
        time_ns: None,
    };
    assert_eq!(
        ask(&ClientMessage::Hello(future)),
        ErrorCode::UnsupportedVersion
    );
    assert_eq!(
        ask(&ClientMessage::EndOfEntries { id: 3 }),
        ErrorCode::BadRequest
    );
}

/// An exec that outlives `Timeouts::exec` gives a timeout error, and the
/// agent kills its whole session when the client goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_and_kill_on_disconnect() {
    let a = HostAgent::start(&[]);
    let marker = a.path("survived");
    let timeouts = Timeouts {
        exec: Some(Duration::from_millis(500)),
        ..Timeouts::default()
    };
    let client = a.client.clone().with_timeouts(timeouts);
    let script = format!("(sleep 1.5; touch {}) & sleep 1.5", marker.display());
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script],
        ..Default::default()
    };
    let t = Instant::now();
    assert!(matches!(
        client.exec_output(req, None).await,
        Err(ClientError::Timeout("exec"))
    ));
    assert!(t.elapsed() < Duration::from_secs(3));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !marker.exists(),
        "the exec's background child outlived the disconnect"
    );
}

/// A host that starts listening for events late still gets them: the
/// agent reconnects on the next event and starts with `ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_late_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events_path = dir.path().join("events.sock");
    let notify = format!("unix:{}", events_path.display());
    let a = HostAgent::start_in(dir, &["--notify", &notify]);
    a.client.ping().await.expect("ping");
    let events = EventListener::bind(&events_path).expect("bind events");
    let pid = a
        .client
        .start_main(main_spec("exit 5", RestartPolicy::Never))
        .await
        .expect("start");
    assert!(pid > 0);
    let mut stream = events
        .accept(Duration::from_secs(10))
        .await
        .expect("event connection");
    let first = stream.next(Duration::from_secs(10)).await.expect("event");
    assert!(matches!(first, Some(Event::Ready(_))), "{first:?}");
    let second = stream.next(Duration::from_secs(10)).await.expect("event");
    let want = Event::MainExited {
        status: ExitStatus::Exited { code: 5 },
        restarting: false,
    };
    assert_eq!(second, Some(want));
}

/// As PID 1, the main process's exit reaches the host and the "guest"
/// (here: the pid namespace) powers off. Needs root and unshare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid1_main_exit_is_reported_then_powers_off() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let events_path = dir.path().join("events.sock");
    let events = EventListener::bind(&events_path).expect("bind events");
    let config = write_config(dir.path(), "sleep 0.5; exit 7");
    let notify = format!("unix:{}", events_path.display());
    let wrapper = [
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--propagation",
        "private",
    ];
    let args = [
        "--no-boot-mark",
        "--no-modules",
        "--rootfs",
        "none",
        "--notify",
        &notify,
        "--config",
    ];
    let mut args: Vec<&str> = args.to_vec();
    args.push(config.to_str().expect("utf-8"));
    let Some(mut a) = HostAgent::start_wrapped(dir, &wrapper, &args) else {
        eprintln!("skipped: unshare could not create the namespaces");
        return;
    };
    let mut stream = events
        .accept(Duration::from_secs(10))
        .await
        .expect("event connection");
    assert!(
        matches!(stream.next(Duration::from_secs(10)).await.expect("event"), Some(Event::Ready(w)) if w.pid1)
    );
    let exited = stream.next(Duration::from_secs(20)).await.expect("event");
    assert_eq!(
        exited,
        Some(Event::MainExited {
            status: ExitStatus::Exited { code: 7 },
            restarting: false
        })
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "namespace did not end after the main process exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_stdin_arrives_intact() {
    let a = HostAgent::start(&[]);
    conformance::large_stdin(&a.client).await;
}

/// The agent's peak resident memory, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM value")
}

/// A reader that starts late holds the writer back instead of timing it
/// out (the request timeout here is 1 s, the wait 3 s), and the agent's
/// memory stays bounded by its stdin window, not by what is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_stdin_reader_holds_the_writer_back() {
    let a = HostAgent::start(&[]);
    let timeouts = Timeouts {
        request: Duration::from_secs(1),
        ..Timeouts::default()
    };
    let client = a.client.clone().with_timeouts(timeouts);
    let before = peak_rss_kib(a.child.id());
    let took = tokio::time::timeout(
        Duration::from_secs(60),
        conformance::stdin_back_pressure(&client),
    )
    .await
    .expect("the exec ended: stdin was neither cut off nor stalled");
    let after = peak_rss_kib(a.child.id());
    eprintln!("32 MiB of stdin written in {took:?}; agent peak RSS {before} -> {after} KiB");
    assert!(
        after < before + 16 * 1024,
        "agent peak RSS grew from {before} to {after} KiB for 32 MiB of stdin"
    );
}

/// A signal gets through to a process that does not read its stdin while
/// more stdin than any buffer holds waits to be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_reaches_an_exec_that_does_not_read_its_stdin() {
    let a = HostAgent::start(&[]);
    tokio::time::timeout(
        Duration::from_secs(60),
        conformance::signal_with_stdin_pending(&a.client),
    )
    .await
    .expect("signal delivered and exec ended");
}

/// 1 GiB into `sha256sum`: `SKIFF_TEST_GIB_STDIN=1` (slow in debug builds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gib_of_stdin() {
    if std::env::var_os("SKIFF_TEST_GIB_STDIN").is_none() {
        eprintln!("skipped: set SKIFF_TEST_GIB_STDIN=1");
        return;
    }
    let a = HostAgent::start(&[]);
    conformance::large_stdin_of(&a.client, 1 << 30).await;
}
