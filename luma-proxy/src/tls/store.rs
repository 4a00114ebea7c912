//! Certificates and ACME accounts on disk, in the state volume.
//!
//! ```text
//! <state>/tls/                                  0700
//!   accounts/<sha256 of directory URL>.json      ACME account (credentials, key included)
//!   orders/<host>.json                           when orders were placed for a host
//!   projects/<project>/acme-account.pem          the project's shared ACME account key
//!   projects/<project>/hosts/<host>/             one ACME host
//!     chain.pem  key.pem  meta.json
//!   projects/<project>/custom/<sha256>/          one custom certificate
//!     chain.pem  key.pem
//! ```
//!
//! Files are 0600 and directories 0700, every file written atomically (temp file, fsync,
//! rename, fsync of the directory), so a crash leaves the old file or the new one; a write
//! that fails removes its temp file (it may hold key bytes). A chain and
//! its key are two files: a crash between them leaves a pair whose key does not match, which a
//! load refuses (see `certs`), so the worst case is one more order. Certificates live under
//! their project's directory: a host that moves to another project never inherits the other
//! project's key. The order history is per host and outside the projects: the hourly cap is the
//! CA's limit per name, so moving a host to another project must not reset it.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// What the proxy remembers about one ACME host between restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostMeta {
    /// `acme`.
    pub source: String,
    /// The directory the certificate came from.
    pub directory: Option<String>,
    pub sha256: Option<String>,
    pub issuer: Option<String>,
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    /// When renewal is due for the certificate `sha256` (a point drawn in ARI's window, or
    /// one third of the lifetime left).
    pub renew_at: Option<u64>,
    /// ARI's suggested window (start, end) that `renew_at` was drawn in: drawn again only
    /// when the CA's window changes.
    pub ari_window: Option<(u64, u64)>,
    /// When to ask ARI again.
    pub ari_next_check: Option<u64>,
    /// The challenge type that worked last (`http-01` or `tls-alpn-01`), tried first next time.
    pub challenge: Option<String>,
    /// Failed orders in a row: the backoff's exponent.
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_attempt: Option<u64>,
}

/// When orders were placed for one host (Unix seconds, the last hour's only): the hourly cap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrderHistory {
    pub orders: Vec<u64>,
}

pub struct Store {
    root: PathBuf,
}

/// A name used as one path component: a validated host, project or hex digest. Anything else
/// (a separator, a leading dot) is refused rather than joined.
fn component(s: &str) -> Result<&str, String> {
    if s.is_empty() || s.starts_with('.') || s.contains('/') || s.contains('\0') {
        return Err(format!("{s:?} cannot name a directory"));
    }
    Ok(s)
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            root: state_dir.join("tls"),
        }
    }

    fn host_dir(&self, project: &str, host: &str) -> Result<PathBuf, String> {
        Ok(self
            .root
            .join("projects")
            .join(component(project)?)
            .join("hosts")
            .join(component(host)?))
    }

    fn custom_dir(&self, project: &str, sha256: &str) -> Result<PathBuf, String> {
        Ok(self
            .root
            .join("projects")
            .join(component(project)?)
            .join("custom")
            .join(component(sha256)?))
    }

    fn account_path(&self, directory: &str) -> PathBuf {
        let id = super::certs::sha256_hex(directory.as_bytes());
        self.root
            .join("accounts")
            .join(format!("{}.json", &id[..32]))
    }

    /// The stored ACME account for `directory`, as JSON.
    pub fn account(&self, directory: &str) -> Option<String> {
        read_string(&self.account_path(directory)).ok().flatten()
    }

    pub fn save_account(&self, directory: &str, json: &str) -> Result<(), String> {
        write_atomic(&self.account_path(directory), json.as_bytes())
    }

    pub fn forget_account(&self, directory: &str) {
        let _ = std::fs::remove_file(self.account_path(directory));
    }

    /// Where a project's shared ACME account key (PKCS#8 PEM) is kept.
    pub fn account_key_path(&self, project: &str) -> Result<PathBuf, String> {
        Ok(self
            .root
            .join("projects")
            .join(component(project)?)
            .join("acme-account.pem"))
    }

    /// The project's shared ACME account key, as PEM (none stored: `None`). `Err` names the
    /// file, never its content.
    pub fn account_key(&self, project: &str) -> Result<Option<String>, String> {
        read_string(&self.account_key_path(project)?)
    }

    pub fn save_account_key(&self, project: &str, pem: &str) -> Result<(), String> {
        write_atomic(&self.account_key_path(project)?, pem.as_bytes())
    }

    fn orders_path(&self, host: &str) -> Result<PathBuf, String> {
        Ok(self
            .root
            .join("orders")
            .join(format!("{}.json", component(host)?)))
    }

    /// A host's order history (none yet: empty). `Err` when the file exists but cannot be
    /// read or parsed: the caller must then assume the cap may be used up, not reset it.
    pub fn order_history(&self, host: &str) -> Result<OrderHistory, String> {
        match read_string(&self.orders_path(host)?)? {
            None => Ok(OrderHistory::default()),
            Some(s) => {
                serde_json::from_str(&s).map_err(|e| format!("order history of {host}: {e}"))
            }
        }
    }

    pub fn save_order_history(&self, host: &str, h: &OrderHistory) -> Result<(), String> {
        let body = serde_json::to_vec(h).map_err(|e| format!("encode order history: {e}"))?;
        write_atomic(&self.orders_path(host)?, &body)
    }

    /// An ACME host's chain and key PEM, if both are stored.
    pub fn host_cert(&self, project: &str, host: &str) -> Option<(String, String)> {
        let d = self.host_dir(project, host).ok()?;
        let chain = read_string(&d.join("chain.pem")).ok().flatten()?;
        let key = read_string(&d.join("key.pem")).ok().flatten()?;
        Some((chain, key))
    }

    pub fn host_meta(&self, project: &str, host: &str) -> HostMeta {
        let Ok(d) = self.host_dir(project, host) else {
            return HostMeta::default();
        };
        match read_string(&d.join("meta.json")) {
            Ok(Some(s)) => serde_json::from_str(&s).unwrap_or_else(|e| {
                crate::log::warn(
                    "certificate meta unreadable; starting afresh",
                    serde_json::json!({"project": project, "host": host, "error": e.to_string()}),
                );
                HostMeta::default()
            }),
            _ => HostMeta::default(),
        }
    }

    pub fn save_host_meta(&self, project: &str, host: &str, meta: &HostMeta) -> Result<(), String> {
        let d = self.host_dir(project, host)?;
        let body = serde_json::to_vec_pretty(meta).map_err(|e| format!("encode meta: {e}"))?;
        write_atomic(&d.join("meta.json"), &body)
    }

    /// Stores a newly issued chain and key (the key first: see the module docs).
    pub fn save_host_cert(
        &self,
        project: &str,
        host: &str,
        chain: &str,
        key: &str,
    ) -> Result<(), String> {
        let d = self.host_dir(project, host)?;
        write_atomic(&d.join("key.pem"), key.as_bytes())?;
        write_atomic(&d.join("chain.pem"), chain.as_bytes())
    }

    pub fn custom_cert(&self, project: &str, sha256: &str) -> Option<(String, String)> {
        let d = self.custom_dir(project, sha256).ok()?;
        let chain = read_string(&d.join("chain.pem")).ok().flatten()?;
        let key = read_string(&d.join("key.pem")).ok().flatten()?;
        Some((chain, key))
    }

    pub fn save_custom_cert(
        &self,
        project: &str,
        sha256: &str,
        chain: &str,
        key: &str,
    ) -> Result<(), String> {
        let d = self.custom_dir(project, sha256)?;
        write_atomic(&d.join("key.pem"), key.as_bytes())?;
        write_atomic(&d.join("chain.pem"), chain.as_bytes())
    }
}

impl Store {
    /// Deletes every stored custom certificate (key included) that `keep` does not name as
    /// (project, sha256): a replaced custom certificate's key does not stay on disk. Returns
    /// how many were deleted; failures are logged and left for the next commit.
    pub fn prune_custom(&self, keep: &std::collections::HashSet<(String, String)>) -> usize {
        let mut gone = 0;
        let Ok(projects) = std::fs::read_dir(self.root.join("projects")) else {
            return 0;
        };
        for project in projects.flatten() {
            let Ok(certs) = std::fs::read_dir(project.path().join("custom")) else {
                continue;
            };
            let p = project.file_name().to_string_lossy().into_owned();
            for cert in certs.flatten() {
                let sha = cert.file_name().to_string_lossy().into_owned();
                if keep.contains(&(p.clone(), sha.clone())) {
                    continue;
                }
                match std::fs::remove_dir_all(cert.path()) {
                    Ok(()) => gone += 1,
                    Err(e) => crate::log::warn(
                        "an unused custom certificate could not be deleted",
                        serde_json::json!({"project": p, "sha256": sha, "error": e.to_string()}),
                    ),
                }
            }
        }
        gone
    }
}

fn read_string(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("read {}: {e}", path.display())),
    }
}

/// Creates `dir` and its missing parents with mode 0700.
fn make_dirs(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))
}

/// Writes `body` to `path` atomically with mode 0600 (see the module docs).
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<(), String> {
    let dir = path.parent().ok_or("a file needs a directory")?;
    make_dirs(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A name of its own per write: two tasks writing the same file (a host's old task still
    // finishing while its new one starts) never write into one temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    crate::util::write_private_atomic(path, &tmp, body, "a certificate file")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_are_private_and_paths_are_checked() {
        let dir = std::env::temp_dir().join(format!("luma-store-{}", fastrand::u64(..)));
        let s = Store::new(&dir);
        s.save_host_cert("shop", "a.test", "CHAIN", "KEY").unwrap();
        let m = HostMeta {
            source: "acme".into(),
            renew_at: Some(7),
            ..HostMeta::default()
        };
        s.save_host_meta("shop", "a.test", &m).unwrap();
        assert_eq!(s.host_meta("shop", "a.test"), m);
        assert_eq!(
            s.host_cert("shop", "a.test"),
            Some(("CHAIN".into(), "KEY".into()))
        );
        assert_eq!(s.host_cert("other", "a.test"), None, "per project");
        let d = dir.join("tls/projects/shop/hosts/a.test");
        for f in ["chain.pem", "key.pem", "meta.json"] {
            assert_eq!(std::fs::metadata(d.join(f)).unwrap().mode() & 0o777, 0o600);
        }
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::metadata(dir.join("tls")).unwrap().mode() & 0o777,
            0o700
        );
        assert!(s.save_host_cert("shop", "../x", "C", "K").is_err());
        assert!(s.save_host_cert("a/b", "x.test", "C", "K").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn order_history_is_per_host_and_an_unreadable_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("luma-store-{}", fastrand::u64(..)));
        let s = Store::new(&dir);
        assert_eq!(s.order_history("a.test").unwrap(), OrderHistory::default());
        let h = OrderHistory { orders: vec![5, 6] };
        s.save_order_history("a.test", &h).unwrap();
        assert_eq!(s.order_history("a.test").unwrap(), h);
        std::fs::write(dir.join("tls/orders/a.test.json"), "{not json").unwrap();
        assert!(
            s.order_history("a.test").is_err(),
            "never read as no orders"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreferenced_custom_certificates_are_deleted() {
        let dir = std::env::temp_dir().join(format!("luma-store-{}", fastrand::u64(..)));
        let s = Store::new(&dir);
        s.save_custom_cert("shop", "aa", "C", "K").unwrap();
        s.save_custom_cert("shop", "bb", "C", "K").unwrap();
        s.save_custom_cert("blog", "aa", "C", "K").unwrap();
        let keep = [("shop".to_string(), "aa".to_string())]
            .into_iter()
            .collect();
        assert_eq!(s.prune_custom(&keep), 2);
        assert!(s.custom_cert("shop", "aa").is_some());
        assert!(s.custom_cert("shop", "bb").is_none());
        assert!(s.custom_cert("blog", "aa").is_none(), "per project");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("luma-store-{}", fastrand::u64(..)));
        // A non-empty directory where the file should go: the rename fails.
        let path = dir.join("key.pem");
        std::fs::create_dir_all(path.join("inside")).unwrap();
        let err = write_atomic(&path, b"SECRET KEY BYTES").unwrap_err();
        assert!(err.contains("rename"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "key.pem")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_writes_of_one_file_do_not_share_a_temp_file() {
        let dir = std::env::temp_dir().join(format!("luma-store-{}", fastrand::u64(..)));
        let path = dir.join("f.json");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let body = format!("{i}").repeat(4096);
                    for _ in 0..20 {
                        write_atomic(&path, body.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Whole writes only: one writer's body, never a mix.
        let got = std::fs::read_to_string(&path).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.chars().all(|c| got.starts_with(c)), "mixed writes");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
