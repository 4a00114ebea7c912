//! Small helpers shared across the proxy: parsing for the CLI flags and the admin API, and the
//! one private atomic file write that the route table and the certificate store both use.

use std::path::Path;

/// Parses a human duration (one definition, shared with the CLI).
pub use luma_api::parse_duration;

/// Parses a byte size: `64KiB`, `1MiB`, or a bare number of bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 65536, 64KiB, 1MiB"))?;
    match unit {
        "" | "B" => Ok(n),
        "KiB" | "K" | "k" => Ok(n * 1024),
        "MiB" | "M" => Ok(n * 1024 * 1024),
        _ => Err(format!("invalid size {s:?}: unit must be KiB or MiB")),
    }
}

/// Writes `body` to `path` through `tmp` (same directory): create with mode 0600 (also when a
/// crash left `tmp` with another mode), write, fsync, rename over `path`, fsync the directory.
/// A crash leaves the old file or the new one, never a torn one; `tmp` never stays behind a
/// failed write (it may hold key bytes). Past the rename the write has happened: a failed
/// directory fsync only leaves it less durable against power loss, so it is logged (`what`
/// names the file for that line), not returned, and no caller undoes a change that is on disk.
pub fn write_private_atomic(
    path: &Path,
    tmp: &Path,
    body: &[u8],
    what: &str,
) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let ctx = |step: &str, e: std::io::Error| format!("{step} {}: {e}", tmp.display());
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)
            .map_err(|e| ctx("create", e))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ctx("chmod", e))?;
        f.write_all(body).map_err(|e| ctx("write", e))?;
        f.sync_all().map_err(|e| ctx("fsync", e))?;
        drop(f);
        std::fs::rename(tmp, path).map_err(|e| ctx("rename", e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        crate::log::warn(
            &format!("fsync of the directory failed after writing {what}"),
            serde_json::json!({"dir": dir.display().to_string(), "error": e.to_string()}),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64KiB").unwrap(), 65536);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("1GiB").is_err());
    }
}
