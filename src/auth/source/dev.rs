//! The `dev` token source (`--dev`'s default): tokens from `meshca dev-token`, signed by
//! the dev key whose JWKS `--dev` keeps in the data directory, checked as the `jwks`
//! source checks tokens, with the dev issuer name.

use super::{jwks, Common};
use crate::auth::discovery::{Settings as KeyRefresh, Source as KeySource};
use crate::setting;

/// The dev-mode issuer name tokens from `meshca dev-token` carry.
pub const DEV_TOKEN_ISSUER: &str = "meshca-dev";

/// The jwks settings for the dev key; only with `--dev`.
pub(super) fn settings(common: Common) -> Result<jwks::Settings, setting::Error> {
    let Some(jwks_file) = common.dev_jwks else {
        return Err(setting::Error::Invalid {
            setting: "token-validation",
            reason: "dev token validation needs --dev".into(),
        });
    };
    Ok(jwks::Settings {
        keys: KeySource::File(jwks_file),
        issuer: Some(DEV_TOKEN_ISSUER.into()),
        audiences: common.audiences,
        leeway: common.leeway,
        refresh: KeyRefresh::default(),
        confirm_pod: None,
    })
}
