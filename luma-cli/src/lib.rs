//! The `luma` CLI as a library: configuration, names, the engine transport, and the deploy
//! engine. `main.rs` only parses arguments and prints.

pub mod buildctx;
pub mod config;
pub mod deploy;
pub mod engine;
pub mod lock;
pub mod names;
pub mod proxyctl;
pub mod release;
pub mod secrets;
pub mod ui;
