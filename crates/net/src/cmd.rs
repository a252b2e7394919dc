//! Running host tools (`ip`, `nft`, `dnsmasq`, `dhcp_release`) with errors that carry their stderr.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::NetError;

/// The Debian package that provides `program`, for error messages.
fn package_of(program: &str) -> &'static str {
    match program {
        "ip" | "bridge" => "iproute2",
        "nft" => "nftables",
        "dnsmasq" => "dnsmasq-base",
        "dhcp_release" => "dnsmasq-utils",
        _ => "?",
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `program args`, feeding `stdin` if given; returns stdout on success.
pub(crate) fn run_with_input(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let line = command_line(program, args);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            NetError::ToolMissing { program: program.to_string(), package: package_of(program) }
        } else {
            NetError::Spawn { command: line.clone(), source }
        }
    })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes()).map_err(|source| NetError::Spawn { command: line.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Spawn { command: line.clone(), source })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args`; returns stdout on success.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    run_with_input(program, args, None)
}

/// Runs `ip -j args` and parses its JSON output (empty output is an empty array).
pub(crate) fn ip_json(args: &[&str]) -> Result<serde_json::Value, NetError> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("ip", &full)?;
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(&out)
        .map_err(|e| NetError::Parse { command: command_line("ip", &full), detail: e.to_string() })
}

/// True when the error is a failed command whose stderr says the object does not exist.
pub(crate) fn is_not_found(err: &NetError) -> bool {
    match err {
        NetError::Command { stderr, .. } => {
            stderr.contains("Cannot find device")
                || stderr.contains("does not exist")
                || stderr.contains("No such file or directory")
                || stderr.contains("No such device")
        }
        _ => false,
    }
}
