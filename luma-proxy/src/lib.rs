//! luma-proxy: one reverse proxy per server, shared by many projects whose apps may share names.
//!
//! The proxy joins every project's Docker network. A request's host picks a [`route::RouteSpec`]
//! (project, app, `alias:port`, network). The alias is resolved as `<alias>.<network>.` through
//! Docker's embedded DNS, answers outside the proxy's own subnet on that network are rejected,
//! and every upstream socket is pinned to that network's interface with `SO_BINDTODEVICE`. Two
//! projects that both call an app `web` therefore never reach each other's containers.
//!
//! The chain of types, each with one job:
//! [`router::Router`] (host -> service, atomically swapped) -> [`service::Service`] (one deployed
//! route and its background refresh) -> [`balancer::LoadBalancer`] (pick a healthy replica) ->
//! [`backend::Backend`] (one replica: pooled connections, in-flight count, health) ->
//! [`health`] (active and passive checks). [`deploy`] states the zero-downtime contract.

pub mod access;
pub mod admin;
pub mod backend;
pub mod balancer;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod deploy;
pub mod h1;
pub mod headers;
pub mod health;
pub mod idle;
pub mod inline;
pub mod log;
pub mod metrics;
pub mod park;
pub mod pipe;
pub mod pool;
pub mod proxy;
pub mod resolve;
pub mod route;
pub mod router;
pub mod server;
pub mod service;
pub mod spread;
pub mod state;
pub mod timer;
pub mod tls;
pub mod token;
pub mod util;
pub mod workers;

pub use config::ProxyConfig;
pub use server::Proxy;
