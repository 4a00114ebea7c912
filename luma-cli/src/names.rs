//! Every Docker name Luma creates, in one place, so they are scoped to the project and cannot
//! collide.
//!
//! Project and app names are DNS labels without `--`, so `_` (never in a label) separates parts
//! of container and image names, and `--` separates an app from its release in network aliases.
//! Project `a-b` with app `c` and project `a` with app `b-c` therefore get `a-b_c_…` and
//! `a_b-c_…`.

pub const LABEL_PROJECT: &str = "luma.project";
pub const LABEL_APP: &str = "luma.app";
pub const LABEL_RELEASE: &str = "luma.release";
pub const LABEL_ROLE: &str = "luma.role";
pub const LABEL_REPLICA: &str = "luma.replica";
pub const LABEL_FINGERPRINT: &str = "luma.fingerprint";
pub const LABEL_CREATED_BY: &str = "luma.created-by";

pub const ROLE_APP: &str = "app";
pub const ROLE_SERVICE: &str = "service";
pub const ROLE_PROXY: &str = "proxy";
pub const ROLE_LOCK: &str = "lock";
pub const ROLE_MARKER: &str = "live-marker";
/// Images Luma built (apps and services).
pub const ROLE_IMAGE: &str = "image";

pub fn network(project: &str) -> String {
    format!("{project}-network")
}

pub fn app_container(project: &str, app: &str, release: &str, replica: u32) -> String {
    format!("{project}_{app}_{release}_{replica}")
}

pub fn service_container(project: &str, service: &str) -> String {
    format!("{project}_{service}")
}

/// The alias a release answers to (checked to fit one DNS label) and the release a route
/// target names: defined once, in `luma-api`.
pub use luma_api::names::{release_alias, release_of_target};

pub fn image_repo(project: &str, app: &str) -> String {
    format!("{project}_{app}")
}

/// A created, never started container whose labels record an app's live release.
pub fn live_marker(project: &str, app: &str) -> String {
    format!("{project}_{app}_live")
}

pub fn lock_container(project: &str) -> String {
    format!("luma-lock_{project}")
}

pub fn proxy_volume(proxy: &str) -> String {
    format!("{proxy}-state")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookalike_project_app_pairs_do_not_collide() {
        assert_ne!(
            app_container("a-b", "c", "r1", 1),
            app_container("a", "b-c", "r1", 1)
        );
        assert_ne!(service_container("a-b", "c"), service_container("a", "b-c"));
        assert_ne!(image_repo("a-b", "c"), image_repo("a", "b-c"));
        assert_ne!(network("a-b"), network("a"));
    }

    #[test]
    fn release_round_trips_through_the_route_target() {
        let alias = release_alias("web", "3f2a1c9").unwrap();
        assert_eq!(
            release_of_target("web", &format!("{alias}:3000")).as_deref(),
            Some("3f2a1c9")
        );
        assert_eq!(release_of_target("api", &format!("{alias}:3000")), None);
    }
}
