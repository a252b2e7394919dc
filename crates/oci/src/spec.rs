//! The run spec an image implies: argv (entrypoint and cmd merged as Docker
//! does), environment, working directory, user (names resolved through the
//! image's own `/etc/passwd` and `/etc/group`), ports, volumes, stop signal
//! and labels; and its OCI runtime-spec form (`config.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::manifest::ImageConfig;

/// The `PATH` Docker gives images that set none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A run spec that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither entrypoint nor cmd (nor an override) gives a program.
    #[error("no command: the image has no entrypoint or cmd and none was given")]
    NoCommand,
    /// A user name missing from the image's `/etc/passwd`.
    #[error("user {0:?} not found in the image's /etc/passwd")]
    NoUser(String),
    /// A group name missing from the image's `/etc/group`.
    #[error("group {0:?} not found in the image's /etc/group")]
    NoGroup(String),
    /// A `user` field that is not `user`, `uid`, `user:group` or `uid:gid`.
    #[error("malformed user {0:?}")]
    BadUser(String),
    /// The image's `/etc/passwd` or `/etc/group` exists but cannot be used
    /// (not a regular file, too large, not UTF-8, a symlink loop).
    #[error("reading the image's /{path}")]
    ImageFile {
        /// `etc/passwd` or `etc/group`.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An environment entry without `=`.
    #[error("malformed environment entry {0:?} (KEY=value expected)")]
    BadEnv(String),
    /// The runtime spec could not be built or written.
    #[error("writing the runtime config {path}")]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: oci_spec::OciSpecError,
    },
}

/// What the user asks for on top of the image (like `docker run` flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces the entrypoint (and, as in Docker, drops the image's cmd).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the cmd.
    pub cmd: Option<Vec<String>>,
    /// `KEY=value` entries added or replacing the image's.
    pub env: Vec<String>,
    /// Replaces the working directory.
    pub workdir: Option<String>,
    /// Replaces the user.
    pub user: Option<String>,
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups from `/etc/group`.
    pub additional_gids: Vec<u32>,
    /// The name, when known.
    pub name: Option<String>,
    /// The home directory, when known.
    pub home: Option<String>,
}

/// How to run the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunSpec {
    /// argv.
    pub args: Vec<String>,
    /// `KEY=value`, image order, overrides last.
    pub env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
    /// The user.
    pub user: User,
    /// `80/tcp` style.
    pub exposed_ports: Vec<String>,
    /// Volume mount points.
    pub volumes: Vec<String>,
    /// Stop signal, if the image names one.
    pub stop_signal: Option<String>,
    /// Image labels.
    pub labels: BTreeMap<String, String>,
}

/// Merges entrypoint and cmd as Docker does: an overriding entrypoint
/// drops the image's cmd; an overriding cmd replaces only the cmd.
pub fn merge_args(
    entrypoint: Option<&[String]>,
    cmd: Option<&[String]>,
    over: &Overrides,
) -> Result<Vec<String>, SpecError> {
    let (ep, cmd): (&[String], &[String]) = match (&over.entrypoint, &over.cmd) {
        (Some(e), Some(c)) => (e, c),
        (Some(e), None) => (e, &[]),
        (None, Some(c)) => (entrypoint.unwrap_or(&[]), c),
        (None, None) => (entrypoint.unwrap_or(&[]), cmd.unwrap_or(&[])),
    };
    let args: Vec<String> = ep.iter().chain(cmd).cloned().collect();
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// Resolves a Docker `user` string against passwd and group file contents.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<User, SpecError> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if u.is_empty() && g.is_some() {
        return Err(SpecError::BadUser(spec.to_string()));
    }
    let u = if u.is_empty() { "0" } else { u };
    let entries: Vec<Vec<&str>> = parse_db(passwd, 7);
    let by_name = entries.iter().find(|e| e[0] == u);
    let numeric: Option<u32> = u.parse().ok();
    let entry =
        by_name.or_else(|| numeric.and_then(|n| entries.iter().find(|e| e[2].parse() == Ok(n))));
    let mut user = match (entry, numeric) {
        (Some(e), _) => User {
            uid: e[2]
                .parse()
                .map_err(|_| SpecError::BadUser(spec.to_string()))?,
            gid: e[3]
                .parse()
                .map_err(|_| SpecError::BadUser(spec.to_string()))?,
            additional_gids: Vec::new(),
            name: Some(e[0].to_string()),
            home: Some(e[5].to_string()).filter(|h| !h.is_empty()),
        },
        (None, Some(n)) => User {
            uid: n,
            gid: 0,
            additional_gids: Vec::new(),
            name: None,
            home: None,
        },
        (None, None) => return Err(SpecError::NoUser(u.to_string())),
    };
    let groups = parse_db(group, 4);
    if let Some(g) = g {
        user.gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|e| e[0] == g)
                .and_then(|e| e[2].parse().ok())
                .ok_or_else(|| SpecError::NoGroup(g.to_string()))?,
        };
    }
    if let Some(name) = &user.name {
        for e in &groups {
            let Ok(gid) = e[2].parse::<u32>() else {
                continue;
            };
            if gid != user.gid
                && e[3].split(',').any(|m| m.trim() == name)
                && !user.additional_gids.contains(&gid)
            {
                user.additional_gids.push(gid);
            }
        }
    }
    Ok(user)
}

/// A file of the image read safely ([`crate::unpack::read_in_root`]); one
/// that is absent reads as empty.
fn image_file(rootfs: &Path, path: &'static str) -> Result<String, SpecError> {
    match crate::unpack::read_in_root(rootfs, Path::new(path)) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(SpecError::ImageFile { path, source }),
    }
}

fn parse_db(text: &str, fields: usize) -> Vec<Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.splitn(fields, ':').collect::<Vec<_>>())
        .filter(|f| f.len() == fields)
        .collect()
}

/// Builds the run spec from an image config and its unpacked rootfs.
pub fn run_spec(
    config: &ImageConfig,
    rootfs: &Path,
    over: &Overrides,
) -> Result<RunSpec, SpecError> {
    let cc = config.config.clone().unwrap_or_default();
    // An image without a command (a data or base image) still makes a
    // bundle; whoever launches it must supply one (`RunSpec::command`).
    let args = match merge_args(cc.entrypoint.as_deref(), cc.cmd.as_deref(), over) {
        Err(SpecError::NoCommand) => Vec::new(),
        other => other?,
    };
    let user_spec = over.user.clone().or(cc.user.clone()).unwrap_or_default();
    let passwd = image_file(rootfs, "etc/passwd")?;
    let group = image_file(rootfs, "etc/group")?;
    let user = resolve_user(&user_spec, &passwd, &group)?;
    let mut env: Vec<String> = Vec::new();
    for e in cc.env.iter().flatten().chain(&over.env) {
        let Some((k, _)) = e.split_once('=') else {
            return Err(SpecError::BadEnv(e.clone()));
        };
        env.retain(|x| x.split_once('=').map(|(xk, _)| xk) != Some(k));
        env.push(e.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home.as_deref().unwrap_or("/")));
    }
    let wd = over
        .workdir
        .clone()
        .or(cc.working_dir.clone())
        .unwrap_or_default();
    let cwd = match crate::unpack::clean(Path::new(&wd)) {
        Some(p) => format!("/{}", p.display()),
        None => "/".to_string(),
    };
    Ok(RunSpec {
        args,
        env,
        cwd,
        user,
        exposed_ports: cc.exposed_ports.unwrap_or_default().into_keys().collect(),
        volumes: cc.volumes.unwrap_or_default().into_keys().collect(),
        stop_signal: cc.stop_signal,
        labels: cc.labels.unwrap_or_default(),
    })
}

impl RunSpec {
    /// The argv, or [`SpecError::NoCommand`] when the image names none.
    pub fn command(&self) -> Result<&[String], SpecError> {
        if self.args.is_empty() {
            return Err(SpecError::NoCommand);
        }
        Ok(&self.args)
    }

    /// The OCI runtime-spec document for a bundle whose rootfs is `rootfs`
    /// beside it. Labels, ports, volumes and the stop signal go into
    /// annotations (`org.opencontainers.image.*` where the image spec names
    /// one).
    pub fn to_runtime_spec(
        &self,
        image_name: &str,
    ) -> Result<oci_spec::runtime::Spec, oci_spec::OciSpecError> {
        use oci_spec::runtime::{ProcessBuilder, RootBuilder, Spec, UserBuilder};
        let mut user = UserBuilder::default().uid(self.user.uid).gid(self.user.gid);
        if !self.user.additional_gids.is_empty() {
            user = user.additional_gids(self.user.additional_gids.clone());
        }
        if let Some(n) = &self.user.name {
            user = user.username(n.clone());
        }
        let process = ProcessBuilder::default()
            .terminal(false)
            .user(user.build()?)
            .args(self.args.clone())
            .env(self.env.clone())
            .cwd(self.cwd.clone())
            .no_new_privileges(true)
            .build()?;
        let mut spec = Spec::default();
        spec.set_process(Some(process));
        spec.set_root(Some(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()?,
        ));
        let mut ann: std::collections::HashMap<String, String> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        ann.insert(
            "org.opencontainers.image.ref.name".into(),
            image_name.to_string(),
        );
        if let Some(s) = &self.stop_signal {
            ann.insert("org.opencontainers.image.stopSignal".into(), s.clone());
        }
        if !self.exposed_ports.is_empty() {
            ann.insert(
                "org.opencontainers.image.exposedPorts".into(),
                self.exposed_ports.join(","),
            );
        }
        if !self.volumes.is_empty() {
            ann.insert("dev.skiff.image.volumes".into(), self.volumes.join(","));
        }
        spec.set_annotations(Some(ann));
        spec.set_hostname(Some("skiff".into()));
        Ok(spec)
    }

    /// Writes `config.json` into `bundle`.
    pub fn write_runtime_spec(&self, bundle: &Path, image_name: &str) -> Result<(), SpecError> {
        let path = bundle.join("config.json");
        let wrap = |source| SpecError::Write {
            path: path.clone(),
            source,
        };
        let spec = self.to_runtime_spec(image_name).map_err(wrap)?;
        spec.save(&path).map_err(wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ContainerConfig;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn entrypoint_and_cmd_like_docker() {
        let ep = v(&["/docker-entrypoint.sh"]);
        let cmd = v(&["nginx", "-g", "daemon off;"]);
        let none = Overrides::default();
        assert_eq!(
            merge_args(Some(&ep), Some(&cmd), &none).unwrap(),
            v(&["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])
        );
        assert_eq!(merge_args(None, Some(&cmd), &none).unwrap(), cmd);
        assert_eq!(merge_args(Some(&ep), None, &none).unwrap(), ep);
        let c = Overrides {
            cmd: Some(v(&["sh"])),
            ..Default::default()
        };
        assert_eq!(
            merge_args(Some(&ep), Some(&cmd), &c).unwrap(),
            v(&["/docker-entrypoint.sh", "sh"])
        );
        let e = Overrides {
            entrypoint: Some(v(&["/bin/sh", "-c"])),
            ..Default::default()
        };
        assert_eq!(
            merge_args(Some(&ep), Some(&cmd), &e).unwrap(),
            v(&["/bin/sh", "-c"])
        );
        let ec = Overrides {
            entrypoint: Some(v(&["env"])),
            cmd: Some(v(&["-i"])),
            ..Default::default()
        };
        assert_eq!(
            merge_args(Some(&ep), Some(&cmd), &ec).unwrap(),
            v(&["env", "-i"])
        );
        assert!(matches!(
            merge_args(None, None, &none),
            Err(SpecError::NoCommand)
        ));
        assert!(matches!(
            merge_args(Some(&[]), Some(&[]), &none),
            Err(SpecError::NoCommand)
        ));
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# comment\nwww:x:33:33:www:/var/www:/bin/false\nnginx:x:101:101::/nonexistent:/bin/false\n";
    const GROUP: &str =
        "root:x:0:\nwww:x:33:\nnginx:x:101:\naudio:x:29:nginx,www\nvideo:x:44:www\n";

    #[test]
    fn users_resolved_through_the_image() {
        let r = |s| resolve_user(s, PASSWD, GROUP);
        let root = r("").unwrap();
        assert_eq!(
            (root.uid, root.gid, root.home.as_deref()),
            (0, 0, Some("/root"))
        );
        let www = r("www").unwrap();
        assert_eq!((www.uid, www.gid), (33, 33));
        assert_eq!(www.additional_gids, vec![29, 44]);
        assert_eq!(r("33").unwrap(), www);
        let ng = r("nginx:audio").unwrap();
        assert_eq!(
            (ng.uid, ng.gid, ng.additional_gids.clone()),
            (101, 29, vec![])
        );
        assert_eq!(
            (r("nginx:7").unwrap().gid, r("www:video").unwrap().gid),
            (7, 44)
        );
        let anon = r("1234:5678").unwrap();
        assert_eq!((anon.uid, anon.gid, anon.name), (1234, 5678, None));
        assert_eq!(r("1234").unwrap().gid, 0);
        assert!(matches!(r("nobody"), Err(SpecError::NoUser(u)) if u == "nobody"));
        assert!(matches!(r("www:nogroup"), Err(SpecError::NoGroup(g)) if g == "nogroup"));
        assert!(matches!(r(":5"), Err(SpecError::BadUser(_))));
    }

    #[test]
    fn run_spec_from_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(dir.path().join("etc/group"), GROUP).unwrap();
        let cfg = ImageConfig {
            config: Some(ContainerConfig {
                user: Some("www".into()),
                env: Some(v(&["A=1", "B=2"])),
                cmd: Some(v(&["httpd"])),
                working_dir: Some("srv/../app".into()),
                exposed_ports: Some([("80/tcp".to_string(), serde_json::json!({}))].into()),
                volumes: Some([("/data".to_string(), serde_json::json!({}))].into()),
                stop_signal: Some("SIGQUIT".into()),
                labels: Some([("k".to_string(), "v".to_string())].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let over = Overrides {
            env: v(&["B=3"]),
            ..Default::default()
        };
        let rs = run_spec(&cfg, dir.path(), &over).unwrap();
        assert_eq!(rs.args, v(&["httpd"]));
        assert_eq!(rs.command().unwrap(), &v(&["httpd"])[..]);
        let bare = ImageConfig::default();
        let rs0 = run_spec(&bare, dir.path(), &Overrides::default()).unwrap();
        assert!(matches!(rs0.command(), Err(SpecError::NoCommand)));
        assert_eq!((rs0.user.uid, rs0.cwd.as_str()), (0, "/"));
        assert_eq!(
            rs.env,
            v(&[
                &format!("PATH={DEFAULT_PATH}"),
                "A=1",
                "B=3",
                "HOME=/var/www"
            ])
        );
        assert_eq!(rs.cwd, "/app");
        assert_eq!((rs.user.uid, rs.user.gid), (33, 33));
        assert_eq!(rs.exposed_ports, v(&["80/tcp"]));
        assert_eq!(rs.stop_signal.as_deref(), Some("SIGQUIT"));
        rs.write_runtime_spec(dir.path(), "x").unwrap();
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(j["process"]["args"], serde_json::json!(["httpd"]));
        assert_eq!(j["process"]["user"]["uid"], 33);
        assert_eq!(
            j["process"]["user"]["additionalGids"],
            serde_json::json!([29, 44])
        );
        assert_eq!(j["process"]["cwd"], "/app");
        assert_eq!(j["root"]["path"], "rootfs");
        assert_eq!(
            j["annotations"]["org.opencontainers.image.stopSignal"],
            "SIGQUIT"
        );
        assert_eq!(j["annotations"]["k"], "v");
        // A passwd that is a symlink out of the rootfs is read inside it.
        std::fs::remove_file(dir.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("etc/passwd")).unwrap();
        // Inside the rootfs that link points at itself: a loop, said so.
        let e = run_spec(&cfg, dir.path(), &over).unwrap_err();
        assert!(
            matches!(&e, SpecError::ImageFile { source, .. } if source.raw_os_error() == Some(libc::ELOOP)),
            "{e:?}"
        );
        // One to a host file the rootfs lacks finds nothing.
        std::fs::remove_file(dir.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("etc/passwd")).unwrap();
        let e = run_spec(&cfg, dir.path(), &over).unwrap_err();
        assert!(matches!(e, SpecError::NoUser(_)), "{e}");
    }
}
