//! One setting's value checked: the typed error every settings check returns (which
//! setting, and why its value cannot be used or why it is needed) and the parsers
//! those checks share. A leaf, so that the stages owning their settings (the token
//! sources in `auth::source`) check them without depending on `config`, which maps
//! this error into its own.

use std::time::Duration;

/// A setting that cannot be used as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A setting has a value that cannot be used.
    #[error("--{setting}: {reason}")]
    Invalid { setting: &'static str, reason: String },
    /// A setting required in this mode is missing.
    #[error("--{setting} is required {when}")]
    Missing { setting: &'static str, when: &'static str },
}

/// `value` as a duration (`24h`, `90s`, `2m`), or `default` when unset.
pub(crate) fn duration(
    setting: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, Error> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim())
            .map_err(|e| Error::Invalid { setting, reason: format!("{e} (use e.g. 24h, 90s, 2m)") }),
    }
}

/// `value` (or `default`) within `min..=max`, else an error naming the bounds as `bounds`.
pub(crate) fn within(
    setting: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
    bounds: &str,
) -> Result<Duration, Error> {
    if value < min || value > max {
        return Err(Error::Invalid { setting, reason: format!("must be {bounds}") });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_parse_or_name_the_setting_and_the_format() {
        assert_eq!(duration("x", None, Duration::from_secs(7)), Ok(Duration::from_secs(7)));
        assert_eq!(duration("x", Some(" 90s "), Duration::ZERO), Ok(Duration::from_secs(90)));
        let err = duration("token-leeway", Some("soon"), Duration::ZERO).unwrap_err();
        assert!(err.to_string().starts_with("--token-leeway: "), "{err}");
        assert!(err.to_string().ends_with("(use e.g. 24h, 90s, 2m)"), "{err}");
    }

    #[test]
    fn bounds_are_inclusive() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(within("t", min, min, max, "1s to 60s"), Ok(min));
        assert_eq!(within("t", max, min, max, "1s to 60s"), Ok(max));
        let err = within("t", Duration::from_secs(61), min, max, "at most 60s").unwrap_err();
        assert_eq!(err.to_string(), "--t: must be at most 60s");
        assert!(within("t", Duration::ZERO, min, max, "x").is_err());
    }
}
