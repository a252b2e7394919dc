//! The command line (clap derive): Incus's verbs and flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::format::Format;

/// skiff: launch and manage Skiff instances (VMs first) through skiffd.
///
/// skiff talks to skiffd over its Unix socket ($SKIFF_DIR/unix.socket,
/// SKIFF_DIR=/var/lib/skiff by default; --socket overrides it).
#[derive(Debug, Parser)]
#[command(name = "skiff", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_long_help = "Examples:\n  skiff launch docker.io/library/nginx:1.27 web\n  skiff list\n  skiff exec web -- sh"
)]
pub struct Cli {
    /// skiffd's socket (default: $SKIFF_DIR/unix.socket).
    #[arg(long, global = true, value_name = "PATH", env = "SKIFF_SOCKET", hide_env = true)]
    pub socket: Option<PathBuf>,
    /// Print less (no progress, no "Creating ..." lines).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and start an instance from an image.
    ///
    /// IMAGE is REMOTE:path/name:tag (a remote added with "skiff remote add"), a full OCI reference
    /// (docker.io/library/nginx:1.27, ghcr.io/x/y, 127.0.0.1:5000/x:t: the first part has a '.' or ':'
    /// or is localhost), or a bare name (busybox, nginx:1.27): skiffd looks for a local image alias
    /// first, then pulls from Docker Hub like docker does. Registry credentials come from the remote,
    /// else from Docker's ~/.docker/config.json (auths, credHelpers, credsStore).
    #[command(
        after_long_help = "Examples:\n  skiff launch busybox b1\n  skiff launch --vm docker.io/library/nginx:1.27 web -c limits.memory=512MiB\n  skiff launch myreg:team/app:v2"
    )]
    Launch(CreateArgs),
    /// Create an instance from an image without starting it (see launch for IMAGE).
    #[command(after_long_help = "Examples:\n  skiff init busybox b1\n  skiff init ghcr.io/x/y:1 -c limits.cpu=2")]
    Init(CreateArgs),
    /// List instances.
    ///
    /// FILTER: a name prefix, or KEY=VALUE matching a config key, status or type.
    /// Columns (-c): n name, s state, 4 IPv4, 6 IPv6, t type, S snapshots, d description, c created.
    #[command(
        visible_alias = "ls",
        after_long_help = "Examples:\n  skiff list\n  skiff ls web -c ns4\n  skiff list --format json"
    )]
    List(ListArgs),
    /// Show an instance's status, resources and snapshots.
    #[command(after_long_help = "Examples:\n  skiff info web\n  skiff info web --show-log")]
    Info(InfoArgs),
    /// Start instances.
    #[command(after_long_help = "Example:\n  skiff start web db")]
    Start(NamesArgs),
    /// Stop instances.
    #[command(after_long_help = "Examples:\n  skiff stop web\n  skiff stop --force --timeout 5 web")]
    Stop(StopArgs),
    /// Restart instances.
    #[command(after_long_help = "Example:\n  skiff restart web")]
    Restart(StopArgs),
    /// Pause (freeze) running instances; `start` resumes them.
    #[command(
        visible_alias = "freeze",
        after_long_help = "Examples:\n  skiff pause web\n  skiff start web   # resumes it"
    )]
    Pause(NamesArgs),
    /// Delete instances (--force stops running ones first).
    #[command(visible_alias = "rm", after_long_help = "Examples:\n  skiff delete web\n  skiff delete --force web db")]
    Delete(DeleteArgs),
    /// Run a command in an instance.
    ///
    /// With a terminal on stdin and stdout the command gets a TTY (interactive), else pipes; the
    /// exit code is the command's.
    #[command(
        after_long_help = "Examples:\n  skiff exec web -- sh\n  skiff exec web --env A=1 --cwd /tmp -- sh -c 'echo $A'\n  echo hi | skiff exec web -- cat"
    )]
    Exec(ExecArgs),
    /// Attach to an instance's console (Ctrl+a q detaches), or show its log.
    #[command(after_long_help = "Examples:\n  skiff console web\n  skiff console web --show-log")]
    Console(ConsoleArgs),
    /// Copy files to and from instances.
    #[command(subcommand)]
    File(FileCmd),
    /// Manage instance snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Copy an instance's snapshot into a new instance (stopped).
    ///
    /// From a stateful snapshot the copy takes its memory state too: its
    /// first start restores the saved VM (processes and all) instead of
    /// booting, with its own NIC, MAC and address. --stateless copies only
    /// the disk.
    #[command(after_long_help = "Examples:
  skiff copy web/warm web2 && skiff start web2
  skiff copy web/snap0 web3 --stateless")]
    Copy {
        /// The source: NAME/SNAP.
        source: String,
        /// The new instance's name.
        name: String,
        /// Copy only the disk of a stateful snapshot.
        #[arg(long)]
        stateless: bool,
    },
    /// Show and change instance configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage images in skiffd's store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage image remotes (OCI registries).
    #[command(subcommand)]
    Remote(RemoteCmd),
    /// List, show and cancel background operations.
    #[command(subcommand)]
    Operation(OperationCmd),
    /// Print skiffd's events as they happen.
    #[command(after_long_help = "Examples:\n  skiff monitor\n  skiff monitor --type lifecycle --format json")]
    Monitor(MonitorArgs),
    /// Show networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Print a shell completion script.
    #[command(after_long_help = "Example:\n  skiff completion bash > /etc/bash_completion.d/skiff")]
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Parses `KEY=VALUE`.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got \"{s}\"")),
    }
}

/// `launch` and `init`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image.
    pub image: String,
    /// The instance's name (skiffd picks one when absent).
    pub name: Option<String>,
    /// A virtual machine (a thin VM for an OCI image).
    #[arg(long, conflicts_with = "container")]
    pub vm: bool,
    /// A native container through LXC (the default).
    #[arg(long)]
    pub container: bool,
    /// A config key (repeatable).
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub config: Vec<(String, String)>,
    /// Delete the instance when it stops.
    #[arg(short = 'e', long)]
    pub ephemeral: bool,
    /// A description.
    #[arg(long)]
    pub description: Option<String>,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Filters (name prefix or KEY=VALUE).
    pub filter: Vec<String>,
    /// Output format.
    #[arg(short = 'f', long, value_enum, default_value = "table")]
    pub format: Format,
    /// Columns.
    #[arg(short = 'c', long, default_value = "ns4tS")]
    pub columns: String,
}

/// `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The instance.
    pub name: String,
    /// Print the console log too.
    #[arg(long)]
    pub show_log: bool,
}

/// Instance names.
#[derive(Debug, Args)]
pub struct NamesArgs {
    /// The instances.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `stop` and `restart`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The instances.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Kill instead of a clean shutdown.
    #[arg(short, long)]
    pub force: bool,
    /// Seconds a clean shutdown may take.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<i64>,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The instances.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Stop running instances first.
    #[arg(short, long)]
    pub force: bool,
}

/// `exec --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecMode {
    /// Interactive when stdin and stdout are terminals.
    Auto,
    /// A TTY.
    Interactive,
    /// Pipes.
    NonInteractive,
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The instance.
    pub name: String,
    /// An environment variable (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// uid to run as.
    #[arg(long, value_name = "UID")]
    pub user: Option<u32>,
    /// gid to run as.
    #[arg(long, value_name = "GID")]
    pub group: Option<u32>,
    /// Force a TTY (--mode interactive).
    #[arg(short = 't', long = "force-interactive", conflicts_with_all = ["force_noninteractive", "mode"])]
    pub force_interactive: bool,
    /// Force pipes (--mode non-interactive).
    #[arg(short = 'T', long = "force-noninteractive", conflicts_with = "mode")]
    pub force_noninteractive: bool,
    /// Terminal mode.
    #[arg(long, value_enum)]
    pub mode: Option<ExecMode>,
    /// Do not read stdin (the command sees EOF).
    #[arg(short = 'n', long)]
    pub disable_stdin: bool,
    /// The command and its arguments (after --).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl ExecArgs {
    /// Whether to ask for a TTY, given whether stdin and stdout are terminals.
    pub fn interactive(&self, ttys: bool) -> bool {
        match (self.force_interactive, self.force_noninteractive, self.mode) {
            (true, _, _) | (_, _, Some(ExecMode::Interactive)) => true,
            (_, true, _) | (_, _, Some(ExecMode::NonInteractive)) => false,
            _ => ttys,
        }
    }
}

/// `console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The instance.
    pub name: String,
    /// Print the console log instead of attaching.
    #[arg(long)]
    pub show_log: bool,
}

/// `file`.
#[derive(Debug, Subcommand)]
pub enum FileCmd {
    /// Copy local files into an instance.
    #[command(
        after_long_help = "Examples:\n  skiff file push app.conf web/etc/app/\n  skiff file push -r -p ./site web/srv/www\n  skiff file push --mode 0600 key web/root/key"
    )]
    Push {
        /// SRC... then NAME/PATH.
        #[arg(required = true, num_args = 2.., value_name = "SRC... NAME/PATH")]
        paths: Vec<String>,
        /// Copy directories recursively.
        #[arg(short, long)]
        recursive: bool,
        /// Create missing parent directories.
        #[arg(short = 'p', long)]
        create_dirs: bool,
        /// Owner uid.
        #[arg(long)]
        uid: Option<u32>,
        /// Owner gid.
        #[arg(long)]
        gid: Option<u32>,
        /// Mode in octal (default: the local file's).
        #[arg(long)]
        mode: Option<String>,
    },
    /// Copy files out of an instance ("-" as DEST: stdout).
    #[command(
        after_long_help = "Examples:\n  skiff file pull web/etc/hosts .\n  skiff file pull -r web/var/log ./logs\n  skiff file pull web/etc/os-release -"
    )]
    Pull {
        /// NAME/PATH... then DEST.
        #[arg(required = true, num_args = 2.., value_name = "NAME/PATH... DEST")]
        paths: Vec<String>,
        /// Copy directories recursively.
        #[arg(short, long)]
        recursive: bool,
        /// Create missing local parent directories.
        #[arg(short = 'p', long)]
        create_dirs: bool,
    },
    /// Delete files in an instance.
    #[command(after_long_help = "Example:\n  skiff file delete web/tmp/x")]
    Delete {
        /// NAME/PATH...
        #[arg(required = true)]
        targets: Vec<String>,
    },
}

/// `snapshot`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot (skiffd names it snapN when SNAP is absent).
    #[command(
        after_long_help = "Examples:\n  skiff snapshot create web before-upgrade\n  skiff snapshot create web warm --stateful"
    )]
    Create {
        /// The instance.
        name: String,
        /// The snapshot's name.
        snap: Option<String>,
        /// Save the running VM's memory and device state too (VMs only;
        /// the VM is paused while it is saved).
        #[arg(long)]
        stateful: bool,
    },
    /// Restore an instance to a snapshot.
    #[command(
        after_long_help = "Examples:\n  skiff snapshot restore web before-upgrade\n  skiff snapshot restore web warm --stateful"
    )]
    Restore {
        /// The instance.
        name: String,
        /// The snapshot.
        snap: String,
        /// Restore the snapshot's memory state too: the VM runs on from
        /// where it was saved (a running one is stopped first).
        #[arg(long)]
        stateful: bool,
    },
    /// Delete a snapshot.
    #[command(after_long_help = "Example:\n  skiff snapshot delete web before-upgrade")]
    Delete {
        /// The instance.
        name: String,
        /// The snapshot.
        snap: String,
    },
    /// List an instance's snapshots.
    #[command(visible_alias = "ls", after_long_help = "Example:\n  skiff snapshot list web")]
    List {
        /// The instance.
        name: String,
        /// Output format.
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Rename a snapshot.
    #[command(after_long_help = "Example:\n  skiff snapshot rename web snap0 base")]
    Rename {
        /// The instance.
        name: String,
        /// Its current name.
        old: String,
        /// The new name.
        new: String,
    },
}

/// `config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print an instance's configuration as YAML.
    #[command(after_long_help = "Example:\n  skiff config show web --expanded")]
    Show {
        /// The instance.
        name: String,
        /// With the profiles applied.
        #[arg(long)]
        expanded: bool,
    },
    /// Print one config key.
    #[command(after_long_help = "Example:\n  skiff config get web limits.memory")]
    Get {
        /// The instance.
        name: String,
        /// The key.
        key: String,
    },
    /// Set config keys (KEY=VALUE... or KEY VALUE).
    #[command(
        after_long_help = "Examples:\n  skiff config set web limits.cpu=2 limits.memory=1GiB\n  skiff config set web environment.MODE prod"
    )]
    Set {
        /// The instance.
        name: String,
        /// KEY=VALUE... or KEY VALUE.
        #[arg(required = true)]
        args: Vec<String>,
    },
    /// Remove a config key.
    #[command(after_long_help = "Example:\n  skiff config unset web limits.cpu")]
    Unset {
        /// The instance.
        name: String,
        /// The key.
        key: String,
    },
    /// Edit the configuration in $EDITOR.
    #[command(after_long_help = "Example:\n  EDITOR=vi skiff config edit web")]
    Edit {
        /// The instance.
        name: String,
    },
    /// Manage an instance's devices (applied live to a running VM).
    #[command(subcommand)]
    Device(DeviceCmd),
}

/// `config device`.
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Add a device; a running VM gets it at once (hot-plug).
    #[command(after_long_help = "Examples:\n  skiff config device add web data disk source=/srv/data path=/data\n  \
skiff config device add web scratch disk source=/var/lib/images/scratch.img\n\n\
A disk whose source is a directory is shared with virtio-fs and mounted at path;\n\
one whose source is a file or block device is attached as a disk\n\
(/dev/disk/by-id/virtio-NAME in the guest). readonly=true makes either read-only.")]
    Add {
        /// The instance.
        name: String,
        /// The device's name.
        device: String,
        /// Its type (disk).
        #[arg(value_name = "TYPE")]
        kind: String,
        /// KEY=VALUE settings (source=, path=, readonly=).
        args: Vec<String>,
    },
    /// Remove a device; a running VM lets go of it first (unmount, eject).
    #[command(visible_alias = "rm", after_long_help = "Example:\n  skiff config device remove web data")]
    Remove {
        /// The instance.
        name: String,
        /// The device's name.
        device: String,
    },
    /// List an instance's devices.
    #[command(visible_alias = "ls", after_long_help = "Example:\n  skiff config device list web")]
    List {
        /// The instance.
        name: String,
    },
    /// Show an instance's devices with their settings (YAML).
    #[command(after_long_help = "Example:\n  skiff config device show web")]
    Show {
        /// The instance.
        name: String,
    },
}

/// `image`.
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List images.
    #[command(visible_alias = "ls", after_long_help = "Example:\n  skiff image list")]
    List {
        /// Output format.
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show an image (by alias or fingerprint prefix).
    #[command(after_long_help = "Example:\n  skiff image info busybox")]
    Info {
        /// Alias or fingerprint.
        image: String,
    },
    /// Delete images.
    #[command(visible_alias = "rm", after_long_help = "Example:\n  skiff image delete 3f2a1b")]
    Delete {
        /// Aliases or fingerprints.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Import a system image: a unified tarball (xz, gzip, zstd or plain
    /// tar) holding metadata.yaml and rootfs/ (`skiff launch ALIAS NAME`
    /// then boots it as a system container), or a disk image (qcow2 or
    /// raw) that `skiff launch --vm ALIAS NAME` boots as a full OS VM.
    #[command(after_long_help = "Examples:\n  skiff image import debian12.tar.xz --alias debian12\n  \
                                 skiff image import img.tar.gz --alias a --alias b --property description=\"my image\"\n  \
                                 skiff image import debian12.qcow2 --alias debian12-vm   (a disk: skiff launch --vm)\n  \
                                 skiff image import disk.img --format raw --alias os")]
    Import {
        /// The image: a system container tarball (metadata.yaml + rootfs/),
        /// or a VM's disk image (qcow2, or raw with --format raw) that
        /// `skiff launch --vm` boots through UEFI firmware.
        file: PathBuf,
        /// The file is a disk image in this format (`raw` or `qcow2`);
        /// without it a file that starts with the qcow2 magic is a qcow2
        /// disk and anything else must be a tarball. Recorded at import,
        /// never guessed again.
        #[arg(long, value_parser = ["raw", "qcow2"])]
        format: Option<String>,
        /// Aliases to give it.
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Properties that override the image's (KEY=VALUE).
        #[arg(long = "property", value_parser = parse_kv)]
        properties: Vec<(String, String)>,
    },
    /// Manage image aliases.
    #[command(subcommand)]
    Alias(AliasCmd),
}

/// `image alias`.
#[derive(Debug, Subcommand)]
pub enum AliasCmd {
    /// Create an alias.
    #[command(after_long_help = "Example:\n  skiff image alias create web-base 3f2a1b")]
    Create {
        /// The alias.
        alias: String,
        /// The image's fingerprint.
        fingerprint: String,
        /// A description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete an alias.
    #[command(visible_alias = "rm", after_long_help = "Example:\n  skiff image alias delete web-base")]
    Delete {
        /// The alias.
        alias: String,
    },
    /// List aliases.
    #[command(visible_alias = "ls", after_long_help = "Example:\n  skiff image alias list")]
    List {
        /// Output format.
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// `remote`.
#[derive(Debug, Subcommand)]
pub enum RemoteCmd {
    /// Add an OCI registry (https unless the URL says http://).
    #[command(
        after_long_help = "Examples:\n  skiff remote add lan http://127.0.0.1:5000 --protocol oci\n  echo $TOKEN | skiff remote add gh ghcr.io --protocol oci --username me --password-stdin"
    )]
    Add {
        /// The remote's name.
        name: String,
        /// Its URL.
        url: String,
        /// The protocol (oci).
        #[arg(long, default_value = "oci")]
        protocol: String,
        /// User name.
        #[arg(long)]
        username: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List remotes.
    #[command(visible_alias = "ls", after_long_help = "Example:\n  skiff remote list")]
    List {
        /// Output format.
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Remove a remote.
    #[command(visible_alias = "rm", after_long_help = "Example:\n  skiff remote remove lan")]
    Remove {
        /// The remote.
        name: String,
    },
    /// Make a remote the default for bare image names ("local": skiffd decides).
    #[command(after_long_help = "Examples:\n  skiff remote switch lan\n  skiff remote switch local")]
    Switch {
        /// The remote.
        name: String,
    },
}

/// `operation`.
#[derive(Debug, Subcommand)]
pub enum OperationCmd {
    /// List operations.
    #[command(visible_alias = "ls", after_long_help = "Example:\n  skiff operation list")]
    List {
        /// Output format.
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show an operation as YAML.
    #[command(after_long_help = "Example:\n  skiff operation show 9fa20e74-aa7f-479a-bcea-77b979e0f462")]
    Show {
        /// Its id.
        id: String,
    },
    /// Cancel an operation.
    #[command(after_long_help = "Example:\n  skiff operation cancel 9fa20e74-aa7f-479a-bcea-77b979e0f462")]
    Cancel {
        /// Its id.
        id: String,
    },
}

/// Event kinds for `monitor --type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventKind {
    /// Instances created, started, stopped, ...
    Lifecycle,
    /// Operations changing.
    Operation,
    /// skiffd's log.
    Logging,
}

/// `monitor --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventFormat {
    /// YAML documents.
    Yaml,
    /// One JSON object per line.
    Json,
}

/// `monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Event kinds (repeatable; default: all).
    #[arg(long = "type", value_enum)]
    pub kinds: Vec<EventKind>,
    /// Output format.
    #[arg(short = 'f', long, value_enum, default_value = "yaml")]
    pub format: EventFormat,
}

/// `network`.
#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// List networks.
    #[command(visible_alias = "ls", after_long_help = "Example:\n  skiff network list")]
    List {
        /// Output format.
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show a network and its DHCP leases.
    #[command(after_long_help = "Example:\n  skiff network info skiffbr0")]
    Info {
        /// The network.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("skiff").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn exec_args() {
        let Command::Exec(e) = parse(&["exec", "web", "--env", "A=1", "--", "sh", "-c", "x"]).command else { panic!() };
        assert_eq!((e.name.as_str(), e.command.clone()), ("web", vec!["sh".into(), "-c".into(), "x".into()]));
        assert_eq!(e.env, vec![("A".into(), "1".into())]);
        assert!(e.interactive(true) && !e.interactive(false));
        let Command::Exec(e) = parse(&["exec", "-T", "web", "ls", "-la"]).command else { panic!() };
        assert_eq!(e.command, vec!["ls".to_string(), "-la".to_string()]);
        assert!(!e.interactive(true));
        let Command::Exec(e) = parse(&["exec", "web", "--mode", "interactive", "--", "sh"]).command else { panic!() };
        assert!(e.interactive(false));
        assert!(Cli::try_parse_from(["skiff", "exec", "web"]).is_err());
        assert!(Cli::try_parse_from(["skiff", "exec", "-t", "-T", "web", "--", "sh"]).is_err());
    }

    #[test]
    fn launch_args() {
        let Command::Launch(c) = parse(&["launch", "--vm", "busybox", "b1", "-c", "a=b", "-c", "c=d=e"]).command else {
            panic!()
        };
        assert_eq!((c.image.as_str(), c.name.as_deref(), c.vm), ("busybox", Some("b1"), true));
        assert_eq!(c.config, vec![("a".into(), "b".into()), ("c".into(), "d=e".into())]);
        assert!(Cli::try_parse_from(["skiff", "launch", "x", "-c", "novalue"]).is_err());
        assert!(Cli::try_parse_from(["skiff", "launch", "--vm", "--container", "x"]).is_err());
    }

    #[test]
    fn other_args() {
        let cli = parse(&["--socket", "/tmp/s", "ls", "-f", "csv"]);
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/s")));
        assert!(matches!(cli.command, Command::List(ListArgs { format: Format::Csv, .. })));
        let Command::File(FileCmd::Push { paths, recursive, .. }) =
            parse(&["file", "push", "-r", "a", "b", "web/x"]).command
        else {
            panic!()
        };
        assert_eq!((paths.len(), recursive), (3, true));
        let Command::Stop(s) = parse(&["stop", "-f", "--timeout", "5", "a", "b"]).command else { panic!() };
        assert_eq!((s.names.len(), s.force, s.timeout), (2, true, Some(5)));
        Cli::command_for_tests().debug_assert();
    }

    impl Cli {
        fn command_for_tests() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
