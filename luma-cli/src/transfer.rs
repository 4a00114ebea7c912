//! Puts an image on a server's engine with the same image ID it has where it was built.
//!
//! Without a registry ([`send`]), the builder's `docker save` streams straight into the
//! server's `docker load`: the export's response body is the load's request body, through
//! hyper on both sides. There is no temp file and no copy in memory, only what the two
//! connections buffer, and the ssh channel's flow control paces the export to the server's
//! speed. This replaces the original Luma's `save | gzip > tmp; scp; load`. An image the
//! server already has under that tag with that ID is skipped.
//!
//! A load is all or nothing for the tag: the engine tags the image only after it has read all of
//! it. So an interrupted stream leaves no tag, and a tag that points at another image after a
//! failed load is the one the server had before (a service's `:latest`, a user's
//! `postgres:16`): it is never removed, and the error says where it still points. After a load
//! that succeeded, the server's ID for the tag must equal the builder's. A mismatch (the tag
//! moved on the builder during the transfer, so the load moved it on the server to what the
//! export carried) fails, and removes the tag there unless it still points at the image it
//! had before the transfer (then the load did not move it).
//!
//! With `docker.registry` ([`push`] once, [`pull`] per server), the pull is by the manifest
//! digest the push produced, so each server gets exactly the pushed content.
//!
//! Sizes are in decimal MB (10^6 bytes), like Docker's. The total used for the ETA is the
//! image's size on the builder. The tar is about that size (plus headers and metadata), so the
//! ETA is an estimate.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;

use crate::engine::{split_reference, Engine, LoadFailure, Transport};
use crate::ui::Ui;

/// What [`send`] or [`pull`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    /// The server had that image ID under that tag already; nothing moved.
    AlreadyThere,
    /// Streamed without a registry: tar bytes sent, and the time from export to loaded.
    Streamed { bytes: u64, elapsed: Duration },
    /// Pulled from the registry.
    Pulled { elapsed: Duration },
}

/// A registry's address and login. `password` is the secret's value; Debug never shows it.
#[derive(Clone, PartialEq)]
pub struct RegistryAuth {
    pub address: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("address", &self.address)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RegistryAuth {
    /// For the engine's `X-Registry-Auth` header (never logged).
    pub(crate) fn credentials(&self) -> bollard::auth::DockerCredentials {
        bollard::auth::DockerCredentials {
            username: self.username.clone(),
            password: self.password.clone(),
            serveraddress: Some(self.address.clone()),
            ..Default::default()
        }
    }
}

/// Puts `image` (a tag on `from`) on `to` with the same image ID. Skips when `to` already has
/// that ID under that tag. Streams `from`'s export into `to`'s load (no temp file, bounded
/// memory), printing progress per server (bytes, rate, ETA) via Ui. Verifies the loaded ID. An
/// interrupted load tags nothing and removes nothing (a tag there is the server's own, from
/// before); a load that moved the tag to another image than the builder's removes it. The Err
/// says what broke ("the ssh connection to SERVER closed after 12.0 of 256.0 MB") and where the
/// tag points.
pub async fn send(from: &Engine, to: &Engine, image: &str, ui: &Ui) -> Result<Delivered, String> {
    let server = to.server();
    let src = from.image_info(image).await?.ok_or_else(|| {
        format!(
            "cannot send {image} to {server}: {image} is not on {} (build or pull it there first)",
            from.server()
        )
    })?;
    // What the tag on the server points at before this transfer: never removed by it.
    let before = to.image_id(image).await?;
    if before.as_deref() == Some(src.id.as_str()) {
        ui.info(format!("  ✓ {server}: {image} already there"));
        return Ok(Delivered::AlreadyThere);
    }
    // The same image under another tag (an earlier release of the same build): tag it, send
    // nothing.
    if to.image_id(&src.id).await?.as_deref() == Some(src.id.as_str()) {
        let (repo, tag) = split_reference(image);
        to.tag_image(&src.id, repo, tag).await?;
        if to.image_id(image).await?.as_deref() == Some(src.id.as_str()) {
            ui.info(format!(
                "  ✓ {server}: {image} already there (image {}, tagged)",
                short_id(&src.id)
            ));
            return Ok(Delivered::AlreadyThere);
        }
    }
    ui.info(format!(
        "  … {server}: sending {image} (about {} MB)",
        mb(src.size)
    ));

    let meter = Arc::new(Meter::default());
    let started = Instant::now();
    let load = to.load_image_detailed(Metered {
        inner: from.export_image(image),
        meter: meter.clone(),
    });
    tokio::pin!(load);
    // On a terminal the line replaces itself; in a log, one line every 2 s at most.
    let every = if ui.replaces_lines() {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(2)
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            r = &mut load => break r,
            _ = tick.tick() => {
                let line = progress_line(server, image, &meter.progress(), src.size);
                if ui.replaces_lines() {
                    ui.progress(format!("… {line}"));
                } else {
                    ui.info(format!("  … {line}"));
                }
            }
        }
    };
    ui.progress_done();
    let sent = meter.sent.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    let of = format!("{} of {} MB", mb(sent), mb(src.size.max(sent)));

    let export_error = meter.error();
    let broke = match (export_error, result) {
        (Some(e), _) => Some(format!(
            "reading it from {} broke after {of}: {e}",
            from.server()
        )),
        (None, Ok(())) => None,
        (None, Err(LoadFailure::Engine(m))) => Some(format!("{m} (after {of})")),
        (None, Err(LoadFailure::Connection(m))) => Some(match &to.transport {
            Transport::Ssh(_) => format!("the ssh connection to {server} closed after {of} ({m})"),
            Transport::Local => {
                format!("the connection to the Docker engine on {server} broke after {of} ({m})")
            }
        }),
    };
    if let Some(what) = broke {
        let tag = match to.image_id(image).await {
            // Complete after all: the engine tags only a whole image.
            Ok(Some(id)) if id == src.id => {
                ui.info(done_line(server, image, sent, elapsed));
                return Ok(Delivered::Streamed {
                    bytes: sent,
                    elapsed,
                });
            }
            // A failed load tags nothing: whatever the tag points at is not this transfer's to
            // remove.
            Ok(now) => failed_load_tag(image, server, before.as_deref(), now.as_deref()),
            Err(e) => format!(
                "Luma could not check the tag on {server} ({e}); a load tags an image only once \
                 it has all of it, so this transfer tagged nothing there"
            ),
        };
        return Err(format!("sending {image} to {server} failed: {what}; {tag}"));
    }

    match to.image_id(image).await? {
        Some(id) if id == src.id => {
            ui.info(done_line(server, image, sent, elapsed));
            Ok(Delivered::Streamed {
                bytes: sent,
                elapsed,
            })
        }
        Some(other) => {
            // Removed only when this load moved it; where it still points at the image it had
            // before, that is the server's own.
            let cleanup = if before.as_deref() == Some(other.as_str()) {
                format!(
                    "the tag on {server} still points at the image it had before, so it was left \
                     as it is"
                )
            } else {
                match to.untag_image(image).await {
                    Ok(()) => format!("the tag was removed on {server}"),
                    Err(e) => format!("removing the tag on {server} failed too: {e}"),
                }
            };
            Err(format!(
                "after sending {image} to {server}, it is {} there but {} on {}: did {image} \
                 change on {} during the transfer? {cleanup}; deploy again",
                short_id(&other),
                short_id(&src.id),
                from.server(),
                from.server()
            ))
        }
        None => Err(format!(
            "docker load on {server} finished, but {image} is not there: the export from {} did \
             not carry that tag",
            from.server()
        )),
    }
}

/// Where the tag stands after a failed load (`before`: what it pointed at before the transfer,
/// `now`: after). The load tagged nothing, so nothing is removed; this only says so.
fn failed_load_tag(image: &str, server: &str, before: Option<&str>, now: Option<&str>) -> String {
    match now {
        None => format!("nothing was tagged {image} on {server}"),
        Some(id) if before == Some(id) => format!(
            "nothing was tagged {image} on {server} (the tag still points at the image it had \
             before, {})",
            short_id(id)
        ),
        // Something else changed it meanwhile, or the load did finish (the answer was lost)
        // with what the export carried after the tag moved on the builder. Which one cannot be
        // told, so it is not ours to remove.
        Some(id) => format!(
            "the tag {image} on {server} now points at {}, which is neither the image it had \
             before nor the one sent; it was left as it is",
            short_id(id)
        ),
    }
}

/// The same through a registry: tag `<registry>/<image>`, push once from `from`, and return
/// the reference to pull: `<registry>/<repo>@sha256:...`, the manifest digest the push
/// produced. Pulling by digest gets exactly the pushed content, hence the same image ID.
pub async fn push(
    from: &Engine,
    image: &str,
    reg: &RegistryAuth,
    ui: &Ui,
) -> Result<String /*remote ref*/, String> {
    if from.image_id(image).await?.is_none() {
        return Err(format!(
            "cannot push {image}: it is not on {} (build or pull it there first)",
            from.server()
        ));
    }
    let remote = registry_name(&reg.address, image);
    let (repo, tag) = split_reference(&remote);
    from.tag_image(image, repo, tag).await?;
    let started = Instant::now();
    let pushed = from.push_image(&remote, Some(reg)).await;
    let info = from.image_info(&remote).await;
    // The extra name was only for the push; `image` keeps the image. (An image already named
    // under the registry is its own name: it stays.)
    if remote != image {
        let _ = from.untag_image(&remote).await;
    }
    pushed?;
    let digest = info?.and_then(|i| {
        let prefix = format!("{repo}@");
        i.repo_digests.into_iter().find(|d| d.starts_with(&prefix))
    });
    ui.info(format!(
        "  ✓ pushed {image} to {} ({:.1}s)",
        reg.address,
        started.elapsed().as_secs_f64()
    ));
    // An engine that records no digest still pulls by tag.
    Ok(digest.unwrap_or(remote))
}

/// Pulls `remote_ref` (from [`push`]) on `to`, tags it back as `image`, and checks the tag
/// points at what was pulled. Skips the pull when `image` is already that image.
pub async fn pull(
    to: &Engine,
    remote_ref: &str,
    image: &str,
    reg: &RegistryAuth,
    ui: &Ui,
) -> Result<Delivered, String> {
    let server = to.server();
    // Only a digest names fixed content; a tag in the registry may have moved since.
    if remote_ref.contains('@') {
        if let (Some(have), Some(want)) =
            (to.image_id(image).await?, to.image_id(remote_ref).await?)
        {
            if have == want {
                ui.info(format!("  ✓ {server}: {image} already there"));
                return Ok(Delivered::AlreadyThere);
            }
        }
    }
    let started = Instant::now();
    to.pull_image(remote_ref, Some(reg)).await?;
    let pulled = to.image_id(remote_ref).await?.ok_or_else(|| {
        format!("pull {remote_ref} on {server} finished, but the image is not there")
    })?;
    let (repo, tag) = split_reference(image);
    to.tag_image(&pulled, repo, tag).await?;
    match to.image_id(image).await? {
        Some(id) if id == pulled => {}
        other => {
            let _ = to.untag_image(image).await;
            return Err(format!(
                "after pulling {remote_ref} on {server}, {image} points at {} instead of the \
                 pulled {}; the tag was removed",
                other.as_deref().map(short_id).unwrap_or("nothing"),
                short_id(&pulled)
            ));
        }
    }
    // Only the release's own tag stays: a leftover `<registry>/<repo>@sha256` reference would
    // keep the image on the server after Luma prunes that release.
    // (Only a digest reference: a tag is the image's own name when it already names the
    // registry, and must stay.)
    let by_digest = remote_ref.contains('@') && remote_ref != image;
    if let Err(e) = async {
        if by_digest {
            to.untag_image(remote_ref).await
        } else {
            Ok(())
        }
    }
    .await
    {
        ui.info(format!(
            "  ! {server}: could not remove the reference {remote_ref} ({e}); `docker rmi` it there"
        ));
    }
    let elapsed = started.elapsed();
    ui.info(format!(
        "  ✓ {server}: pulled {image} from {} ({:.1}s)",
        reg.address,
        elapsed.as_secs_f64()
    ));
    Ok(Delivered::Pulled { elapsed })
}

/// `<registry>/<image>`. A registry host already in `image` (`localhost:5000/x`,
/// `ghcr.io/x`) is dropped: a `host:port` cannot be a path component.
fn registry_name(registry: &str, image: &str) -> String {
    let registry = registry
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let path = match image.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest
        }
        _ => image,
    };
    format!("{registry}/{path}")
}

/// Counts what the export has produced, so progress and errors can say how far it got.
#[derive(Default)]
struct Meter {
    sent: AtomicU64,
    ended: AtomicBool,
    first_byte: Mutex<Option<Instant>>,
    error: Mutex<Option<String>>,
}

/// A moment of a transfer, for [`progress_line`].
#[derive(Debug, Clone, PartialEq)]
struct Progress {
    sent: u64,
    /// Time since the first byte (the engine may prepare the export for a while before it).
    streaming: Option<Duration>,
    /// The export has ended; the server is finishing the load.
    ended: bool,
}

impl Meter {
    fn progress(&self) -> Progress {
        Progress {
            sent: self.sent.load(Ordering::Relaxed),
            streaming: self
                .first_byte
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|t| t.elapsed()),
            ended: self.ended.load(Ordering::Relaxed),
        }
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The export stream, counted on its way into the load.
struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S: Stream<Item = Result<Bytes, String>> + Unpin> Stream for Metered<S> {
    type Item = Result<Bytes, String>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = Pin::new(&mut self.inner).poll_next(cx);
        let m = &self.meter;
        match &item {
            Poll::Ready(Some(Ok(b))) => {
                m.first_byte
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(Instant::now);
                m.sent.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            Poll::Ready(Some(Err(e))) => {
                *m.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            }
            Poll::Ready(None) => m.ended.store(true, Ordering::Relaxed),
            Poll::Pending => {}
        }
        item
    }
}

/// `SERVER: IMAGE 45.0 of 256.0 MB, 120.3 MB/s, ETA 2s` (and its start and end forms).
fn progress_line(server: &str, image: &str, p: &Progress, total: u64) -> String {
    if p.ended {
        return format!("{server}: {image} {} MB sent, loading", mb(p.sent));
    }
    let total = total.max(p.sent);
    let secs = p.streaming.map(|d| d.as_secs_f64()).unwrap_or(0.0);
    if p.sent == 0 || secs <= 0.0 {
        return format!("{server}: {image} 0.0 of {} MB, starting", mb(total));
    }
    let rate = p.sent as f64 / secs;
    format!(
        "{server}: {image} {} of {} MB, {} MB/s, ETA {}",
        mb(p.sent),
        mb(total),
        mb(rate as u64),
        eta((total - p.sent) as f64 / rate)
    )
}

/// The line `benches/transfer.sh` parses: `  ✓ SERVER: sent IMAGE (256.0 MB in 2.1s, 121.9 MB/s)`.
fn done_line(server: &str, image: &str, bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    format!(
        "  ✓ {server}: sent {image} ({} MB in {secs:.1}s, {} MB/s)",
        mb(bytes),
        mb(if secs > 0.0 {
            (bytes as f64 / secs) as u64
        } else {
            bytes
        })
    )
}

/// Decimal megabytes with one decimal.
fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn eta(secs: f64) -> String {
    let s = secs.max(0.0).ceil() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `sha256:0123456789ab...` -> `0123456789ab`, as `docker images` shows it.
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn formats_sizes_and_etas() {
        assert_eq!(mb(256_000_000), "256.0");
        assert_eq!(mb(45_049_999), "45.0");
        assert_eq!(mb(0), "0.0");
        assert_eq!(eta(1.2), "2s");
        assert_eq!(eta(0.0), "0s");
        assert_eq!(eta(59.0), "59s");
        assert_eq!(eta(65.0), "1m05s");
        assert_eq!(eta(7380.0), "2h03m");
        assert_eq!(eta(-3.0), "0s");
    }

    #[test]
    fn progress_lines() {
        let p = |sent, secs: Option<f64>, ended| Progress {
            sent,
            streaming: secs.map(Duration::from_secs_f64),
            ended,
        };
        assert_eq!(
            progress_line(
                "s1",
                "web:1",
                &p(45_000_000, Some(0.374), false),
                256_000_000
            ),
            "s1: web:1 45.0 of 256.0 MB, 120.3 MB/s, ETA 2s"
        );
        assert_eq!(
            progress_line("s1", "web:1", &p(0, None, false), 256_000_000),
            "s1: web:1 0.0 of 256.0 MB, starting"
        );
        // The tar runs a little over the image's size: the total follows, the ETA is 0.
        assert_eq!(
            progress_line(
                "s1",
                "web:1",
                &p(260_000_000, Some(2.0), false),
                256_000_000
            ),
            "s1: web:1 260.0 of 260.0 MB, 130.0 MB/s, ETA 0s"
        );
        assert_eq!(
            progress_line("s1", "web:1", &p(260_000_000, Some(2.0), true), 256_000_000),
            "s1: web:1 260.0 MB sent, loading"
        );
    }

    #[test]
    fn the_sent_line_is_what_the_bench_parses() {
        assert_eq!(
            done_line("luma-s1", "web:1", 256_000_000, Duration::from_millis(2100)),
            "  ✓ luma-s1: sent web:1 (256.0 MB in 2.1s, 121.9 MB/s)"
        );
    }

    #[test]
    fn registry_names() {
        assert_eq!(
            registry_name("127.0.0.1:5000", "luma-gmail-web:abc"),
            "127.0.0.1:5000/luma-gmail-web:abc"
        );
        assert_eq!(
            registry_name("http://reg.example/", "localhost:5000/x/y:1"),
            "reg.example/x/y:1"
        );
        assert_eq!(
            registry_name("reg:5000", "ghcr.io/acme/app:2"),
            "reg:5000/acme/app:2"
        );
        assert_eq!(registry_name("reg:5000", "acme/app"), "reg:5000/acme/app");
    }

    #[test]
    fn a_failed_load_reports_the_tag_and_never_claims_it() {
        let (old, new) = ("sha256:0123456789abcdef", "sha256:fedcba9876543210");
        assert_eq!(
            failed_load_tag("web:1", "s1", None, None),
            "nothing was tagged web:1 on s1"
        );
        assert_eq!(
            failed_load_tag("postgres:16", "s1", Some(old), Some(old)),
            "nothing was tagged postgres:16 on s1 (the tag still points at the image it had \
             before, 0123456789ab)"
        );
        assert_eq!(
            failed_load_tag("web:1", "s1", Some(old), Some(new)),
            "the tag web:1 on s1 now points at fedcba987654, which is neither the image it had \
             before nor the one sent; it was left as it is"
        );
    }

    #[test]
    fn short_ids() {
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
    }

    #[test]
    fn registry_auth_debug_hides_the_password() {
        let a = RegistryAuth {
            address: "127.0.0.1:5000".into(),
            username: Some("luma".into()),
            password: Some("hunter2-secret".into()),
        };
        let d = format!("{a:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("luma") && d.contains("redacted"), "{d}");
    }

    #[tokio::test]
    async fn metered_counts_bytes_errors_and_the_end() {
        let meter = Arc::new(Meter::default());
        let inner = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"de")),
            Err("broken".to_string()),
        ]);
        let mut m = Metered {
            inner,
            meter: meter.clone(),
        };
        while m.next().await.is_some() {}
        let p = meter.progress();
        assert_eq!(p.sent, 5);
        assert!(p.ended && p.streaming.is_some());
        assert_eq!(meter.error().as_deref(), Some("broken"));
    }
}
