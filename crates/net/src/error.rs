//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while managing a bridge network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A configuration value is unusable (bad name, bad subnet, ...).
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// A host tool the bridge needs is not installed.
    #[error("`{program}` not found (install the Debian package `{package}`)")]
    ToolMissing {
        /// The program that was run.
        program: String,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The kernel cannot do what the bridge needs (nf_tables, bridges, tun).
    #[error("kernel support missing: {what}: {detail}")]
    KernelSupport {
        /// What is missing, e.g. "nf_tables".
        what: &'static str,
        /// The tool's own words.
        detail: String,
    },
    /// A command could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error (trimmed).
        stderr: String,
    },
    /// A command's output could not be understood.
    #[error("cannot parse the output of `{command}`: {detail}")]
    Parse {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// No free /24 is left among the candidates.
    #[error("no free IPv4 subnet: every candidate clashes with a host route or address")]
    NoFreeSubnet,
    /// An interface exists with our name but is not what we expect.
    #[error("interface `{name}` exists but is a `{kind}`, not a {expected}")]
    WrongInterfaceKind {
        /// The interface name.
        name: String,
        /// What it really is.
        kind: String,
        /// What it should be.
        expected: &'static str,
    },
    /// A file in the state directory (or /proc, /sys) could not be read or written.
    #[error("{action} `{path}`")]
    Io {
        /// What was being done ("read", "write", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// dnsmasq started but did not stay up or wrote no pid file.
    #[error("dnsmasq did not start: {0}")]
    Dnsmasq(String),
    /// A lease could not be released.
    #[error("lease of {mac} ({ip}) is still in dnsmasq's lease file after release")]
    LeaseNotReleased {
        /// The client's MAC.
        mac: String,
        /// The leased address.
        ip: std::net::Ipv4Addr,
    },
}

impl NetError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        NetError::Io { action, path: path.into(), source }
    }
}
