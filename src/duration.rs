//! Reading durations from configuration: a number of seconds (`30`,
//! `0.5`) or a humantime string (`"30s"`, `"500ms"`, `"1h 30m"`). A leaf
//! module, so every settings struct (config, upstream, auth, leases) can
//! use it without depending on the others.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `#[serde(deserialize_with = "crate::duration::de_duration")]`: a
/// non-negative finite number of seconds or a humantime string. Errors
/// quote the value and show the accepted forms.
pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => Duration::try_from_secs_f64(s).map_err(|e| {
            serde::de::Error::custom(format!("{s} is not a duration in seconds: {e}"))
        }),
        Raw::Text(text) => humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration like \"30s\", \"5m\" or \"1h\": {e}"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Holder {
        #[serde(deserialize_with = "de_duration")]
        d: Duration,
    }

    fn read(json: &str) -> Result<Duration, String> {
        serde_json::from_str::<Holder>(json)
            .map(|h| h.d)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn seconds_and_humantime_strings_are_read_and_nonsense_is_named() {
        assert_eq!(read(r#"{"d":30}"#).unwrap(), Duration::from_secs(30));
        assert_eq!(read(r#"{"d":0.5}"#).unwrap(), Duration::from_millis(500));
        assert_eq!(
            read(r#"{"d":"1h 30m"}"#).unwrap(),
            Duration::from_secs(5400)
        );
        assert!(read(r#"{"d":-1}"#)
            .unwrap_err()
            .contains("-1 is not a duration"));
        assert!(read(r#"{"d":1e20}"#)
            .unwrap_err()
            .contains("is not a duration"));
        assert!(read(r#"{"d":"soon"}"#)
            .unwrap_err()
            .contains("\"soon\" is not a duration like"));
    }
}
