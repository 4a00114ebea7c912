//! The admin bearer token: read from a file, or generated into the state dir on first start.
//!
//! The token is never logged, never taken from the command line (it would show in `ps`), and
//! compared in constant time.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub const TOKEN_FILE: &str = "admin.token";

/// Loads the token at `path`, creating it with 256 random bits (mode 0600) if missing.
pub fn load_or_create(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(format!(
                "token file {} is empty: delete it to have a new one generated",
                path.display()
            ))
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot read token file {}: {e}", path.display()))
        }
        Err(_) => {}
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness for the admin token: {e}"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create token file {}: {e}", path.display()))?;
    f.write_all(token.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write token file {}: {e}", path.display()))?;
    Ok(token)
}

/// Reads an existing token (client side).
pub fn read(path: &Path) -> Result<String, String> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        format!("cannot read the admin token at {}: {e}. Run this inside the proxy container (docker exec) or pass --token-file", path.display())
    })?;
    Ok(s.trim().to_string())
}

/// Checks an `Authorization` header value against the token in constant time.
pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some(given) = h.strip_prefix(b"Bearer ") else {
        return false;
    };
    let want = token.as_bytes();
    if given.len() != want.len() {
        return false;
    }
    given
        .iter()
        .zip(want)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_keeps_it_private() {
        let dir = std::env::temp_dir().join(format!("luma-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(TOKEN_FILE);
        let _ = std::fs::remove_file(&p);
        let a = load_or_create(&p).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(load_or_create(&p).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bearer_check() {
        assert!(authorized(Some(b"Bearer abc"), "abc"));
        assert!(!authorized(Some(b"Bearer abd"), "abc"));
        assert!(!authorized(Some(b"abc"), "abc"));
        assert!(!authorized(None, "abc"));
    }
}
