//! The runner's control socket (`control.sock` in the runtime directory):
//! `skiff-run kill` reaches the process that attached the main process.
//! One request line, one answer line: `signal N` → `ok` or `error MSG`.

use std::path::Path;
use std::time::Duration;

use skiff_agent_client::ExecControl;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::runtime::CONTROL_SOCKET;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding or connecting failed.
    #[error("control socket {0}")]
    Socket(String, #[source] std::io::Error),
    /// The runner refused the request.
    #[error("the runner answered {0:?}")]
    Refused(String),
    /// No answer in time.
    #[error("the runner did not answer")]
    Timeout,
}

/// Serves `signal N` requests for `main` until aborted.
pub fn serve(dir: &Path, main: ExecControl) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    let path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
    Ok(tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let main = main.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match line.trim().strip_prefix("signal ").and_then(|n| n.parse::<i32>().ok()) {
                    Some(sig) => match main.signal(sig).await {
                        Ok(()) => "ok\n".to_string(),
                        Err(e) => format!("error {e}\n"),
                    },
                    None => "error unknown request\n".to_string(),
                };
                let _ = w.write_all(answer.as_bytes()).await;
            });
        }
    }))
}

/// Asks the runner of the VM in `dir` to signal its main process.
pub async fn send_signal(dir: &Path, signal: i32) -> Result<(), ControlError> {
    let path = dir.join(CONTROL_SOCKET);
    let fut = async {
        let mut s =
            UnixStream::connect(&path).await.map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
        s.write_all(format!("signal {signal}\n").as_bytes())
            .await
            .map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .await
            .map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
        match line.trim() {
            "ok" => Ok(()),
            other => Err(ControlError::Refused(other.to_string())),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| ControlError::Timeout)?
}
