//! One server reached over SSH: the target as written in `luma.yml`, and the one multiplexed
//! connection per server per run ([`Master`]).
//!
//! Why the system `ssh` and not an SSH library: it is what the user already trusts and has set
//! up. Their agent, `~/.ssh/config` (Host aliases, `ProxyJump`, `IdentityFile`), and
//! `known_hosts` all work, exactly as with a plain `ssh` in a terminal.
//!
//! Why a ControlMaster: every Docker API connection is one `docker system dial-stdio` on the
//! server. Each new `ssh` would be a TCP handshake, a key exchange and an authentication. So one
//! master per server does that once, and every later `ssh -S <socket>` is only a new channel on
//! that connection. The master runs as our child (`-N`, `ControlPersist=no`) and ends with the
//! run. On an ordinary exit, dropping the [`Master`] closes it. When luma ends without running
//! Drop (SIGKILL, or `std::process::exit` on a second Ctrl-C), the kernel sends the master, and
//! every channel's `ssh`, SIGTERM (Linux's parent-death signal, see [`spawn_tied`]); ssh then
//! closes the connection and removes its socket. Only the empty directory stays, and a later
//! run sweeps it. Its socket lives in a private 0700 directory under `/tmp` with a short name,
//! because a Unix socket path has a limit of about 100 bytes and other users must not reach
//! it.
//!
//! Host keys are always checked strictly (`StrictHostKeyChecking=yes`, `BatchMode=yes`). An
//! unknown key fails with its fingerprint and the exact command that trusts it. A changed key
//! is refused. Luma never writes to `known_hosts` itself.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How long a TCP connect may take (ssh's `ConnectTimeout`).
const CONNECT_TIMEOUT_S: u64 = 15;
/// The whole open: connect, key exchange and authentication. `BatchMode` rules out prompts,
/// so this only catches a server that stalls.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);
/// How much of ssh's stderr is kept to explain a failure (the last bytes matter).
const STDERR_KEEP: usize = 16 * 1024;

/// One server reached over SSH, as written in luma.yml plus the top-level ssh settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SshTarget {
    /// As written in luma.yml (`[user@]host`, maybe a Host alias), used in every message.
    pub server: String,
    /// `ssh.user` (overridden by `user@` in `server`) -> `-l`.
    pub user: Option<String>,
    /// `ssh.port` -> `-p`.
    pub port: Option<u16>,
    /// `ssh.key` -> `-i` (+ `IdentitiesOnly=yes`).
    pub key_file: Option<PathBuf>,
    /// `LUMA_SSH_CONFIG` -> `-F`.
    pub config_file: Option<PathBuf>,
}

impl SshTarget {
    /// The target for `server` with the top-level `ssh:` settings, and `LUMA_SSH_CONFIG` from
    /// the environment.
    pub fn new(server: &str, ssh: Option<&crate::config::Ssh>) -> SshTarget {
        let config_file = std::env::var_os("LUMA_SSH_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        SshTarget::with_config(server, ssh, config_file)
    }

    fn with_config(
        server: &str,
        ssh: Option<&crate::config::Ssh>,
        config_file: Option<PathBuf>,
    ) -> SshTarget {
        // ssh splits `user@host` at the last `@`; so do we.
        let from_server = server
            .rsplit_once('@')
            .map(|(u, _)| u.to_string())
            .filter(|u| !u.is_empty());
        SshTarget {
            server: server.to_string(),
            user: from_server.or_else(|| ssh.and_then(|s| s.username.clone())),
            port: ssh.and_then(|s| s.port),
            key_file: ssh.and_then(|s| s.key_file.as_ref().map(PathBuf::from)),
            config_file,
        }
    }

    /// The ssh destination: the server without `user@` (the user goes in `-l`).
    pub fn host(&self) -> &str {
        self.server
            .rsplit_once('@')
            .map_or(self.server.as_str(), |(_, h)| h)
    }

    /// A host that ssh would read as an option, or that is empty, is refused before any ssh
    /// runs.
    fn check(&self) -> Result<(), String> {
        let h = self.host();
        if h.is_empty() || h.starts_with('-') || h.chars().any(|c| c.is_whitespace()) {
            return Err(format!(
                "server {:?} is not a valid ssh destination: write `[user@]host` (a host name, \
                 an address, or a Host alias from your ssh config)",
                self.server
            ));
        }
        Ok(())
    }

    /// Options every ssh invocation for this target gets.
    fn base_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(f) = &self.config_file {
            a.push("-F".into());
            a.push(f.into());
        }
        if let Some(p) = self.port {
            a.push("-p".into());
            a.push(p.to_string().into());
        }
        if let Some(u) = &self.user {
            a.push("-l".into());
            a.push(u.into());
        }
        if let Some(k) = &self.key_file {
            a.push("-i".into());
            a.push(k.into());
            // Only that key: an agent full of keys would otherwise hit the server's
            // MaxAuthTries before the right one.
            push_opt(&mut a, "IdentitiesOnly=yes");
        }
        for o in [
            // Never prompt (there is no one to answer), never accept a host key silently.
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            // Errors only; and errors even if the user's config says QUIET, since a refused
            // host key is explained from them.
            "LogLevel=ERROR",
            // Docker needs none of these; a forward in the user's config for this host must
            // not open ports or expose their agent on the server.
            "ForwardAgent=no",
            "ForwardX11=no",
            "ClearAllForwardings=yes",
        ] {
            push_opt(&mut a, o);
        }
        push_opt(&mut a, &format!("ConnectTimeout={CONNECT_TIMEOUT_S}"));
        a.push("-T".into());
        a
    }

    /// The master: authenticates once, then serves channels on `ctl` until told to exit.
    fn master_args(&self, ctl: &Path) -> Vec<OsString> {
        let mut a = self.base_args();
        for o in [
            "ControlMaster=yes",
            "ControlPersist=no",
            // A dead server is noticed within a minute instead of at the next TCP timeout.
            "ServerAliveInterval=15",
            "ServerAliveCountMax=4",
        ] {
            push_opt(&mut a, o);
        }
        a.push("-S".into());
        a.push(ctl.into());
        a.push("-N".into());
        a.push(self.host().into());
        a
    }

    /// A command through the master. `ProxyCommand=false` matters: when the master is gone,
    /// ssh would silently open a fresh connection instead; this makes it fail instead, so "one
    /// connection per server" holds and a broken master shows.
    fn mux_args(&self, ctl: &Path, remote: &[&str]) -> Vec<OsString> {
        let mut a = self.base_args();
        push_opt(&mut a, "ControlMaster=no");
        push_opt(&mut a, "ProxyCommand=false");
        a.push("-S".into());
        a.push(ctl.into());
        a.push(self.host().into());
        a.push("--".into());
        // ssh joins the remote words with spaces and hands them to the remote user's shell:
        // quote each, so a word stays one word.
        a.extend(remote.iter().map(|w| OsString::from(shell_quote(w))));
        a
    }

    /// `ssh -S ctl -O check|exit host`.
    fn control_args(&self, ctl: &Path, op: &str) -> Vec<OsString> {
        let mut a = self.base_args();
        a.push("-S".into());
        a.push(ctl.into());
        a.push("-O".into());
        a.push(op.into());
        a.push(self.host().into());
        a
    }

    /// `ssh -G`: what ssh makes of this target with every config applied.
    fn effective_args(&self) -> Vec<OsString> {
        let mut a = self.base_args();
        a.push("-G".into());
        a.push(self.host().into());
        a
    }

    /// The plain `ssh` command a user can try by hand (no secrets in it: a key is a path).
    fn try_command(&self) -> String {
        let mut w = vec!["ssh".to_string()];
        if let Some(f) = &self.config_file {
            w.push("-F".into());
            w.push(shell_quote(&f.to_string_lossy()));
        }
        if let Some(p) = self.port {
            w.push(format!("-p {p}"));
        }
        if let Some(k) = &self.key_file {
            w.push(format!("-i {}", shell_quote(&k.to_string_lossy())));
        }
        match &self.user {
            Some(u) => w.push(shell_quote(&format!("{u}@{}", self.host()))),
            None => w.push(shell_quote(self.host())),
        }
        w.push("true".into());
        w.join(" ")
    }
}

fn push_opt(a: &mut Vec<OsString>, o: &str) {
    a.push("-o".into());
    a.push(o.into());
}

/// A command that ran to its end: its stdout, or why it failed (its exit status and stderr).
/// `what` is the command as shown, `server` where it ran.
pub fn finished(what: &str, server: &str, out: std::process::Output) -> Result<String, String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(format!(
        "`{what}` on {server} failed ({}): {}",
        out.status,
        if err.is_empty() { "no message" } else { &err }
    ))
}

/// Quotes a word for a POSIX shell (unchanged when it needs no quoting).
pub fn shell_quote(w: &str) -> String {
    let safe = !w.is_empty()
        && w.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'@' | b'%' | b'+' | b'=' | b':' | b',' | b'.' | b'/' | b'-'
                )
        });
    if safe {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// Starts `cmd` (an `ssh`) so that it ends when luma does, however luma ends.
///
/// Drop kills our ssh processes on every ordinary exit (`kill_on_drop`, [`Master`]'s Drop). It
/// cannot when luma is SIGKILLed or leaves through `std::process::exit` (a second Ctrl-C), since
/// nothing runs then: a master would keep its connection to the server, and its socket. So the
/// child asks the kernel, between fork and exec, for SIGTERM when its parent dies
/// (PR_SET_PDEATHSIG; ssh answers SIGTERM by closing its connection and removing its socket).
///
/// The "parent" there is the thread that forked, not the process: the signal comes when that
/// thread exits. The callers run on tokio's threads: the main thread (in `block_on`) and the
/// runtime's workers. But tokio runs its workers on its blocking pool, and a worker thread can
/// end while luma runs: after a `block_in_place` hands its core to a new thread, the old one
/// idles out. Nothing in luma calls that today, and nothing should have to know. So every tied
/// child is forked on one thread of our own that is never joined and lives as long as the
/// process: the signal comes when luma ends, never earlier.
///
/// Not on other systems than Linux: there the child is started the same way, but untied.
pub async fn spawn_tied(
    mut cmd: tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    #[cfg(target_os = "linux")]
    {
        let luma = std::process::id();
        // SAFETY: the closure runs in the forked child before exec, and makes only two
        // async-signal-safe system calls; it allocates nothing (a raw OS error is no
        // allocation) and touches no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                // luma may have died between the fork and the prctl: no signal comes then,
                // and the child has a new parent already. Do not start.
                if libc::getppid() as u32 != luma {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let req = SpawnRequest {
        cmd,
        runtime: tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?,
        reply,
    };
    let thread_gone = || std::io::Error::other("luma's thread that starts ssh has stopped");
    spawner()?.send(req).map_err(|_| thread_gone())?;
    answer.await.map_err(|_| thread_gone())?
}

/// What [`spawn_tied`] hands to the spawner thread.
struct SpawnRequest {
    cmd: tokio::process::Command,
    /// The caller's runtime: the child is registered with its reactor, as if spawned there.
    runtime: tokio::runtime::Handle,
    reply: tokio::sync::oneshot::Sender<std::io::Result<tokio::process::Child>>,
}

/// The thread that forks every tied child (see [`spawn_tied`]), started on first use. Its
/// sender sits in a static, never dropped, so the thread never ends before the process.
fn spawner() -> std::io::Result<&'static std::sync::mpsc::Sender<SpawnRequest>> {
    static SPAWNER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<SpawnRequest>>> =
        std::sync::OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("luma-ssh-spawn".into())
                .spawn(move || {
                    for req in rx {
                        // The caller gave up (its future was dropped): start nothing.
                        if req.reply.is_closed() {
                            continue;
                        }
                        let _in = req.runtime.enter();
                        let mut cmd = req.cmd;
                        // A panic must not end this thread: that would signal every child.
                        let spawned =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn()))
                                .unwrap_or_else(|_| {
                                    Err(std::io::Error::other("starting the process panicked"))
                                });
                        // A caller that has gone since drops the child here, which kills it.
                        let _ = req.reply.send(spawned);
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
        .ok_or_else(|| std::io::Error::other("cannot start a thread to run ssh from"))
}

/// The one multiplexed connection per server per run (OpenSSH ControlMaster, socket in a
/// private 0700 temp dir with a short path). Dropping it closes the master and removes the dir.
pub struct Master {
    target: SshTarget,
    ctl: PathBuf,
    child: Mutex<Option<tokio::process::Child>>,
    // Last, so the directory goes after the master that listens in it.
    _dir: PrivateDir,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("server", &self.target.server)
            .field("ctl", &self.ctl)
            .finish()
    }
}

impl Master {
    /// Opens the master: system `ssh` (user's agent, ~/.ssh/config, ProxyJump, known_hosts
    /// work), BatchMode=yes, StrictHostKeyChecking=yes (never accepts a key silently),
    /// ConnectTimeout, ServerAliveInterval. Unknown host key -> Err naming the server, its key
    /// fingerprint (from `ssh-keyscan` + `ssh-keygen -lf -`, if that works) and the exact
    /// command that trusts it. A changed host key -> Err saying so, never proceed. Auth
    /// failure -> clear Err.
    pub async fn open(target: &SshTarget) -> Result<Master, String> {
        target.check()?;
        let dir = PrivateDir::create()?;
        let ctl = dir.path.join("c");
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(target.master_args(&ctl))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = spawn_tied(cmd).await.map_err(|e| {
            format!(
                "cannot run `ssh` to reach {} ({e}); install OpenSSH's client",
                target.server
            )
        })?;
        // Drained all along: a master that fills its stderr pipe would block.
        let stderr = Arc::new(Mutex::new(Vec::<u8>::new()));
        let drained = child.stderr.take().map(|mut pipe| {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut s = stderr.lock().unwrap_or_else(|p| p.into_inner());
                    s.extend_from_slice(&buf[..n]);
                    if s.len() > STDERR_KEEP {
                        let cut = s.len() - STDERR_KEEP;
                        s.drain(..cut);
                    }
                }
            })
        });
        let mut master = Master {
            target: target.clone(),
            ctl,
            child: Mutex::new(None),
            _dir: dir,
        };
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            tokio::select! {
                status = child.wait() => {
                    // The master gave up: its stderr says why (the pipe closes as it exits).
                    if let Some(d) = drained {
                        let _ = tokio::time::timeout(Duration::from_secs(2), d).await;
                    }
                    let text = {
                        let s = stderr.lock().unwrap_or_else(|p| p.into_inner());
                        String::from_utf8_lossy(&s).into_owned()
                    };
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    return Err(explain(target, classify(&text), &text, &status).await);
                }
                _ = tokio::time::sleep(pause) => {}
            }
            // The socket appears once the master has authenticated and listens; `-O check`
            // confirms it answers.
            if master.ctl.exists() && master.control("check").await {
                master.child = Mutex::new(Some(child));
                return Ok(master);
            }
            if started.elapsed() > OPEN_DEADLINE {
                let _ = child.start_kill();
                return Err(format!(
                    "ssh to {} did not finish connecting within {}s (the server accepted the \
                     TCP connection but never completed the login); try `{}`",
                    target.server,
                    OPEN_DEADLINE.as_secs(),
                    target.try_command()
                ));
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// `ssh -S <ctl> ... <dest> -- <remote...>` through the master (no new TCP connection: if
    /// the master is gone, the command fails with ssh's exit status 255). Each remote word is
    /// shell-quoted, so `remote` is an argv. The process is killed when the returned command's
    /// child is dropped; stdio is the caller's to set. Start it with [`spawn_tied`], so it ends
    /// with luma even when Drop never runs.
    pub fn command(&self, remote: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ssh");
        c.args(self.target.mux_args(&self.ctl, remote))
            .kill_on_drop(true);
        c
    }

    /// Runs `remote` (an argv, see [`Master::command`]) on the server through the master with
    /// no input, and returns what it wrote to stdout. Err says why not: its exit status and
    /// what it wrote to stderr, or that it took longer than `limit` (it is killed then).
    pub async fn output(&self, remote: &[&str], limit: Duration) -> Result<String, String> {
        let mut cmd = self.command(remote);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (server, what) = (&self.target.server, remote.join(" "));
        // Dropping the future at the timeout drops the child, which kills it (kill_on_drop).
        let run = async { spawn_tied(cmd).await?.wait_with_output().await };
        match tokio::time::timeout(limit, run).await {
            Err(_) => Err(format!(
                "`{what}` on {server} did not finish within {}s",
                limit.as_secs_f64()
            )),
            Ok(Err(e)) => Err(format!("cannot run ssh to {server} ({e})")),
            Ok(Ok(out)) => finished(&what, server, out),
        }
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// True once the master process has exited (killed, or the server went away): no command
    /// through it can work any more.
    pub fn is_closed(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// `ssh -O check|exit`, true when it succeeded.
    async fn control(&self, op: &str) -> bool {
        let out = tokio::process::Command::new("ssh")
            .args(self.target.control_args(&self.ctl, op))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), out).await,
            Ok(Ok(s)) if s.success()
        )
    }
}

impl Drop for Master {
    /// Asks the master to exit cleanly (it closes its channels and says goodbye to the
    /// server), briefly and synchronously (Drop cannot await; this is a local socket), then
    /// kills it in any case. The directory goes with `dir`.
    fn drop(&mut self) {
        let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        if let Ok(mut exit) = std::process::Command::new("ssh")
            .args(self.target.control_args(&self.ctl, "exit"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            let until = Instant::now() + Duration::from_secs(2);
            loop {
                match exit.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > until => {
                        let _ = exit.kill();
                        let _ = exit.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        let _ = child.start_kill();
    }
}

/// A 0700 directory under /tmp, removed on drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create() -> Result<PrivateDir, String> {
        use std::hash::{BuildHasher, Hasher};
        use std::os::unix::fs::DirBuilderExt;
        sweep_leftovers();
        let mut last = None;
        for _ in 0..16 {
            // std's RandomState is randomly keyed: enough for a name that must not collide.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let path = PathBuf::from(format!("/tmp/luma-ssh-{:08x}", h.finish() as u32));
            // `create` fails on an existing path, so the directory is ours and 0700 (the
            // umask can only narrow it).
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(format!(
                        "cannot create a private directory for the ssh control socket in /tmp \
                         ({e}); check that /tmp exists and is writable"
                    ))
                }
            }
        }
        Err(format!(
            "cannot create a private directory for the ssh control socket in /tmp ({})",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }
}

/// Removes the empty socket directories of runs that were killed before they could clean up
/// (ssh removes its socket when the master exits; the directory stays). Only our own, only
/// empty ones (`remove_dir` refuses anything else), and only old ones: a master that is still
/// opening has an empty directory for at most [`OPEN_DEADLINE`].
fn sweep_leftovers() {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    // Our uid, without libc: the owner of this process's /proc entry.
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("luma-ssh-") {
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        let old = m
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > OPEN_DEADLINE * 2);
        if m.is_dir() && m.uid() == me && old {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Why a master did not come up, from ssh's stderr.
#[derive(Debug, Clone, PartialEq)]
enum Failure {
    /// The server's key is not in known_hosts.
    UnknownHostKey,
    /// The server's key differs from the recorded one; `Some((file, line))` of the old entry.
    ChangedHostKey(Option<(String, String)>),
    /// Authentication failed.
    AuthDenied,
    /// `-i` names a key ssh cannot read.
    KeyUnreadable,
    Refused,
    Timeout,
    Unresolved,
    Unreachable,
    Other,
}

fn classify(stderr: &str) -> Failure {
    // Before "Host key verification failed", which follows it too.
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || (stderr.contains("Host key for") && stderr.contains("has changed"))
    {
        let offending = stderr.lines().find_map(|l| {
            // "Offending ED25519 key in /root/.ssh/known_hosts:3"
            let rest = l.split(" key in ").nth(1)?;
            let (file, line) = rest.trim().rsplit_once(':')?;
            Some((file.to_string(), line.to_string()))
        });
        return Failure::ChangedHostKey(offending);
    }
    if (stderr.contains("No ") && stderr.contains("host key is known for"))
        || stderr.contains("Host key verification failed")
    {
        return Failure::UnknownHostKey;
    }
    if stderr.contains("Permission denied") || stderr.contains("Too many authentication failures") {
        if stderr.contains("not accessible") {
            return Failure::KeyUnreadable;
        }
        return Failure::AuthDenied;
    }
    if stderr.contains("Connection refused") {
        return Failure::Refused;
    }
    if stderr.contains("timed out") {
        return Failure::Timeout;
    }
    if stderr.contains("Could not resolve hostname") || stderr.contains("Name or service not known")
    {
        return Failure::Unresolved;
    }
    if stderr.contains("No route to host") || stderr.contains("Network is unreachable") {
        return Failure::Unreachable;
    }
    Failure::Other
}

/// What `ssh -G` says about a target (only what the messages need).
#[derive(Debug, Default, Clone, PartialEq)]
struct Effective {
    hostname: String,
    port: u16,
    user: String,
    known_hosts: Vec<String>,
    host_key_alias: Option<String>,
    /// A ProxyJump or ProxyCommand: ssh-keyscan cannot go that way.
    proxied: bool,
}

fn parse_effective(out: &str) -> Effective {
    let mut e = Effective {
        port: 22,
        ..Effective::default()
    };
    for line in out.lines() {
        let Some((k, v)) = line.split_once(' ') else {
            continue;
        };
        let v = v.trim();
        match k {
            "hostname" => e.hostname = v.to_string(),
            "port" => e.port = v.parse().unwrap_or(22),
            "user" => e.user = v.to_string(),
            "userknownhostsfile" => {
                e.known_hosts = v.split_whitespace().map(str::to_string).collect()
            }
            "hostkeyalias" => e.host_key_alias = Some(v.to_string()),
            "proxyjump" | "proxycommand" if v != "none" => e.proxied = true,
            _ => {}
        }
    }
    e
}

async fn effective(target: &SshTarget) -> Option<Effective> {
    let out = tokio::process::Command::new("ssh")
        .args(target.effective_args())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(5), out)
        .await
        .ok()?
        .ok()?;
    out.status
        .success()
        .then(|| parse_effective(&String::from_utf8_lossy(&out.stdout)))
        .filter(|e| !e.hostname.is_empty())
}

/// The server's host key fingerprints as it presents them now (`ssh-keyscan | ssh-keygen -lf
/// -`), best effort: one line per key type, or nothing.
async fn fingerprints(e: &Effective) -> Vec<String> {
    let work = async {
        let scan = tokio::process::Command::new("ssh-keyscan")
            .args(keyscan_args(e))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .ok()?;
        if scan.stdout.is_empty() {
            return None;
        }
        let mut keygen = tokio::process::Command::new("ssh-keygen")
            .args(["-l", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let mut input = keygen.stdin.take()?;
        use tokio::io::AsyncWriteExt;
        input.write_all(&scan.stdout).await.ok()?;
        drop(input);
        let out = keygen.wait_with_output().await.ok()?;
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .filter(|l| !l.is_empty())
                .collect(),
        )
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn keyscan_args(e: &Effective) -> Vec<String> {
    let mut a = vec!["-T".to_string(), "5".to_string()];
    if e.port != 22 {
        a.push("-p".into());
        a.push(e.port.to_string());
    }
    a.push(e.hostname.clone());
    a
}

/// The command that records the server's current key in the user's known_hosts. Shown, never
/// run: the user compares the fingerprint first.
fn trust_command(target: &SshTarget, e: &Effective) -> String {
    if e.proxied {
        // ssh-keyscan cannot go through a jump host; ssh itself can, and asks.
        let mut c = target.try_command();
        c.insert_str(3, " -o StrictHostKeyChecking=ask");
        return format!("{c}   (in a terminal; answer `yes` only if the fingerprint matches)");
    }
    let file = e
        .known_hosts
        .first()
        .map(|f| shell_quote(f))
        .unwrap_or_else(|| "~/.ssh/known_hosts".to_string());
    let scan = format!("ssh-keyscan {}", keyscan_args(e)[2..].join(" "));
    match &e.host_key_alias {
        // known_hosts must name the key by the alias ssh looks it up with.
        Some(alias) => format!(
            "{scan} | sed 's/^[^ ]*/{}/' >> {file}",
            if e.port != 22 {
                format!("[{alias}]:{}", e.port)
            } else {
                alias.clone()
            }
        ),
        None => format!("{scan} >> {file}"),
    }
}

/// The message for a master that did not come up.
async fn explain(target: &SshTarget, f: Failure, stderr: &str, status: &str) -> String {
    let server = &target.server;
    let e = effective(target).await.unwrap_or_else(|| Effective {
        hostname: target.host().to_string(),
        port: target.port.unwrap_or(22),
        user: target.user.clone().unwrap_or_default(),
        ..Effective::default()
    });
    let at = if e.port == 22 {
        e.hostname.clone()
    } else {
        format!("{} port {}", e.hostname, e.port)
    };
    let fp_lines = |fps: &[String]| -> String {
        if fps.is_empty() {
            "  (Luma could not read the key's fingerprint with ssh-keyscan.)\n".to_string()
        } else {
            let mut s = "  The key(s) it presents now:\n".to_string();
            for l in fps {
                s.push_str(&format!("    {l}\n"));
            }
            s
        }
    };
    match f {
        Failure::UnknownHostKey => {
            let fps = if e.proxied {
                Vec::new()
            } else {
                fingerprints(&e).await
            };
            format!(
                "the host key of {server} ({at}) is not known (it is not in {}), and Luma never \
                 trusts a host key silently.\n{}  Compare it with the server's own (on the server: \
                 `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then trust it with:\n    {}",
                e.known_hosts
                    .first()
                    .map(String::as_str)
                    .unwrap_or("~/.ssh/known_hosts"),
                fp_lines(&fps),
                trust_command(target, &e)
            )
        }
        Failure::ChangedHostKey(offending) => {
            let fps = if e.proxied {
                Vec::new()
            } else {
                fingerprints(&e).await
            };
            let (file, entry) = match &offending {
                Some((file, line)) => (file.clone(), format!("{file}, line {line}")),
                None => {
                    let f = e
                        .known_hosts
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "~/.ssh/known_hosts".into());
                    (f.clone(), f)
                }
            };
            let name = match (&e.host_key_alias, e.port) {
                (Some(a), 22) => a.clone(),
                (Some(a), p) => format!("[{a}]:{p}"),
                (None, 22) => e.hostname.clone(),
                (None, p) => format!("[{}]:{p}", e.hostname),
            };
            format!(
                "the host key of {server} ({at}) has CHANGED: it does not match the one recorded \
                 in {entry}. Someone may be intercepting the connection, or the server was \
                 reinstalled. Luma refuses to connect.\n{}  Only if the server's admin confirms \
                 the new key: remove the old one with `ssh-keygen -R {} -f {}`, then trust the \
                 new one with:\n    {}",
                fp_lines(&fps),
                shell_quote(&name),
                shell_quote(&file),
                trust_command(target, &e)
            )
        }
        Failure::AuthDenied | Failure::KeyUnreadable => {
            let user = if e.user.is_empty() {
                "your user name".to_string()
            } else {
                format!("user {}", e.user)
            };
            let key = match (&target.key_file, f == Failure::KeyUnreadable) {
                (Some(k), true) => format!(
                    "the key file {} (ssh.key in luma.yml) does not exist or cannot be read",
                    k.display()
                ),
                (Some(k), false) => format!(
                    "the server did not accept the key {} (ssh.key in luma.yml)",
                    k.display()
                ),
                (None, _) => "the server accepted no key from your ssh agent, your ssh config \
                              (IdentityFile) or ~/.ssh/id_*"
                    .to_string(),
            };
            format!(
                "ssh to {server} ({at}) as {user} was refused: {key}. Check ssh.user and ssh.key \
                 in luma.yml (or User and IdentityFile in your ssh config), and that the public \
                 key is in ~/.ssh/authorized_keys of that user on the server. Try: `{}`",
                target.try_command()
            )
        }
        Failure::Refused => format!(
            "cannot reach {server}: {at} refused the connection. Is sshd running there, and is \
             the port right (ssh.port in luma.yml, or Port in your ssh config)?"
        ),
        Failure::Timeout => format!(
            "cannot reach {server}: no answer from {at} within {CONNECT_TIMEOUT_S}s. Check the \
             address and port, and any firewall between you and it."
        ),
        Failure::Unresolved => format!(
            "cannot resolve the host name of {server} ({}): check `server:` in luma.yml, or \
             HostName in your ssh config",
            e.hostname
        ),
        Failure::Unreachable => format!(
            "cannot reach {server} ({at}): no route to it. {}",
            last_lines(stderr, 2)
        ),
        Failure::Other => format!(
            "ssh to {server} ({at}) failed ({status}): {}. Try: `{}`",
            last_lines(stderr, 4),
            target.try_command()
        ),
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        return "ssh said nothing".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ssh;

    fn strs(a: &[OsString]) -> Vec<String> {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn target() -> SshTarget {
        SshTarget::with_config(
            "deploy@web1",
            Some(&Ssh {
                username: Some("ignored".into()),
                port: Some(2222),
                key_file: Some("~/.ssh/luma key".into()),
            }),
            Some(PathBuf::from("/etc/luma/ssh_config")),
        )
    }

    #[test]
    fn target_takes_user_from_server_then_settings() {
        let t = target();
        assert_eq!(t.user.as_deref(), Some("deploy"));
        assert_eq!(t.host(), "web1");
        assert_eq!(t.port, Some(2222));
        let plain = SshTarget::with_config(
            "web2",
            Some(&Ssh {
                username: Some("ops".into()),
                port: None,
                key_file: None,
            }),
            None,
        );
        assert_eq!(plain.user.as_deref(), Some("ops"));
        assert_eq!(plain.host(), "web2");
        let bare = SshTarget::with_config("web3", None, None);
        assert_eq!((bare.user, bare.port, bare.key_file), (None, None, None));
    }

    #[test]
    fn bad_destinations_are_refused() {
        for s in ["-oProxyCommand=x", "", "user@", "a b"] {
            assert!(
                SshTarget::with_config(s, None, None).check().is_err(),
                "{s}"
            );
        }
        assert!(SshTarget::with_config("u@h.example", None, None)
            .check()
            .is_ok());
    }

    #[test]
    fn master_argv_is_strict_and_multiplexed() {
        let a = strs(&target().master_args(Path::new("/tmp/luma-ssh-1/c")));
        let joined = a.join(" ");
        for want in [
            "-F /etc/luma/ssh_config",
            "-p 2222",
            "-l deploy",
            "-i ~/.ssh/luma key",
            "-o IdentitiesOnly=yes",
            "-o BatchMode=yes",
            "-o StrictHostKeyChecking=yes",
            "-o ControlMaster=yes",
            "-o ControlPersist=no",
            "-o ServerAliveInterval=15",
            "-S /tmp/luma-ssh-1/c -N web1",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
        assert!(!joined.contains("accept-new"));
        assert_eq!(a.last().map(String::as_str), Some("web1"));
    }

    #[test]
    fn mux_argv_never_falls_back_and_quotes_remote_words() {
        let a = strs(&target().mux_args(Path::new("/tmp/x/c"), &["sh", "-c", "echo 'hi' $HOME"]));
        let dd = a.iter().position(|w| w == "--").expect("--");
        assert_eq!(a[dd - 1], "web1");
        assert_eq!(a[dd + 1..], ["sh", "-c", r#"'echo '\''hi'\'' $HOME'"#]);
        let joined = a.join(" ");
        assert!(joined.contains("-o ControlMaster=no -o ProxyCommand=false -S /tmp/x/c"));
        let c = strs(&target().control_args(Path::new("/tmp/x/c"), "exit"));
        assert_eq!(c[c.len() - 4..], ["/tmp/x/c", "-O", "exit", "web1"]);
    }

    #[test]
    fn shell_quote_keeps_plain_words() {
        assert_eq!(shell_quote("docker"), "docker");
        assert_eq!(shell_quote("a:b/c-d_e.f"), "a:b/c-d_e.f");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn classifies_ssh_failures() {
        let unknown = "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested \
                       strict checking.\r\nHost key verification failed.\r\n";
        assert_eq!(classify(unknown), Failure::UnknownHostKey);
        let changed = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
            @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
            The fingerprint for the ED25519 key sent by the remote host is\n\
            SHA256:abc.\n\
            Add correct host key in /tmp/t/known_hosts to get rid of this message.\n\
            Offending ED25519 key in /tmp/t/known_hosts:1\n\
            Host key for [127.0.0.1]:2222 has changed and you have requested strict checking.\n\
            Host key verification failed.\n";
        assert_eq!(
            classify(changed),
            Failure::ChangedHostKey(Some(("/tmp/t/known_hosts".into(), "1".into())))
        );
        assert_eq!(
            classify("deploy@127.0.0.1: Permission denied (publickey).\r\n"),
            Failure::AuthDenied
        );
        assert_eq!(
            classify(
                "Warning: Identity file /nope not accessible: No such file or directory.\n\
                 u@h: Permission denied (publickey).\n"
            ),
            Failure::KeyUnreadable
        );
        assert_eq!(
            classify("ssh: connect to host 127.0.0.1 port 9: Connection refused\r\n"),
            Failure::Refused
        );
        assert_eq!(
            classify("ssh: connect to host 10.1.1.1 port 22: Connection timed out\r\n"),
            Failure::Timeout
        );
        assert_eq!(
            classify("ssh: Could not resolve hostname nope: Name or service not known\r\n"),
            Failure::Unresolved
        );
        assert_eq!(
            classify("kex_exchange_identification: Connection closed by remote host\r\n"),
            Failure::Other
        );
    }

    #[test]
    fn parses_ssh_g() {
        let out = "user al\nhostname 127.0.0.9\nport 2200\nbatchmode yes\n\
                   userknownhostsfile /tmp/x/kh /tmp/x/kh2\nproxycommand none\n\
                   identityfile ~/.ssh/id_rsa\n";
        let e = parse_effective(out);
        assert_eq!(
            e,
            Effective {
                hostname: "127.0.0.9".into(),
                port: 2200,
                user: "al".into(),
                known_hosts: vec!["/tmp/x/kh".into(), "/tmp/x/kh2".into()],
                host_key_alias: None,
                proxied: false,
            }
        );
        assert!(parse_effective("hostname h\nproxyjump bastion\n").proxied);
        assert_eq!(parse_effective("hostname h\n").port, 22);
    }

    #[test]
    fn trust_command_names_port_file_and_alias() {
        let t = target();
        let mut e = parse_effective(
            "hostname 127.0.0.1\nport 2222\nuserknownhostsfile /tmp/t d/known_hosts\n",
        );
        e.known_hosts = vec!["/tmp/t d/known_hosts".into()];
        assert_eq!(
            trust_command(&t, &e),
            "ssh-keyscan -p 2222 127.0.0.1 >> '/tmp/t d/known_hosts'"
        );
        e.port = 22;
        e.host_key_alias = Some("web".into());
        assert_eq!(
            trust_command(&t, &e),
            "ssh-keyscan 127.0.0.1 | sed 's/^[^ ]*/web/' >> '/tmp/t d/known_hosts'"
        );
        e.proxied = true;
        let c = trust_command(&t, &e);
        assert!(c.starts_with("ssh -o StrictHostKeyChecking=ask -F /etc/luma/ssh_config -p 2222"));
        assert!(c.contains("deploy@web1 true"));
    }

    #[test]
    fn try_command_quotes_and_shows_no_secret() {
        assert_eq!(
            target().try_command(),
            "ssh -F /etc/luma/ssh_config -p 2222 -i '~/.ssh/luma key' deploy@web1 true"
        );
    }

    #[test]
    fn old_empty_socket_dirs_are_swept_and_nothing_else() {
        let make = |age: Option<&str>, with_file: bool| {
            let d = PrivateDir::create().expect("dir");
            if with_file {
                std::fs::write(d.path.join("c"), "").expect("file");
            }
            if let Some(age) = age {
                let ok = std::process::Command::new("touch")
                    .args(["-d", age])
                    .arg(&d.path)
                    .status()
                    .expect("touch");
                assert!(ok.success());
            }
            d
        };
        let old_empty = make(Some("1 hour ago"), false);
        let old_full = make(Some("1 hour ago"), true);
        let fresh = make(None, false);
        sweep_leftovers();
        assert!(!old_empty.path.exists());
        assert!(old_full.path.join("c").exists());
        assert!(fresh.path.exists());
    }

    #[tokio::test]
    async fn private_dir_is_0700_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let d = PrivateDir::create().expect("dir");
        let path = d.path.clone();
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(path.join("c").to_string_lossy().len() < 40);
        drop(d);
        assert!(!path.exists());
    }

    /// A throwaway sshd on 127.0.0.1 with its own host key and a test client key, in a
    /// private directory. Dropping it kills sshd (by its pid) and removes the directory.
    struct Sshd {
        dir: PrivateDir,
        child: std::process::Child,
        port: u16,
        log: Arc<Mutex<String>>,
    }

    impl Sshd {
        fn start() -> Sshd {
            use std::io::BufRead;
            use std::process::Command;
            let dir = PrivateDir::create().expect("temp dir");
            let d = dir.path.clone();
            let keygen = |name: &str| {
                let ok = Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                    .arg(d.join(name))
                    .status()
                    .expect("ssh-keygen (install openssh-client)");
                assert!(ok.success(), "ssh-keygen {name}");
            };
            keygen("host_key");
            keygen("other_host_key");
            keygen("client_key");
            std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("copy");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let conf = format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nStrictModes no\n\
                 PidFile {d}/sshd.pid\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
                d = d.display()
            );
            std::fs::write(d.join("sshd_config"), conf).expect("sshd_config");
            let pubkey = |f: &str| {
                let k = std::fs::read_to_string(d.join(f)).expect("pub key");
                k.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
            };
            let entry = |f: &str| format!("[127.0.0.1]:{port} {}\n", pubkey(f));
            std::fs::write(d.join("known_hosts"), entry("host_key.pub")).expect("kh");
            std::fs::write(d.join("known_hosts_other"), entry("other_host_key.pub")).expect("kh");
            std::fs::write(d.join("known_hosts_empty"), "").expect("kh");
            let mut cfg = String::new();
            for (alias, kh) in [
                ("ok", "known_hosts"),
                ("changed", "known_hosts_other"),
                ("unknown", "known_hosts_empty"),
            ] {
                cfg.push_str(&format!(
                    "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  \
                     IdentityFile {d}/client_key\n  IdentitiesOnly yes\n  \
                     UserKnownHostsFile {d}/{kh}\n",
                    d = d.display()
                ));
            }
            std::fs::write(d.join("ssh_config"), cfg).expect("ssh_config");
            // Debian's package makes sshd's privilege separation directory at boot only.
            let _ = std::fs::create_dir_all("/run/sshd");
            let mut child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start /usr/sbin/sshd (install openssh-server)");
            // Ready once it says it listens; everything it logs is kept for the asserts.
            let log = Arc::new(Mutex::new(String::new()));
            let (tx, rx) = std::sync::mpsc::channel();
            let err = child.stderr.take().expect("stderr");
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    if line.contains("Server listening") {
                        let _ = tx.send(());
                    }
                    let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            });
            let mut sshd = Sshd {
                dir,
                child,
                port,
                log,
            };
            if rx.recv_timeout(Duration::from_secs(20)).is_err() {
                let _ = sshd.child.kill();
                panic!("sshd did not start: {}", sshd.log());
            }
            sshd
        }

        fn log(&self) -> String {
            self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        fn target(&self, alias: &str) -> SshTarget {
            SshTarget::with_config(alias, None, Some(self.dir.path.join("ssh_config")))
        }
    }

    impl Drop for Sshd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn a_master_against_a_real_sshd() {
        let sshd = Sshd::start();

        // Trusted key: one login, commands ride on it, argv words survive the remote shell.
        let m = Master::open(&sshd.target("ok")).await.expect("open");
        let out = m
            .command(&["printf", "%s|", "a b", "it's", "$HOME"])
            .output()
            .await
            .expect("run");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|it's|$HOME|");
        let out = m.command(&["true"]).output().await.expect("run");
        assert!(out.status.success());
        let logins = |log: &str| log.matches("Accepted publickey").count();
        assert_eq!(logins(&sshd.log()), 1, "{}", sshd.log());
        assert!(!m.is_closed());

        // Once the master is gone, a command fails instead of logging in again.
        let dir = m.ctl.parent().expect("dir").to_path_buf();
        let exited = std::process::Command::new("ssh")
            .args(m.target.control_args(&m.ctl, "exit"))
            .output()
            .expect("ssh -O exit");
        assert!(exited.status.success(), "{exited:?}");
        let out = m.command(&["true"]).output().await.expect("run");
        assert_eq!(out.status.code(), Some(255), "{out:?}");
        assert_eq!(logins(&sshd.log()), 1, "{}", sshd.log());
        let until = Instant::now() + Duration::from_secs(10);
        while !m.is_closed() {
            assert!(Instant::now() < until, "the master did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(m);
        assert!(!dir.exists(), "{} is left behind", dir.display());

        // An unknown key: refused, with its fingerprint and the command that trusts it.
        let e = Master::open(&sshd.target("unknown"))
            .await
            .expect_err("unknown key accepted");
        let kh = sshd.dir.path.join("known_hosts_empty");
        assert!(e.contains("is not known"), "{e}");
        assert!(e.contains("SHA256:"), "{e}");
        let trust = format!("ssh-keyscan -p {} 127.0.0.1 >> {}", sshd.port, kh.display());
        assert!(e.contains(&trust), "{e}");
        assert_eq!(std::fs::read_to_string(&kh).expect("kh"), "");
        // ... and that command does trust it.
        let scan = std::process::Command::new("sh")
            .args(["-c", &trust])
            .stderr(Stdio::null())
            .status()
            .expect("sh");
        assert!(scan.success());
        drop(
            Master::open(&sshd.target("unknown"))
                .await
                .expect("trusted now"),
        );

        // A changed key: refused, never trusted.
        let e = Master::open(&sshd.target("changed"))
            .await
            .expect_err("changed key accepted");
        assert!(e.contains("has CHANGED") && e.contains("refuses"), "{e}");
        assert_eq!(logins(&sshd.log()), 2, "{}", sshd.log());
    }

    #[tokio::test]
    async fn a_command_through_the_master_gives_its_output_its_error_or_a_timeout() {
        let sshd = Sshd::start();
        let m = Master::open(&sshd.target("ok")).await.expect("open");
        let limit = Duration::from_secs(20);
        // The server here is this machine: its routing table is the one luma reads locally.
        let remote = m.output(&["cat", "/proc/net/route"], limit).await;
        let local = std::fs::read_to_string("/proc/net/route").expect("local table");
        assert_eq!(
            crate::netpool::parse_routes(&remote.expect("cat")),
            crate::netpool::parse_routes(&local)
        );
        let e = m
            .output(
                &["sh", "-c", "echo out; echo 'no such table' >&2; exit 3"],
                limit,
            )
            .await
            .expect_err("exit 3");
        assert!(
            e.starts_with("`sh -c echo out; echo 'no such table' >&2; exit 3` on ok failed (exit status: 3): no such table"),
            "{e}"
        );
        let started = Instant::now();
        let e = m
            .output(&["sleep", "30"], Duration::from_millis(300))
            .await
            .expect_err("timeout");
        assert_eq!(e, "`sleep 30` on ok did not finish within 0.3s");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // Nothing was left holding the connection: it still carries commands.
        assert_eq!(
            m.output(&["echo", "still"], limit).await.as_deref(),
            Ok("still\n")
        );
    }

    /// The "luma" of [`a_master_ends_with_luma_even_when_luma_is_killed`], run by it as a
    /// separate process (does nothing otherwise). Opens a master from a thread that ends at
    /// once, checks that the master outlives that thread, says where it is, and waits to be
    /// killed.
    #[test]
    #[ignore = "a helper process of a_master_ends_with_luma_even_when_luma_is_killed"]
    fn killed_luma_helper() {
        let Some(config) = std::env::var_os("LUMA_TEST_KILLED_CONFIG") else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let target = SshTarget::with_config("ok", None, Some(PathBuf::from(config)));
        let handle = rt.handle().clone();
        // The kernel's parent of a forked process is the forking thread: this one ends here,
        // and the master must not end with it.
        let m = std::thread::spawn(move || handle.block_on(Master::open(&target)))
            .join()
            .expect("thread")
            .expect("open");
        rt.block_on(async {
            let out = m
                .command(&["true"])
                .stdin(Stdio::null())
                .output()
                .await
                .expect("run");
            assert!(
                out.status.success(),
                "the master ended with its thread: {out:?}"
            );
        });
        let pid = m
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|c| c.id())
            .expect("master pid");
        println!("master up {pid} {}", m.ctl.display());
        // Killed long before this ends.
        std::thread::sleep(Duration::from_secs(120));
    }

    #[tokio::test]
    async fn a_master_ends_with_luma_even_when_luma_is_killed() {
        use std::io::BufRead;
        /// Kills what is left if an assert fails: the helper, and a master that outlived it.
        struct Cleanup {
            luma: std::process::Child,
            master: Option<(i32, PathBuf)>,
        }
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = self.luma.kill();
                let _ = self.luma.wait();
                if let Some((pid, ctl)) = self.master.take() {
                    // Still listening: it is ours and alive.
                    if ctl.exists() {
                        // SAFETY: a plain kill(2) of our own grandchild.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    if let Some(dir) = ctl.parent() {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
            }
        }

        let sshd = Sshd::start();
        let said = sshd.dir.path.join("helper.err");
        let err = std::fs::File::create(&said).expect("helper.err");
        let luma = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "ssh::tests::killed_luma_helper",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LUMA_TEST_KILLED_CONFIG", sshd.dir.path.join("ssh_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("run the helper");
        let mut run = Cleanup { luma, master: None };
        let out = run.luma.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let up = loop {
            let Ok(l) = lines.recv_timeout(Duration::from_secs(30)) else {
                panic!(
                    "the helper did not say its master is up: {}\nsshd: {}",
                    std::fs::read_to_string(&said).unwrap_or_default(),
                    sshd.log()
                );
            };
            // After libtest's own "test NAME ... " on the same line.
            if let Some((_, rest)) = l.split_once("master up ") {
                break rest.to_string();
            }
        };
        let (pid, ctl) = up.split_once(' ').expect("pid and socket");
        let ctl = PathBuf::from(ctl);
        run.master = Some((pid.parse().expect("pid"), ctl.clone()));
        assert!(ctl.exists(), "{}", ctl.display());
        let gone = |log: &str| {
            [
                "Disconnected from",
                "Received disconnect",
                "Connection closed by",
            ]
            .iter()
            .any(|w| log.contains(w))
        };
        assert_eq!(sshd.log().matches("Accepted publickey").count(), 1);
        assert!(!gone(&sshd.log()), "{}", sshd.log());

        // SIGKILL: no Drop runs in the helper. The kernel sends its master SIGTERM; ssh says
        // goodbye to the server and removes its socket.
        run.luma.kill().expect("kill the helper");
        run.luma.wait().expect("wait for the helper");
        let until = Instant::now() + Duration::from_secs(10);
        while ctl.exists() || !gone(&sshd.log()) {
            assert!(
                Instant::now() < until,
                "the master outlived luma: socket there: {}; sshd: {}",
                ctl.exists(),
                sshd.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Only the empty directory is left (a later run sweeps it).
        let dir = ctl.parent().expect("dir").to_path_buf();
        std::fs::remove_dir(&dir).expect("the socket's directory is left empty");
    }
}
