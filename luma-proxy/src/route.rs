//! What a route is: defined once in `luma-api` (the admin API receives it and the state file
//! stores it), re-exported here so the proxy's modules name it as their own.

pub use luma_api::route::*;
