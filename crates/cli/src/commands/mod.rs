//! The commands: each module maps its verbs onto `/1.0` API calls.

pub mod config;
pub mod files;
pub mod image;
pub mod info;
pub mod instances;
pub mod network;
pub mod operation;
pub mod remote;
pub mod snapshot;

use crate::cli::{Cli, Command};
use crate::client::{self, Client};

/// What every command gets.
pub struct Ctx {
    /// The daemon.
    pub client: Client,
    /// `-q`.
    pub quiet: bool,
    /// Whether stdout is a terminal (progress bars).
    pub tty: bool,
}

impl Ctx {
    /// Prints a status line unless quiet.
    pub fn say(&self, line: impl AsRef<str>) {
        if !self.quiet {
            crate::format::emit(format!("{}\n", line.as_ref()));
        }
    }
}

/// `/1.0/instances/{name}` (and a suffix).
pub fn instance_path(name: &str, suffix: &str) -> String {
    format!("/1.0/instances/{}{suffix}", client::encode_segment(name))
}

/// Failures already printed (one per instance): exit 1 without another message.
#[derive(Debug, thiserror::Error)]
#[error("{0} of the operations failed")]
pub struct Reported(pub usize);

/// Whether skiffd is not running (then there is no point in trying the next instance).
pub fn not_running(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<client::ClientError>(), Some(client::ClientError::NotRunning(_))))
}

/// Runs the command line; the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = Client::new(Client::socket_path(cli.socket.as_deref()));
    let ctx = Ctx { client, quiet: cli.quiet, tty: crate::term::is_tty(1) };
    match cli.command {
        Command::Launch(a) => instances::create(&ctx, a, true).await,
        Command::Init(a) => instances::create(&ctx, a, false).await,
        Command::List(a) => instances::list(&ctx, a).await,
        Command::Info(a) => info::info(&ctx, a).await,
        Command::Start(a) => instances::state(&ctx, "start", a.names, false, None).await,
        Command::Stop(a) => instances::state(&ctx, "stop", a.names, a.force, a.timeout).await,
        Command::Restart(a) => instances::state(&ctx, "restart", a.names, a.force, a.timeout).await,
        Command::Pause(a) => instances::state(&ctx, "pause", a.names, false, None).await,
        Command::Delete(a) => instances::delete(&ctx, a).await,
        Command::Exec(a) => instances::exec(&ctx, a).await,
        Command::Console(a) => instances::console(&ctx, a).await,
        Command::File(c) => files::run(&ctx, c).await,
        Command::Snapshot(c) => snapshot::run(&ctx, c).await,
        Command::Copy { source, name, stateless } => snapshot::copy(&ctx, source, name, stateless).await,
        Command::Config(c) => config::run(&ctx, c).await,
        Command::Image(c) => image::run(&ctx, c).await,
        Command::Remote(c) => remote::run(c),
        Command::Operation(c) => operation::run(&ctx, c).await,
        Command::Monitor(a) => operation::monitor(&ctx, a).await,
        Command::Network(c) => network::run(&ctx, c).await,
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "skiff", &mut script);
            crate::format::emit(script);
            Ok(0)
        }
    }
}
