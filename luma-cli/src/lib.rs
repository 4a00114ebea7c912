//! The `luma` CLI as a library. `main.rs` only parses arguments and prints.
//!
//! - [`config`]: `luma.yml`, validated with errors that name the file, key and fix;
//! - [`names`]: every Docker name Luma creates (validators come from `luma-api`);
//! - [`engine`]: the only way to Docker (bollard), on this machine or over SSH ([`ssh`]);
//! - [`fleet`]: the servers of a project, the lock across them, images put on them
//!   ([`transfer`]: streamed between engines, or through a registry);
//! - [`proxyctl`]: the proxy's lifecycle, and the only way to its admin API (typed, `luma-api`);
//!   [`proxystart`]: whether a proxy that does not answer yet has exited;
//! - [`project`]: what a release stands on: proxy, network, services, preflight checks;
//! - [`netpool`]: the subnet of each new project network, from Luma's pool, clear of the
//!   engine's networks and the host's routes; [`hostpath`]: the firewall rule that lets
//!   established traffic inside the pool skip Docker's per-network rules;
//! - [`release`]: a release as phases: prepare (reversible) -> switch -> settle, all or nothing
//!   across servers;
//! - [`inventory`]: what a project has on the engine by label: status, remove, prune;
//! - [`tls`]: an app's HTTPS: custom certificates checked in preflight, certificate state;
//! - [`lock`]: one deploy per project at a time; [`interrupt`]: signals and failpoints;
//! - [`ui`]: steps, progress and tables.

pub mod buildctx;
pub mod config;
pub mod engine;
pub mod fleet;
pub mod hostpath;
pub mod interrupt;
pub mod inventory;
pub mod lock;
pub mod names;
pub mod netpool;
pub mod project;
pub mod proxyctl;
pub mod proxystart;
pub mod release;
pub mod secrets;
pub mod ssh;
pub mod tls;
pub mod transfer;
pub mod ui;
