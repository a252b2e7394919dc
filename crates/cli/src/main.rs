//! skiff: the command-line client of skiffd, in the spirit of Incus's
//! `incus`. It speaks skiffd's `/1.0` REST API (Incus/LXD shapes) over the
//! Unix socket `$SKIFF_DIR/unix.socket`.
//!
//! Modules: [`cli`] the command line, [`client`] HTTP over the socket and
//! operations, [`ws`] websocket streams, [`exec`] and [`console`] the
//! interactive paths, [`term`] the local terminal, [`format`] output,
//! [`remote`], [`creds`] and [`image_ref`] image names and registries,
//! [`progress`] pull progress, [`commands`] one module per verb group.

mod cli;
mod client;
mod commands;
mod console;
mod creds;
mod exec;
mod format;
mod image_ref;
mod progress;
mod remote;
mod term;
mod ws;

use std::io::Write;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: Failed to start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let not_running = e
                .chain()
                .find_map(|c| c.downcast_ref::<client::ClientError>())
                .filter(|c| matches!(c, client::ClientError::NotRunning(_)));
            if let Some(c) = not_running {
                // Whatever was being done, the one thing to say is how to start skiffd.
                eprintln!("Error: {c}");
            } else if e.downcast_ref::<commands::Reported>().is_none() {
                eprintln!("Error: {e:#}");
            }
            1
        }
    };
    let _ = std::io::stdout().flush();
    // Exit without dropping the runtime: a thread may still be blocked reading stdin.
    std::process::exit(code);
}
