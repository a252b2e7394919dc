//! OCI runtime bundles (`BUNDLE/config.json` and `BUNDLE/rootfs`, as
//! `skiff-oci pull` writes them): the main process and the root directory.

use std::path::{Path, PathBuf};

use skiff_agent_proto::{main_process_from_config, ExecRequest, MainProcess, OciError};

/// Errors of reading a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory does not exist.
    #[error("bundle {0} does not exist")]
    Missing(PathBuf),
    /// No config.json.
    #[error("bundle {0} has no config.json")]
    NoConfig(PathBuf, #[source] std::io::Error),
    /// No rootfs directory.
    #[error("bundle {0} has no rootfs directory")]
    NoRootfs(PathBuf),
    /// The config is not usable.
    #[error("bundle {0}: bad config.json")]
    Config(PathBuf, #[source] OciError),
}

/// A bundle's main process and rootfs.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory (absolute).
    pub dir: PathBuf,
    /// Its rootfs (absolute).
    pub rootfs: PathBuf,
    /// The process of its config.json.
    pub process: MainProcess,
}

impl Bundle {
    /// Reads the bundle at `dir`.
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = std::fs::canonicalize(dir).map_err(|_| BundleError::Missing(dir.into()))?;
        if !dir.is_dir() {
            return Err(BundleError::Missing(dir));
        }
        let config = std::fs::read(dir.join("config.json")).map_err(|e| BundleError::NoConfig(dir.clone(), e))?;
        let process = main_process_from_config(&config).map_err(|e| BundleError::Config(dir.clone(), e))?;
        let rootfs = dir.join("rootfs");
        if !rootfs.is_dir() {
            return Err(BundleError::NoRootfs(dir));
        }
        Ok(Bundle { dir, rootfs, process })
    }

    /// The main process as an exec request (stdio attached by the caller).
    pub fn exec_request(&self) -> ExecRequest {
        let p = &self.process;
        ExecRequest {
            argv: p.args.clone(),
            env: p.env.clone(),
            cwd: Some(p.cwd.clone()),
            user: Some(p.user.clone()),
            tty: None,
            stdin: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_process_and_rootfs_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b");
        assert!(matches!(Bundle::open(&b), Err(BundleError::Missing(_))));
        std::fs::create_dir(&b).unwrap();
        assert!(matches!(Bundle::open(&b), Err(BundleError::NoConfig(..))));
        std::fs::write(b.join("config.json"), br#"{"process":{"args":[]}}"#).unwrap();
        assert!(matches!(Bundle::open(&b), Err(BundleError::Config(..))));
        let cfg = r#"{"ociVersion":"1.0.2","process":{"args":["sh","-c","exit 7"],"env":["A=b"],"cwd":"/tmp",
                     "user":{"uid":1,"gid":2}},"hostname":"box"}"#;
        std::fs::write(b.join("config.json"), cfg).unwrap();
        assert!(matches!(Bundle::open(&b), Err(BundleError::NoRootfs(_))));
        std::fs::create_dir(b.join("rootfs")).unwrap();
        let bundle = Bundle::open(&b).unwrap();
        assert_eq!(bundle.rootfs, b.canonicalize().unwrap().join("rootfs"));
        let req = bundle.exec_request();
        assert_eq!(req.argv, ["sh", "-c", "exit 7"]);
        assert_eq!(req.cwd.as_deref(), Some("/tmp"));
        assert_eq!(req.user.map(|u| (u.uid, u.gid)), Some((1, 2)));
        assert!(req.env.contains(&"A=b".to_string()));
        assert_eq!(bundle.process.hostname.as_deref(), Some("box"));
    }
}
