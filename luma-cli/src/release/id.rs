//! Release ids: the git short sha of the project, or a time-based id outside git.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn time_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_millis())
        .unwrap_or(0);
    format!("t{secs}{millis:03}")
}

/// The release id for a deploy from `dir`. A dirty git tree is refused unless `force`.
pub fn release_id(dir: &Path, force: bool) -> Result<String, String> {
    match git(dir, &["rev-parse", "--short=7", "HEAD"]) {
        None => Ok(time_id()),
        Some(sha) => {
            let dirty = git(dir, &["status", "--porcelain", "--untracked-files=no"])
                .map(|s| !s.is_empty())
                .unwrap_or(false);
            if dirty && !force {
                return Err(format!(
                    "{} has uncommitted changes, so release {sha} would not describe what gets deployed; commit them, or pass --force",
                    dir.display()
                ));
            }
            Ok(if dirty {
                format!("{sha}-{}", time_id())
            } else {
                sha
            })
        }
    }
}

/// `base`, or `base-2`, `base-3`, … when `base` is taken: the same commit deployed again gets
/// a distinct, short release id.
pub fn unique(base: &str, taken: &[&str]) -> String {
    if !taken.contains(&base) {
        return base.to_string();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|r| !taken.contains(&r.as_str()))
        .unwrap_or_else(|| format!("{base}-{}", time_id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn a_taken_id_gets_the_next_free_suffix() {
        assert_eq!(unique("abc1234", &[]), "abc1234");
        assert_eq!(unique("abc1234", &["abc1234"]), "abc1234-2");
        assert_eq!(unique("abc1234", &["abc1234", "abc1234-2"]), "abc1234-3");
    }

    #[test]
    fn git_sha_clean_dirty_refused_and_forced() {
        let dir = std::env::temp_dir().join(format!("luma-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            release_id(&dir, false).unwrap().starts_with('t'),
            "outside git the id is time-based"
        );
        run(&dir, &["init", "-q"]);
        std::fs::write(dir.join("f"), "1").unwrap();
        run(&dir, &["add", "f"]);
        run(
            &dir,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-qm",
                "x",
            ],
        );
        let sha = release_id(&dir, false).unwrap();
        assert_eq!(sha.len(), 7);
        std::fs::write(dir.join("f"), "2").unwrap();
        let err = release_id(&dir, false).unwrap_err();
        assert!(
            err.contains("uncommitted changes") && err.contains("--force"),
            "{err}"
        );
        let forced = release_id(&dir, true).unwrap();
        assert!(forced.starts_with(&format!("{sha}-t")), "{forced}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
