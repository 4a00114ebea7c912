//! Routes survive restarts: the table is saved on every change and restored entry by entry.
//!
//! A save writes a temp file, fsyncs it, renames it over the old one and fsyncs the directory,
//! so a crash mid-write leaves either the old or the new file, never a torn one. On restore each
//! route is parsed and validated on its own: a bad entry is reported and skipped and never takes
//! the others down.
//!
//! A file that cannot be restored whole is never silently overwritten by the next save: before
//! anything else, its original bytes are preserved next to it as
//! `routes.json.corrupt-<UTC time>` (mode 0600). It is moved there when nothing in it was usable
//! and copied there when some routes were restored (the file still holds them until the next
//! save). Files are written with mode 0600.

use crate::route::RouteSpec;
use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub const ROUTES_FILE: &str = "routes.json";
const VERSION: u64 = 1;

pub struct StateStore {
    path: PathBuf,
    /// Serializes writers so an older table can never overwrite a newer one. Holds why saves
    /// are refused, when the file on disk could not be read or preserved: overwriting it
    /// would lose what it holds.
    write: Mutex<Option<String>>,
}

#[derive(Serialize)]
struct File<'a> {
    version: u64,
    routes: &'a [RouteSpec],
}

/// What a restore found: the good routes and one message per skipped entry.
#[derive(Debug, Default)]
pub struct Restored {
    pub routes: Vec<RouteSpec>,
    pub skipped: Vec<String>,
    /// Where the original file was preserved because not all of it could be restored. The
    /// path is also named in `skipped`, which the caller logs.
    pub set_aside: Option<PathBuf>,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            path: dir.join(ROUTES_FILE),
            write: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the whole table atomically. `routes` must be the table as of now; callers save
    /// after every install or removal.
    pub fn save(&self, routes: &[RouteSpec]) -> Result<(), String> {
        let w = self
            .write
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        if let Some(why) = w.as_ref() {
            return Err(why.clone());
        }
        let body = serde_json::to_vec_pretty(&File {
            version: VERSION,
            routes,
        })
        .map_err(|e| format!("encode routes: {e}"))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{ROUTES_FILE}.tmp"));
        crate::util::write_private_atomic(&self.path, &tmp, &body, "the routes")
    }

    fn refuse_saves(&self, why: String) {
        if let Ok(mut w) = self.write.lock() {
            *w = Some(why);
        }
    }

    /// Reads the saved routes. A missing file is an empty table. If anything in the file could
    /// not be restored, the file is first preserved (see the module docs).
    pub fn load(&self) -> Restored {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Restored::default(),
            Err(e) => {
                let why = format!(
                    "{} cannot be read ({e}); it is kept as it is and routes are not saved until it can be read (fix it, then restart the proxy)",
                    self.path.display()
                );
                self.refuse_saves(why.clone());
                return Restored {
                    skipped: vec![why],
                    ..Restored::default()
                };
            }
        };
        let origin = self.path.display().to_string();
        let mut out = match std::str::from_utf8(&bytes) {
            Ok(text) => parse(text, &origin),
            Err(e) => Restored {
                skipped: vec![format!(
                    "{origin} is not valid UTF-8 ({e}); starting with no routes"
                )],
                ..Restored::default()
            },
        };
        if out.skipped.is_empty() {
            return out;
        }
        let whole = out.routes.is_empty();
        match self.set_aside(&bytes, whole, SystemTime::now()) {
            Ok(aside) => {
                out.skipped.push(format!(
                    "the original {origin} was {} to {} (mode 0600); the next save writes a fresh {ROUTES_FILE}",
                    if whole { "moved" } else { "copied" },
                    aside.display()
                ));
                out.set_aside = Some(aside);
            }
            Err(e) => {
                let why = format!(
                    "could not preserve {origin} ({e}); routes are not saved until it is moved away by hand (then restart the proxy)"
                );
                self.refuse_saves(why.clone());
                out.skipped.push(why);
            }
        }
        out
    }

    /// Preserves the file as `routes.json.corrupt-<UTC time>`: renamed when nothing in it was
    /// usable (`whole`), otherwise a copy of `bytes` (what was read). Earlier evidence is never
    /// overwritten: a taken name gets a `-N` suffix.
    fn set_aside(&self, bytes: &[u8], whole: bool, now: SystemTime) -> Result<PathBuf, String> {
        let _w = self
            .write
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let base = format!("{ROUTES_FILE}.corrupt-{}", utc_stamp(now));
        let free = |p: &PathBuf| {
            std::fs::symlink_metadata(p).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        };
        let aside = (0..1000)
            .map(|i| match i {
                0 => dir.join(&base),
                i => dir.join(format!("{base}-{i}")),
            })
            .find(free)
            .ok_or_else(|| format!("no free name {base}-N in {}", dir.display()))?;
        let ctx = |what: &str, e: std::io::Error| format!("{what} {}: {e}", aside.display());
        if whole {
            // Private first, so the evidence is never readable by others under its new name.
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("chmod {}: {e}", self.path.display()))?;
            std::fs::rename(&self.path, &aside).map_err(|e| ctx("rename to", e))?;
        } else {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&aside)
                .map_err(|e| ctx("create", e))?;
            f.write_all(bytes).map_err(|e| ctx("write", e))?;
            f.sync_all().map_err(|e| ctx("fsync", e))?;
        }
        // The original is preserved once the rename or copy is done; a failed directory fsync
        // only makes that less durable, so it is logged, not treated as "not preserved".
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            crate::log::warn(
                "fsync of the state dir failed after setting routes.json aside",
                serde_json::json!({"dir": dir.display().to_string(), "error": e.to_string()}),
            );
        }
        Ok(aside)
    }
}

/// `20261128T083000Z`: a UTC time for file names, sortable and free of `:`.
fn utc_stamp(t: SystemTime) -> String {
    luma_api::time::stamp(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// Parses a state file, keeping every entry that is valid on its own.
pub fn parse(text: &str, origin: &str) -> Restored {
    let mut out = Restored::default();
    let doc: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            out.skipped.push(format!(
                "{origin} is not valid JSON ({e}); starting with no routes"
            ));
            return out;
        }
    };
    let Some(entries) = doc.get("routes").and_then(|r| r.as_array()) else {
        out.skipped.push(format!(
            "{origin} has no \"routes\" array; starting with no routes"
        ));
        return out;
    };
    for (i, entry) in entries.iter().enumerate() {
        let parsed = serde_json::from_value::<RouteSpec>(entry.clone())
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate());
        match parsed {
            Ok(spec) if spec.hosts.is_empty() => out
                .skipped
                .push(format!("{origin}: routes[{i}] has no hosts; skipped")),
            Ok(spec) => {
                let clash = out.routes.iter().any(|r| {
                    r.key() == spec.key() || r.hosts.iter().any(|h| spec.hosts.contains(h))
                });
                if clash {
                    out.skipped.push(format!(
                        "{origin}: routes[{i}] ({}) repeats a route or host; skipped",
                        spec.key()
                    ));
                } else {
                    out.routes.push(spec);
                }
            }
            Err(e) => out
                .skipped
                .push(format!("{origin}: routes[{i}] is invalid ({e}); skipped")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(project: &str, host: &str) -> RouteSpec {
        RouteSpec {
            project: project.into(),
            app: "web".into(),
            hosts: vec![host.into()],
            target: "web:3000".into(),
            network: String::new(),
            health: Default::default(),
            timeouts: Default::default(),
            limits: Default::default(),
            tls: None,
        }
        .validate()
        .unwrap()
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "luma-state-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempdir("rt");
        let store = StateStore::new(&dir);
        assert!(store.load().routes.is_empty());
        let routes = vec![spec("alpha", "alpha.test"), spec("beta", "beta.test")];
        store.save(&routes).unwrap();
        let back = store.load();
        assert_eq!(back.routes, routes);
        assert!(back.skipped.is_empty());
        assert!(!dir.join(format!(".{ROUTES_FILE}.tmp")).exists());
        assert_eq!(mode(store.path()), 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// The set-aside files in `dir`, sorted.
    fn aside_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{ROUTES_FILE}.corrupt-"))
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_wholly_corrupt_file_is_moved_aside_and_survives_the_next_save() {
        let dir = tempdir("corrupt");
        let store = StateStore::new(&dir);
        let originals: [&[u8]; 3] = [
            b"{\"version\":1,\"routes\":[{\"proj",
            b"\xff\xfe not even text",
            b"{\"version\":1}",
        ];
        let mut seen = Vec::new();
        for original in originals {
            std::fs::write(store.path(), original).unwrap();
            std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
            let r = store.load();
            assert!(r.routes.is_empty());
            let aside = r.set_aside.clone().expect("the file was set aside");
            assert_eq!(aside.parent(), Some(dir.as_path()));
            let name = aside.file_name().unwrap().to_string_lossy().into_owned();
            let stamp = name
                .strip_prefix("routes.json.corrupt-")
                .unwrap_or_else(|| panic!("{name}"));
            let stamp = &stamp[..16];
            assert!(
                stamp.len() == 16
                    && stamp.as_bytes()[8] == b'T'
                    && stamp.ends_with('Z')
                    && stamp[..8]
                        .bytes()
                        .chain(stamp[9..15].bytes())
                        .all(|b| b.is_ascii_digit()),
                "{name}"
            );
            assert!(
                r.skipped
                    .iter()
                    .any(|m| m.contains(&*aside.to_string_lossy())),
                "{:?}",
                r.skipped
            );
            assert!(!store.path().exists(), "moved, not copied");
            assert_eq!(std::fs::read(&aside).unwrap(), original);
            assert_eq!(mode(&aside), 0o600);
            seen.push(aside);
        }
        // Two loads within one second never overwrite each other's evidence.
        assert_eq!(aside_files(&dir), {
            let mut s = seen.clone();
            s.sort();
            s
        });
        let routes = vec![spec("alpha", "alpha.test")];
        store.save(&routes).unwrap();
        let back = store.load();
        assert_eq!(back.routes, routes);
        assert!(back.skipped.is_empty() && back.set_aside.is_none());
        for (aside, original) in seen.iter().zip(originals) {
            assert_eq!(std::fs::read(aside).unwrap(), original);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_partly_corrupt_file_is_copied_aside_and_its_good_routes_kept() {
        let dir = tempdir("partial");
        let store = StateStore::new(&dir);
        let good = serde_json::to_value(spec("alpha", "alpha.test")).unwrap();
        let original = serde_json::json!({
            "version": 1,
            "routes": [good, {"project": "Bad Name", "hosts": ["x.test"], "target": "web:3000"}]
        })
        .to_string();
        std::fs::write(store.path(), &original).unwrap();
        let r = store.load();
        assert_eq!(r.routes, vec![spec("alpha", "alpha.test")]);
        let aside = r.set_aside.clone().expect("the file was set aside");
        assert!(r.skipped.iter().any(|m| m.contains("routes[1]")));
        assert!(r
            .skipped
            .iter()
            .any(|m| m.contains("copied") && m.contains(&*aside.to_string_lossy())));
        assert_eq!(std::fs::read_to_string(store.path()).unwrap(), original);
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), original);
        assert_eq!(mode(&aside), 0o600);
        assert_eq!(aside_files(&dir), vec![aside.clone()]);
        store.save(&r.routes).unwrap();
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), original);
        let back = store.load();
        assert_eq!(back.routes, r.routes);
        assert!(back.skipped.is_empty() && back.set_aside.is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn set_aside_names_carry_the_utc_time() {
        let at = |s: u64| utc_stamp(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(1_795_854_600), "20261128T083000Z");
        assert_eq!(at(951_868_799), "20000229T235959Z");
        assert_eq!(at(0), "19700101T000000Z");
    }

    #[test]
    fn a_corrupt_entry_is_skipped_and_the_rest_restored() {
        let good = serde_json::to_value(spec("alpha", "alpha.test")).unwrap();
        let text = serde_json::json!({
            "version": 1,
            "routes": [
                {"project": "Bad Name", "hosts": ["x.test"], "target": "web:3000"},
                good,
                {"project": "gamma", "hosts": ["g.test"]},
                "garbage",
            ]
        })
        .to_string();
        let r = parse(&text, "routes.json");
        assert_eq!(r.routes.len(), 1);
        assert_eq!(r.routes[0].project, "alpha");
        assert_eq!(r.skipped.len(), 3, "{:?}", r.skipped);
        assert!(r.skipped[0].contains("routes[0]"));
    }

    #[test]
    fn a_torn_file_starts_empty_with_a_reason() {
        let r = parse("{\"version\":1,\"routes\":[{\"proj", "routes.json");
        assert!(r.routes.is_empty());
        assert!(r.skipped[0].contains("not valid JSON"));
    }

    #[test]
    fn a_file_that_cannot_be_read_is_never_overwritten() {
        let dir = tempdir("unreadable");
        // A directory where the file should be: reading it fails (root ignores permissions).
        std::fs::create_dir(dir.join(ROUTES_FILE)).unwrap();
        let store = StateStore::new(&dir);
        let r = store.load();
        assert!(r.routes.is_empty());
        assert!(r.skipped[0].contains("cannot be read"), "{:?}", r.skipped);
        let err = store.save(&[spec("alpha", "alpha.test")]).unwrap_err();
        assert!(err.contains("not saved until it can be read"), "{err}");
        assert!(dir.join(ROUTES_FILE).is_dir());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
