//! `.luma/secrets`: `KEY=VALUE` lines with `#` comments. Values never reach output, logs or
//! errors: they only go into container environments, and [`Secrets::redact`] scrubs any text
//! that is about to be shown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Default, Clone)]
pub struct Secrets {
    pub path: PathBuf,
    values: BTreeMap<String, String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets {
    /// Reads the secrets file beside `luma.yml`. A missing file is empty.
    pub fn load(project_dir: &Path) -> Result<Secrets, String> {
        let path = project_dir.join(".luma").join("secrets");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: cannot read it: {e}", path.display())),
        };
        let mut values = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The error names the line and the key, never the value.
            let (k, v) = line.split_once('=').ok_or_else(|| {
                format!(
                    "{}:{}: expected KEY=VALUE (the line has no '=')",
                    path.display(),
                    i + 1
                )
            })?;
            let k = k.trim();
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "{}:{}: {k:?} is not a valid variable name (letters, digits, _)",
                    path.display(),
                    i + 1
                ));
            }
            values.insert(k.to_string(), v.trim().to_string());
        }
        Ok(Secrets { path, values })
    }

    /// `KEY=VALUE` for each requested key, or an error naming the missing keys.
    pub fn env_for(&self, keys: &[String], who: &str) -> Result<Vec<String>, String> {
        let missing: Vec<&str> = keys
            .iter()
            .filter(|k| !self.values.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{who} needs secret(s) {} that {} does not define; add KEY=VALUE lines there",
                missing.join(", "),
                self.path.display()
            ));
        }
        Ok(keys
            .iter()
            .map(|k| format!("{k}={}", self.values[k]))
            .collect())
    }

    /// Replaces every secret value in `text` with `[secret KEY]`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (k, v) in &self.values {
            if v.len() >= 4 {
                out = out.replace(v.as_str(), &format!("[secret {k}]"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts_without_echoing_values() {
        let dir = std::env::temp_dir().join(format!("luma-secrets-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".luma")).unwrap();
        std::fs::write(
            dir.join(".luma/secrets"),
            "# db\nDB_PASSWORD=hunter2-long\n\nAPI_KEY = k-123456\n",
        )
        .unwrap();
        let s = Secrets::load(&dir).unwrap();
        assert_eq!(
            s.env_for(&["DB_PASSWORD".into()], "app web").unwrap(),
            vec!["DB_PASSWORD=hunter2-long"]
        );
        let e = s.env_for(&["NOPE".into()], "app web").unwrap_err();
        assert!(e.contains("NOPE") && !e.contains("hunter2"));
        assert_eq!(
            s.redact("failed: hunter2-long rejected"),
            "failed: [secret DB_PASSWORD] rejected"
        );
        std::fs::write(dir.join(".luma/secrets"), "TOKEN supersecretvalue\n").unwrap();
        let e = Secrets::load(&dir).unwrap_err();
        assert!(e.contains(":1:") && !e.contains("supersecretvalue"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
