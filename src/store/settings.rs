//! A topic's settings as an operator sets them (`topic.create` / `topic.alter`): the overrides
//! kept in `<data_dir>/topics/<topic>/settings.toml`, and the settings in force (the overrides
//! over the broker's defaults). See `store/retention.md` for why a file per topic.

use super::StoreError;
use sluice_protocol::{Discard, TopicSettings};
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// The settings file of a topic, in its directory.
pub const SETTINGS_FILE: &str = "settings.toml";
const SETTINGS_TMP: &str = "settings.toml.tmp";

/// The settings in force for a topic with `overrides`, over the broker's `defaults`: limits of
/// `0` mean none (`None`), an empty backoff override means the broker's.
pub fn in_force(overrides: &TopicSettings, defaults: &TopicSettings) -> TopicSettings {
    let limit = |o: Option<u64>, d: Option<u64>| o.or(d).filter(|v| *v != 0);
    TopicSettings {
        max_age_ms: limit(overrides.max_age_ms, defaults.max_age_ms),
        max_bytes: limit(overrides.max_bytes, defaults.max_bytes),
        max_messages: limit(overrides.max_messages, defaults.max_messages),
        discard: Some(
            overrides
                .discard
                .or(defaults.discard)
                .unwrap_or(Discard::Age),
        ),
        dedup_window_ms: Some(
            overrides
                .dedup_window_ms
                .or(defaults.dedup_window_ms)
                .unwrap_or(0),
        ),
        backoff_ms: overrides
            .backoff_ms
            .clone()
            .filter(|b| !b.is_empty())
            .or_else(|| defaults.backoff_ms.clone()),
    }
}

/// `overrides` with the fields present in `change` set (`topic.alter`): a limit of `0` is kept
/// (no limit, whatever the default), an empty backoff removes the override.
pub fn apply(overrides: &TopicSettings, change: &TopicSettings) -> TopicSettings {
    let mut out = overrides.clone();
    if change.max_age_ms.is_some() {
        out.max_age_ms = change.max_age_ms;
    }
    if change.max_bytes.is_some() {
        out.max_bytes = change.max_bytes;
    }
    if change.max_messages.is_some() {
        out.max_messages = change.max_messages;
    }
    if change.discard.is_some() {
        out.discard = change.discard;
    }
    if change.dedup_window_ms.is_some() {
        out.dedup_window_ms = change.dedup_window_ms;
    }
    if let Some(b) = &change.backoff_ms {
        out.backoff_ms = (!b.is_empty()).then(|| b.clone());
    }
    out
}

/// Reads the overrides of the topic in `dir` (none: the file is missing). A leftover temporary
/// file (a write cut by a crash, never acknowledged) is removed.
pub fn load(dir: &Path) -> Result<TopicSettings, StoreError> {
    let _ = std::fs::remove_file(dir.join(SETTINGS_TMP));
    let text = match std::fs::read_to_string(dir.join(SETTINGS_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TopicSettings::default()),
        Err(e) => return Err(e.into()),
    };
    toml::from_str(&text).map_err(|e| StoreError::Corrupt {
        tree: "topic settings".into(),
        key: dir.join(SETTINGS_FILE).display().to_string(),
        reason: e.to_string(),
    })
}

/// Writes the overrides of the topic in `dir` durably: a temporary file written and fsynced,
/// renamed over the old one, and the directory fsynced (a power cut leaves the old settings or
/// the new, never a mix).
pub fn store(dir: &Path, overrides: &TopicSettings) -> Result<(), StoreError> {
    let text = toml::to_string(overrides).map_err(|e| StoreError::Corrupt {
        tree: "topic settings".into(),
        key: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let tmp = dir.join(SETTINGS_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(b"# Sluice topic settings (sluice topic create / alter); times in ms.\n")?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(SETTINGS_FILE))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_defaults_and_zero_means_none() {
        let defaults = TopicSettings {
            max_age_ms: Some(7_000),
            max_bytes: Some(1 << 20),
            discard: Some(Discard::Age),
            dedup_window_ms: Some(120_000),
            backoff_ms: Some(vec![1000]),
            ..Default::default()
        };
        let o = apply(
            &TopicSettings::default(),
            &TopicSettings {
                max_age_ms: Some(2000),
                max_bytes: Some(0),
                discard: Some(Discard::Acked),
                ..Default::default()
            },
        );
        let f = in_force(&o, &defaults);
        assert_eq!(f.max_age_ms, Some(2000));
        assert_eq!(f.max_bytes, None, "0 overrides the default: no limit");
        assert_eq!(f.max_messages, None);
        assert_eq!(f.discard, Some(Discard::Acked));
        assert_eq!(f.dedup_window_ms, Some(120_000));
        assert_eq!(f.backoff_ms, Some(vec![1000]));
        // Alter keeps what it does not name; an empty backoff drops the override.
        let o2 = apply(
            &apply(
                &o,
                &TopicSettings {
                    backoff_ms: Some(vec![5]),
                    ..Default::default()
                },
            ),
            &TopicSettings {
                dedup_window_ms: Some(0),
                backoff_ms: Some(vec![]),
                ..Default::default()
            },
        );
        assert_eq!(o2.max_age_ms, Some(2000));
        assert_eq!(o2.backoff_ms, None);
        assert_eq!(in_force(&o2, &defaults).dedup_window_ms, Some(0));
    }

    #[test]
    fn settings_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), TopicSettings::default());
        let o = TopicSettings {
            max_age_ms: Some(2000),
            discard: Some(Discard::Acked),
            backoff_ms: Some(vec![1000, 5000]),
            ..Default::default()
        };
        store(dir.path(), &o).unwrap();
        std::fs::write(dir.path().join(SETTINGS_TMP), "garbage").unwrap();
        assert_eq!(load(dir.path()).unwrap(), o);
        assert!(!dir.path().join(SETTINGS_TMP).exists());
    }
}
