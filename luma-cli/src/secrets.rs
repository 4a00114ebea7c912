//! `.luma/secrets`: `KEY=VALUE` lines with `#` comments. Values never reach output, logs or
//! errors: they only go into container environments (and, for custom TLS certificates, into
//! the proxy's deploy request on stdin), and [`Secrets::redact`] scrubs any text that is about
//! to be shown.
//!
//! A value in double quotes may span lines and understands `\n`, `\"` and `\\` (as in
//! dotenv files), which is how a PEM certificate or key is written:
//!
//! ```text
//! TLS_CERT="-----BEGIN CERTIFICATE-----
//! MIIB...
//! -----END CERTIFICATE-----"
//! ```

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
        let mut lines = text.lines().enumerate();
        while let Some((i, line)) = lines.next() {
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
            let v = v.trim();
            let value = match v.strip_prefix('"') {
                Some(rest) => quoted(rest, &mut lines).ok_or_else(|| {
                    format!(
                        "{}:{}: the quoted value of {k} has no closing '\"'",
                        path.display(),
                        i + 1
                    )
                })?,
                None => v.to_string(),
            };
            values.insert(k.to_string(), value);
        }
        Ok(Secrets { path, values })
    }

    /// The value of one secret, if defined.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
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

/// The rest of a double-quoted value after its opening quote, reading further lines until the
/// closing quote; `None` when the file ends first. Text after the closing quote is ignored
/// (e.g. a `# comment`).
fn quoted<'t>(first: &'t str, more: &mut impl Iterator<Item = (usize, &'t str)>) -> Option<String> {
    let mut out = String::new();
    let mut line = first;
    loop {
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(out),
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => out.push('\\'),
                },
                c => out.push(c),
            }
        }
        out.push('\n');
        line = more.next()?.1;
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
        std::fs::write(
            dir.join(".luma/secrets"),
            "PEM=\"-----BEGIN X-----\nAAAA\n-----END X-----\"  # multi-line\nONE=\"a\\nb \\\"q\\\"\"\nPLAIN=\"x\n",
        )
        .unwrap();
        let e = Secrets::load(&dir).unwrap_err();
        assert!(e.contains(":5:") && e.contains("PLAIN"), "{e}");
        std::fs::write(
            dir.join(".luma/secrets"),
            "PEM=\"-----BEGIN X-----\nAAAA\n-----END X-----\"  # multi-line\nONE=\"a\\nb \\\"q\\\"\"\n",
        )
        .unwrap();
        let s = Secrets::load(&dir).unwrap();
        assert_eq!(
            s.get("PEM"),
            Some("-----BEGIN X-----\nAAAA\n-----END X-----")
        );
        assert_eq!(s.get("ONE"), Some("a\nb \"q\""));
        std::fs::write(dir.join(".luma/secrets"), "TOKEN supersecretvalue\n").unwrap();
        let e = Secrets::load(&dir).unwrap_err();
        assert!(e.contains(":1:") && !e.contains("supersecretvalue"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
