//! Build contexts: the context directory as a tar, without what `.dockerignore` excludes.
//!
//! Patterns follow Docker's rules: paths are relative to the context root, `*` and `?` do not
//! cross `/`, `**` matches any number of directories, a leading `!` re-includes, the last
//! matching pattern wins, and excluding a directory excludes what is inside it.

use std::path::Path;

pub struct Ignore {
    patterns: Vec<(bool, Vec<String>)>,
}

impl Ignore {
    pub fn parse(text: &str) -> Ignore {
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (neg, p) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let p = p
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .trim_end_matches('/');
                (
                    neg,
                    p.split('/')
                        .filter(|s| !s.is_empty() && *s != ".")
                        .map(str::to_string)
                        .collect(),
                )
            })
            .collect();
        Ignore { patterns }
    }

    /// Is the relative path (with `/` separators) excluded?
    pub fn excluded(&self, rel: &str) -> bool {
        let parts: Vec<&str> = rel.split('/').collect();
        let mut excluded = false;
        for (neg, pat) in &self.patterns {
            // A pattern matching the path or any of its parent directories applies.
            let hit = (1..=parts.len()).any(|n| matches(pat, &parts[..n]));
            if hit {
                excluded = !neg;
            }
        }
        excluded
    }
}

fn matches(pat: &[String], path: &[&str]) -> bool {
    match (pat.first(), path.first()) {
        (None, None) => true,
        (Some(p), _) if p == "**" => (0..=path.len()).any(|i| matches(&pat[1..], &path[i..])),
        (Some(p), Some(s)) => glob(p.as_bytes(), s.as_bytes()) && matches(&pat[1..], &path[1..]),
        _ => false,
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Tars the context directory, honouring `.dockerignore`. The Dockerfile is always included.
pub fn tar_context(dir: &Path, dockerfile: &str) -> Result<Vec<u8>, String> {
    let ignore = std::fs::read_to_string(dir.join(".dockerignore"))
        .map(|t| Ignore::parse(&t))
        .unwrap_or(Ignore {
            patterns: Vec::new(),
        });
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(|e| format!("read build context {}: {e}", d.display()))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let rel = path
                .strip_prefix(dir)
                .map_err(|e| e.to_string())?
                .to_string_lossy()
                .replace('\\', "/");
            let keep = rel == dockerfile || rel == ".dockerignore" || !ignore.excluded(&rel);
            if !keep {
                continue;
            }
            let ft = entry.file_type().map_err(|e| e.to_string())?;
            if ft.is_dir() {
                builder
                    .append_dir(&rel, &path)
                    .map_err(|e| format!("tar {rel}: {e}"))?;
                stack.push(path);
            } else {
                builder
                    .append_path_with_name(&path, &rel)
                    .map_err(|e| format!("tar {rel}: {e}"))?;
            }
        }
    }
    builder
        .into_inner()
        .map_err(|e| format!("tar build context: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_rules() {
        let i = Ignore::parse(
            "# comment\nnode_modules\n*.log\n**/secret.txt\n.git\n!keep.log\ntmp/*\n",
        );
        assert!(i.excluded("node_modules"));
        assert!(i.excluded("node_modules/a/b.js"));
        assert!(i.excluded("debug.log"));
        assert!(
            !i.excluded("logs/debug.log"),
            "`*` does not cross directories"
        );
        assert!(!i.excluded("keep.log"));
        assert!(i.excluded("a/b/secret.txt"));
        assert!(i.excluded("secret.txt"));
        assert!(i.excluded(".git/config"));
        assert!(i.excluded("tmp/x"));
        assert!(!i.excluded("src/main.rs"));
    }
}
