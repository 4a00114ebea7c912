//! Routes survive restarts: the table is saved on every change and restored entry by entry.
//!
//! A save writes a temp file, fsyncs it, renames it over the old one and fsyncs the directory,
//! so a crash mid-write leaves either the old or the new file, never a torn one. On restore each
//! route is parsed and validated on its own: a bad entry is reported and skipped and never takes
//! the others down.

use crate::route::RouteSpec;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const ROUTES_FILE: &str = "routes.json";
const VERSION: u64 = 1;

pub struct StateStore {
    path: PathBuf,
    /// Serializes writers so an older table can never overwrite a newer one.
    write: Mutex<()>,
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
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            path: dir.join(ROUTES_FILE),
            write: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the whole table atomically. `routes` must be the table as of now; callers save
    /// after every install or removal.
    pub fn save(&self, routes: &[RouteSpec]) -> Result<(), String> {
        let _w = self
            .write
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        let body = serde_json::to_vec_pretty(&File {
            version: VERSION,
            routes,
        })
        .map_err(|e| format!("encode routes: {e}"))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{ROUTES_FILE}.tmp"));
        let ctx = |what: &str, e: std::io::Error| format!("{what} {}: {e}", tmp.display());
        let mut f = std::fs::File::create(&tmp).map_err(|e| ctx("create", e))?;
        f.write_all(&body).map_err(|e| ctx("write", e))?;
        f.sync_all().map_err(|e| ctx("fsync", e))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(|e| ctx("rename", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("fsync dir {}: {e}", dir.display()))?;
        Ok(())
    }

    /// Reads the saved routes. A missing file is an empty table.
    pub fn load(&self) -> Restored {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Restored::default(),
            Err(e) => {
                return Restored {
                    routes: Vec::new(),
                    skipped: vec![format!("cannot read {}: {e}", self.path.display())],
                }
            }
        };
        parse(&text, &self.path.display().to_string())
    }
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
        std::fs::remove_dir_all(dir).unwrap();
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
}
