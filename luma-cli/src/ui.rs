//! What users see: a step line per phase with a mark and a duration, a spinner on a terminal,
//! plain lines otherwise. Steps go to stderr so `--json` output on stdout stays clean.
//!
//! Work on several servers runs in parallel, so each server's lines carry its name
//! ([`Ui::for_server`]) and no spinner (two spinners would overwrite each other).

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone)]
pub struct Ui {
    pub tty: bool,
    pub verbose: bool,
    pub quiet: bool,
    /// `[server] `, or empty for work on one server.
    prefix: String,
}

impl Ui {
    pub fn new(verbose: bool, quiet: bool) -> Ui {
        Ui {
            tty: std::io::stderr().is_terminal(),
            verbose,
            quiet,
            prefix: String::new(),
        }
    }

    /// The same settings, each line marked with `server` (for work that runs on several
    /// servers at once).
    pub fn for_server(&self, server: &str) -> Ui {
        Ui {
            prefix: format!("[{server}] "),
            ..self.clone()
        }
    }

    /// Runs one phase, showing progress and the outcome.
    pub async fn step<T>(
        &self,
        title: impl Into<String>,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        let title = title.into();
        let started = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let title = format!("{}{title}", self.prefix);
        let spinner =
            (self.tty && !self.quiet && !self.verbose && self.prefix.is_empty()).then(|| {
                let (done, title) = (done.clone(), title.clone());
                tokio::spawn(async move {
                    const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
                    let mut i = 0;
                    while !done.load(Ordering::Relaxed) {
                        eprint!("\r\x1b[2K  {} {title}", FRAMES[i % FRAMES.len()]);
                        let _ = std::io::stderr().flush();
                        i += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                })
            });
        if !self.tty && !self.quiet {
            eprintln!("  … {title}");
        }
        let result = work.await;
        done.store(true, Ordering::Relaxed);
        if let Some(s) = spinner {
            let _ = s.await;
            eprint!("\r\x1b[2K");
        }
        if !self.quiet {
            let secs = started.elapsed().as_secs_f64();
            match &result {
                Ok(_) => eprintln!("  ✓ {title} ({secs:.1}s)"),
                Err(_) => eprintln!("  ✗ {title} ({secs:.1}s)"),
            }
        }
        result
    }

    pub fn info(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            if self.prefix.is_empty() {
                eprintln!("{msg}");
            } else {
                for line in msg.to_string().lines() {
                    eprintln!("{}{line}", self.prefix);
                }
            }
        }
    }

    /// Whether [`Ui::progress`] shows anything: a terminal, and work on one server (lines of
    /// several servers at once would overwrite each other; callers print plain lines then).
    pub fn replaces_lines(&self) -> bool {
        self.tty && !self.quiet && self.prefix.is_empty()
    }

    /// A progress line that replaces itself, on a terminal only (the lines before and after
    /// it say what happened, so a log loses nothing).
    pub fn progress(&self, msg: impl std::fmt::Display) {
        if self.tty && !self.quiet && self.prefix.is_empty() {
            eprint!("\r\x1b[2K  {msg}");
            let _ = std::io::stderr().flush();
        }
    }

    /// Clears the progress line.
    pub fn progress_done(&self) {
        if self.tty && !self.quiet && self.prefix.is_empty() {
            eprint!("\r\x1b[2K");
        }
    }

    pub fn detail(&self, msg: impl std::fmt::Display) {
        if self.verbose {
            eprintln!("    {}{msg}", self.prefix);
        }
    }
}

/// Renders rows as an aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}
