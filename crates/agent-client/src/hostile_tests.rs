//! The client against a hostile agent (the fake one plays the guest).

use std::time::Duration;

use skiff_agent_proto::{
    AgentMessage, Channel, EntryKind, ErrorCode, ErrorReply, ExecRequest, FileEntry, Reply,
    MAX_DATA_CHUNK,
};

use crate::fake_agent::FakeAgent;
use crate::{ClientError, Limits, PullOptions};

fn cmd() -> ExecRequest {
    ExecRequest {
        argv: vec!["x".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn output_flooded_before_exec_started_is_capped() {
    const FLOOD: u64 = 64 << 20;
    let fake = FakeAgent::start(|mut p| {
        let id = p.welcome_then_request(2);
        let chunk = vec![b'x'; MAX_DATA_CHUNK];
        let mut sent = 0u64;
        while sent < FLOOD {
            if p.data(id, Channel::Stdout, &chunk).is_err() {
                return sent;
            }
            sent += chunk.len() as u64;
        }
        let _ = p.reply(id, Reply::ExecStarted { pid: 1 });
        sent
    });
    let err = fake.client().exec(cmd()).await.err().expect("refused");
    assert!(err.to_string().contains("before exec_started"), "{err}");
    let sent = fake.join().await;
    assert!(sent < FLOOD, "the client read the whole flood");

    // Empty chunks cost the client an event each: capped too.
    let fake = FakeAgent::start(|mut p| {
        let id = p.welcome_then_request(2);
        for _ in 0..200_000 {
            if p.data(id, Channel::Stderr, &[]).is_err() {
                return false;
            }
        }
        let _ = p.reply(id, Reply::ExecStarted { pid: 1 });
        true
    });
    let err = fake.client().exec(cmd()).await.err().expect("refused");
    assert!(matches!(err, ClientError::Overflow(_)), "{err}");
    assert!(!fake.join().await, "the client read the whole flood");
}

#[tokio::test]
async fn exec_start_is_bounded_in_time_even_while_frames_keep_coming() {
    let fake = FakeAgent::start(|mut p| {
        let id = p.welcome_then_request(2);
        // Credit never ends the wait and buffers nothing.
        for _ in 0..200 {
            let credit = AgentMessage::StdinCredit { id, bytes: 1 };
            if p.send(&credit).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let timeouts = crate::Timeouts {
        request: Duration::from_millis(300),
        ..Default::default()
    };
    let err = fake
        .client()
        .with_timeouts(timeouts)
        .exec(cmd())
        .await
        .err()
        .expect("timed out");
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    fake.join().await;
}

#[tokio::test]
async fn collected_exec_output_is_capped() {
    let fake = FakeAgent::start(|mut p| {
        let id = p.welcome_then_request(2);
        p.reply(id, Reply::ExecStarted { pid: 1 }).unwrap();
        let chunk = vec![b'o'; MAX_DATA_CHUNK];
        for _ in 0..16 {
            if p.data(id, Channel::Stdout, &chunk).is_err() {
                return;
            }
        }
    });
    let limits = Limits {
        exec_output: 1 << 20,
        ..Default::default()
    };
    let err = fake
        .client()
        .with_limits(limits)
        .exec_output(cmd(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Overflow(_)), "{err}");
    fake.join().await;
}

#[tokio::test]
async fn agent_error_messages_are_shortened_and_defanged() {
    let fake = FakeAgent::start(|mut p| {
        let id = p.welcome_then_request(2);
        let message = format!("\x1b]0;owned\x07\x1b[2J{}", "y".repeat(200_000));
        let e = ErrorReply {
            code: ErrorCode::Io,
            message,
        };
        p.reply(id, Reply::Error(e)).unwrap();
    });
    let err = fake.client().ping().await.unwrap_err();
    let text = err.to_string();
    assert!(text.len() < 8192, "{} bytes", text.len());
    assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
    fake.join().await;
}

#[tokio::test]
async fn a_welcome_outside_the_clients_versions_is_refused() {
    let fake = FakeAgent::start(|mut p| {
        p.welcome(99);
        // The client hangs up instead of sending a request.
        p.recv().is_none()
    });
    let err = fake.client().ping().await.unwrap_err();
    assert!(err.to_string().contains("version 99"), "{err}");
    assert!(fake.join().await);
}

fn entry(path: &str, kind: EntryKind) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind,
        mode: 0o4755,
        uid: None,
        gid: None,
    }
}

#[tokio::test]
async fn a_pull_never_writes_outside_its_target() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap().to_string();
    let fake = FakeAgent::start(move |mut p| {
        let id = p.welcome_then_request(2);
        let link = EntryKind::Symlink { target };
        let msgs = [
            AgentMessage::Entry {
                id,
                entry: entry("", link),
            },
            AgentMessage::Entry {
                id,
                entry: entry("pwned", EntryKind::File { size: 1 }),
            },
        ];
        for m in msgs {
            if p.send(&m).is_err() {
                return;
            }
        }
        let _ = p.data(id, Channel::File, b"x");
        let _ = p.data(id, Channel::File, &[]);
        let _ = p.reply(id, Reply::Ok);
    });
    let dst = t.path().join("dst");
    let err = fake
        .client()
        .pull("/x", &dst, &PullOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tree(_)), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    fake.join().await;
}

#[tokio::test]
async fn a_pull_is_capped_in_bytes_and_set_id_bits_are_dropped() {
    let fake = FakeAgent::start(|mut p| {
        let id = p.welcome_then_request(2);
        let e = entry("", EntryKind::File { size: 4 });
        p.send(&AgentMessage::Entry { id, entry: e }).unwrap();
        p.data(id, Channel::File, b"abcd").unwrap();
        p.data(id, Channel::File, &[]).unwrap();
        p.reply(id, Reply::Ok).unwrap();
    });
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("f");
    fake.client()
        .pull("/x", &dst, &PullOptions::default())
        .await
        .unwrap();
    fake.join().await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dst).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755);

    let fake = FakeAgent::start(|mut p| {
        let id = p.welcome_then_request(2);
        let e = entry("", EntryKind::File { size: 1 << 40 });
        let _ = p.send(&AgentMessage::Entry { id, entry: e });
    });
    let limits = Limits {
        pull_bytes: 1 << 30,
        ..Default::default()
    };
    let err = fake
        .client()
        .with_limits(limits)
        .pull("/x", &t.path().join("g"), &PullOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("local file tree"), "{err}");
    fake.join().await;
}
