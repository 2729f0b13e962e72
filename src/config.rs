//! Prosody option values to a typed, validated [`Config`].
//!
//! The shim reads each option with `module:get_option` (raw, untyped) and hands the values
//! over as [`RawValue`]s. This module checks them against what stock mod_mam accepts and
//! returns the configuration plus one [`ConfigError`] per bad option, each naming the option,
//! the value given and what is accepted. A bad option falls back to its default, so a typo in
//! the config is reported loudly but never stops the server.
//!
//! It does not read files, talk to Prosody or start anything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// An option value as Lua gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    Bool(bool),
    Integer(i64),
    Number(f64),
    String(String),
    /// A Lua array (or a Prosody set given as an array).
    List(Vec<RawValue>),
    /// A table that is not an array, or a value of another Lua type (function, userdata...).
    Other(String),
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Bool(b) => write!(f, "{b}"),
            RawValue::Integer(i) => write!(f, "{i}"),
            RawValue::Number(n) => write!(f, "{n}"),
            RawValue::String(s) => write!(f, "{s:?}"),
            RawValue::List(items) => {
                f.write_str("{ ")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str(" }")
            }
            RawValue::Other(kind) => f.write_str(kind),
        }
    }
}

/// The archiving default for a user who has not set preferences (`default_archive_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Archive every message (`true` / `"always"`).
    Always,
    /// Archive nothing (`false` / `"never"`).
    Never,
    /// Archive messages with contacts in the user's roster (`"roster"`).
    Roster,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Always => "always",
            DefaultPolicy::Never => "never",
            DefaultPolicy::Roster => "roster",
        }
    }
}

/// The chat states namespace, stripped from stored copies by default.
pub const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";

/// Everything the native side needs to know, with stock mod_mam's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `max_archive_query_results`: the largest page a client gets (default 50).
    pub max_archive_query_results: u32,
    /// The page size when the client asks for none (stock hard-codes 20).
    pub default_page_size: u32,
    /// `default_archive_policy` (default `true`, i.e. always).
    pub default_archive_policy: DefaultPolicy,
    /// `dont_archive_namespaces`: children in these namespaces are stripped from stored copies.
    pub dont_archive_namespaces: BTreeSet<String>,
    /// `archive_store`: the store name (default `archive`).
    pub archive_store: String,
    /// `mam_include_total`: whether result sets carry `<count>` (default true).
    pub mam_include_total: bool,
    /// `storage_archive_item_limit`: most messages kept per archive; the oldest 1% go when it
    /// is reached (default: no limit, as stock mod_mam on SQL storage).
    pub storage_archive_item_limit: Option<u32>,
    /// `mam_smart_enable`: archive nothing for a user until a MAM-capable client uses MAM.
    pub mam_smart_enable: bool,
    /// `mam_rs_database`: the SQLite file (default `mam_rs.sqlite` in Prosody's data directory;
    /// resolved by the shim, which knows the data directory).
    pub database: PathBuf,
    /// `mam_rs_query_workers`: threads that run archive queries (default 2).
    pub query_workers: usize,
    /// `mam_rs_test_query_delay`: testing only. Every query sleeps this long on its worker.
    pub test_query_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_archive_query_results: 50,
            default_page_size: 20,
            default_archive_policy: DefaultPolicy::Always,
            dont_archive_namespaces: BTreeSet::from([CHATSTATES.to_string()]),
            archive_store: "archive".to_string(),
            mam_include_total: true,
            storage_archive_item_limit: None,
            mam_smart_enable: false,
            database: PathBuf::from("mam_rs.sqlite"),
            query_workers: 2,
            test_query_delay: Duration::ZERO,
        }
    }
}

/// One bad option: which, what was given, what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub option: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value {} for option '{}': expected {}; using the default",
            self.value, self.option, self.expected
        )
    }
}

/// Builds a [`Config`] from option values; options absent from `raw` keep their defaults.
/// Returns the configuration and every error found.
pub fn from_options(raw: &BTreeMap<String, RawValue>) -> (Config, Vec<ConfigError>) {
    let mut config = Config::default();
    let mut errors = Vec::new();
    let mut check =
        |option: &'static str, expected: &'static str, apply: &mut dyn FnMut(&RawValue) -> bool| {
            if let Some(value) = raw.get(option) {
                if !apply(value) {
                    errors.push(ConfigError {
                        option,
                        value: value.to_string(),
                        expected,
                    });
                }
            }
        };

    check(
        "max_archive_query_results",
        "a whole number from 0 up",
        &mut |v| match as_whole(v) {
            Some(n) if (0..=u32::MAX as i64).contains(&n) => {
                config.max_archive_query_results = n as u32;
                true
            }
            _ => false,
        },
    );
    check(
        "default_archive_policy",
        "true, false, \"always\", \"never\" or \"roster\"",
        &mut |v| {
            let policy = match v {
                RawValue::Bool(true) => Some(DefaultPolicy::Always),
                RawValue::Bool(false) => Some(DefaultPolicy::Never),
                RawValue::String(s) => match s.as_str() {
                    "always" | "true" => Some(DefaultPolicy::Always),
                    "never" | "false" => Some(DefaultPolicy::Never),
                    "roster" => Some(DefaultPolicy::Roster),
                    _ => None,
                },
                _ => None,
            };
            policy.map(|p| config.default_archive_policy = p).is_some()
        },
    );
    check(
        "dont_archive_namespaces",
        "a list of namespace strings",
        &mut |v| match v {
            RawValue::List(items) => {
                let set: Option<BTreeSet<String>> = items
                    .iter()
                    .map(|i| match i {
                        RawValue::String(s) if !s.is_empty() => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                set.map(|s| config.dont_archive_namespaces = s).is_some()
            }
            RawValue::String(s) if !s.is_empty() => {
                config.dont_archive_namespaces = BTreeSet::from([s.clone()]);
                true
            }
            _ => false,
        },
    );
    check("archive_store", "a non-empty string", &mut |v| match v {
        RawValue::String(s) if !s.is_empty() => {
            config.archive_store = s.clone();
            true
        }
        _ => false,
    });
    check("mam_include_total", "true or false", &mut |v| {
        as_bool(v).map(|b| config.mam_include_total = b).is_some()
    });
    check(
        "storage_archive_item_limit",
        "a whole number from 0 up",
        &mut |v| match as_whole(v) {
            Some(n) if (0..=u32::MAX as i64).contains(&n) => {
                config.storage_archive_item_limit = Some(n as u32);
                true
            }
            _ => false,
        },
    );
    check("mam_smart_enable", "true or false", &mut |v| {
        as_bool(v).map(|b| config.mam_smart_enable = b).is_some()
    });
    check("mam_rs_database", "a file path", &mut |v| match v {
        RawValue::String(s) if !s.is_empty() => {
            config.database = PathBuf::from(s);
            true
        }
        _ => false,
    });
    check(
        "mam_rs_query_workers",
        "a whole number from 1 to 64",
        &mut |v| match as_whole(v) {
            Some(n) if (1..=64).contains(&n) => {
                config.query_workers = n as usize;
                true
            }
            _ => false,
        },
    );
    check(
        "mam_rs_test_query_delay",
        "a number of seconds from 0 to 600",
        &mut |v| match v {
            RawValue::Integer(n) if (0..=600).contains(n) => {
                config.test_query_delay = Duration::from_secs(*n as u64);
                true
            }
            RawValue::Number(n) if (0.0..=600.0).contains(n) => {
                config.test_query_delay = Duration::from_secs_f64(*n);
                true
            }
            _ => false,
        },
    );
    (config, errors)
}

/// A whole number, given as a Lua integer, an integral float, or a string of digits (Prosody's
/// `get_option_number` accepts numeric strings too).
fn as_whole(v: &RawValue) -> Option<i64> {
    match v {
        RawValue::Integer(i) => Some(*i),
        RawValue::Number(n) if n.fract() == 0.0 && n.is_finite() => Some(*n as i64),
        RawValue::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A boolean as Prosody's `get_option_boolean` reads it.
fn as_bool(v: &RawValue) -> Option<bool> {
    match v {
        RawValue::Bool(b) => Some(*b),
        RawValue::Integer(1) => Some(true),
        RawValue::Integer(0) => Some(false),
        RawValue::String(s) => match s.as_str() {
            "true" | "yes" | "on" | "1" => Some(true),
            "false" | "no" | "off" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, RawValue)]) -> BTreeMap<String, RawValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn defaults_match_stock() {
        let (c, errors) = from_options(&BTreeMap::new());
        assert!(errors.is_empty());
        assert_eq!(c.max_archive_query_results, 50);
        assert_eq!(c.default_page_size, 20);
        assert_eq!(c.default_archive_policy, DefaultPolicy::Always);
        assert!(c.dont_archive_namespaces.contains(CHATSTATES));
        assert_eq!(c.archive_store, "archive");
        assert!(c.mam_include_total);
    }

    #[test]
    fn policy_accepts_stock_values() {
        for (raw, want) in [
            (RawValue::Bool(true), DefaultPolicy::Always),
            (RawValue::Bool(false), DefaultPolicy::Never),
            (RawValue::String("roster".into()), DefaultPolicy::Roster),
            (RawValue::String("always".into()), DefaultPolicy::Always),
            (RawValue::String("never".into()), DefaultPolicy::Never),
            (RawValue::String("false".into()), DefaultPolicy::Never),
        ] {
            let (c, errors) = from_options(&opts(&[("default_archive_policy", raw)]));
            assert!(errors.is_empty());
            assert_eq!(c.default_archive_policy, want);
        }
    }

    #[test]
    fn bad_values_are_named_with_option_and_value_and_fall_back() {
        let (c, errors) = from_options(&opts(&[
            (
                "default_archive_policy",
                RawValue::String("contacts".into()),
            ),
            ("max_archive_query_results", RawValue::Number(2.5)),
            (
                "dont_archive_namespaces",
                RawValue::List(vec![RawValue::Integer(3)]),
            ),
        ]));
        assert_eq!(c, Config::default());
        assert_eq!(errors.len(), 3);
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(text
            .iter()
            .any(|t| t.contains("'default_archive_policy'") && t.contains("\"contacts\"")));
        assert!(text
            .iter()
            .any(|t| t.contains("'max_archive_query_results'") && t.contains("2.5")));
        assert!(text
            .iter()
            .any(|t| t.contains("'dont_archive_namespaces'") && t.contains("{ 3 }")));
    }

    #[test]
    fn numbers_may_come_as_strings_or_floats() {
        let (c, errors) = from_options(&opts(&[(
            "max_archive_query_results",
            RawValue::String("100".into()),
        )]));
        assert!(errors.is_empty());
        assert_eq!(c.max_archive_query_results, 100);
        let (c, _) = from_options(&opts(&[(
            "max_archive_query_results",
            RawValue::Number(10.0),
        )]));
        assert_eq!(c.max_archive_query_results, 10);
    }

    #[test]
    fn namespaces_replace_the_default_set() {
        let (c, errors) = from_options(&opts(&[(
            "dont_archive_namespaces",
            RawValue::List(vec![RawValue::String("urn:example:a".into())]),
        )]));
        assert!(errors.is_empty());
        assert_eq!(
            c.dont_archive_namespaces,
            BTreeSet::from(["urn:example:a".to_string()])
        );
        let (c, _) = from_options(&opts(&[(
            "dont_archive_namespaces",
            RawValue::List(vec![]),
        )]));
        assert!(c.dont_archive_namespaces.is_empty());
    }
}
