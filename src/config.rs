//! Prosody option values to a typed, validated [`Config`].
//!
//! The shim reads each option with `module:get_option` (raw, untyped) and hands the values
//! over as [`RawValue`]s. This module checks them against what stock mod_mam accepts and
//! returns the configuration plus one [`ConfigError`] per bad option, each naming the option,
//! the value given and what is accepted. A bad option falls back to its default, so a typo in
//! the config is reported loudly but never stops the server.
//!
//! It does not read files, talk to Prosody or start anything.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::store::sqlite::Synchronous;
use crate::store::{Location, OpenOptions, ServerOptions};

/// An option value as Lua gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    Bool(bool),
    Integer(i64),
    Number(f64),
    String(String),
    /// A Lua array (or a Prosody set given as an array).
    List(Vec<RawValue>),
    /// A Lua table with string keys (the `sql` block).
    Map(BTreeMap<String, RawValue>),
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
            RawValue::Map(entries) => {
                f.write_str("{ ")?;
                for (key, value) in entries {
                    // Config errors are logged: never a password.
                    if key == "password" {
                        write!(f, "{key} = \"********\"; ")?;
                    } else {
                        write!(f, "{key} = {value}; ")?;
                    }
                }
                f.write_str("}")
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

/// Prosody 13's `sqlite_tune` (an option of mod_storage_sql), as it applies to an SQLite
/// archive: how hard each commit makes sure it is on disk. The journal stays WAL whatever the
/// value, so that queries read beside the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteTune {
    /// `"default"`: SQLite's own default, `synchronous = FULL`.
    Default,
    /// `"normal"`: `synchronous = NORMAL`.
    Normal,
    /// `"fast"`: `synchronous = OFF`.
    Fast,
    /// `"safe"`: `synchronous = EXTRA`.
    Safe,
}

impl SqliteTune {
    const ALL: [SqliteTune; 4] = [
        SqliteTune::Default,
        SqliteTune::Normal,
        SqliteTune::Fast,
        SqliteTune::Safe,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SqliteTune::Default => "default",
            SqliteTune::Normal => "normal",
            SqliteTune::Fast => "fast",
            SqliteTune::Safe => "safe",
        }
    }

    /// The `synchronous` setting mod_storage_sql gives its connection for this value.
    pub fn synchronous(self) -> Synchronous {
        match self {
            SqliteTune::Default => Synchronous::Full,
            SqliteTune::Normal => Synchronous::Normal,
            SqliteTune::Fast => Synchronous::Off,
            SqliteTune::Safe => Synchronous::Extra,
        }
    }
}

/// How long messages are kept (`archive_expires_after`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    /// Kept forever (`"never"`, `false`, a negative number).
    Never,
    /// Removed once older than this many seconds.
    After(f64),
}

/// Removing messages once the user's clients have them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmartRetention {
    /// `smart_retention_strategy`: `"one"` (default) or `"all"` of the user's clients.
    pub strategy: crate::store::Strategy,
    /// `smart_retention_min`: messages younger than this are kept anyway (default one day).
    pub min_seconds: f64,
}

/// Seconds in Prosody 13's period units (util/human/io.lua `parse_duration`).
const MINUTE: f64 = 60.0;
const HOUR: f64 = 3600.0;
const DAY: f64 = 86400.0;
const WEEK: f64 = 7.0 * DAY;
const MONTH: f64 = 31.0 * DAY;
const YEAR: f64 = 365.2425 * DAY;

/// Reads a period the way Prosody 13's `module:get_option_period` does: a number is seconds (a
/// negative one means never), `"never"` and `false` mean never, and a string is a count and a
/// unit ("1d", "2 weeks", "3 hours", "2 months", "1y"). Units that are ambiguous or missing
/// ("2m", "10") are read as upstream's lax parser does (m = months, none = seconds) with a
/// warning naming the full syntax. Returns the period and that warning, or an error text.
pub fn parse_period(v: &RawValue) -> Result<(Expiry, Option<String>), &'static str> {
    match v {
        RawValue::Bool(false) => return Ok((Expiry::Never, None)),
        RawValue::Integer(n) => {
            let expiry = if *n >= 0 { Expiry::After(*n as f64) } else { Expiry::Never };
            return Ok((expiry, None));
        }
        RawValue::Number(n) if n.is_finite() => {
            let expiry = if *n >= 0.0 { Expiry::After(*n) } else { Expiry::Never };
            return Ok((expiry, None));
        }
        RawValue::String(s) if s == "never" => return Ok((Expiry::Never, None)),
        RawValue::String(_) => {}
        _ => return Err("a number of seconds, a period such as \"1d\", \"2 weeks\", \"3 hours\", \"1y\", or \"never\""),
    }
    let RawValue::String(text) = v else {
        unreachable!()
    };
    let lower = text.to_lowercase();
    // Lua: (%d+)%s*([smhdwy]?[io]?n?), found anywhere in the string.
    let Some(start) = lower.find(|c: char| c.is_ascii_digit()) else {
        return Err("a number of seconds, a period such as \"1d\", \"2 weeks\", \"3 hours\", \"1y\", or \"never\"");
    };
    let rest = &lower[start..];
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let count: f64 = rest[..digits_end]
        .parse()
        .map_err(|_| "a whole number of units")?;
    let mut unit = rest[digits_end..]
        .trim_start_matches(char::is_whitespace)
        .chars();
    let mut taken = String::new();
    let mut next_if = |set: &str, taken: &mut String| {
        let mut probe = unit.clone();
        if let Some(c) = probe.next() {
            if set.contains(c) {
                taken.push(c);
                unit = probe;
            }
        }
    };
    next_if("smhdwy", &mut taken);
    next_if("io", &mut taken);
    next_if("n", &mut taken);
    let strict = match taken.as_str() {
        "s" => Some(1.0),
        "min" => Some(MINUTE),
        "h" | "ho" => Some(HOUR),
        "d" => Some(DAY),
        "w" => Some(WEEK),
        "mon" => Some(MONTH),
        "y" => Some(YEAR),
        _ => None,
    };
    if let Some(unit) = strict {
        return Ok((Expiry::After(count * unit), None));
    }
    // Upstream's lax reading, with its warning.
    let lax = match taken.chars().next() {
        None => 1.0,
        Some('m') if taken.starts_with("mi") => MINUTE,
        Some('m') => MONTH,
        Some('s') => 1.0,
        Some('h') => HOUR,
        Some('d') => DAY,
        Some('w') => WEEK,
        Some('y') => YEAR,
        Some(_) => {
            return Err("a period such as \"1d\", \"2 weeks\", \"3 hours\", \"1y\", or \"never\"")
        }
    };
    let seconds = count * lax;
    Ok((
        Expiry::After(seconds),
        Some(format!(
            "ambiguous period {text:?}, read as {seconds} seconds; use the full syntax, e.g. \"2 months\", \"5 minutes\", \"10 seconds\""
        )),
    ))
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
    /// `archive_compression`: store stanzas zstd-compressed with a dictionary trained from the
    /// archive (default true; every store). One database, one setting: the first host to
    /// open it decides.
    pub archive_compression: bool,
    /// `sqlite_tune` (Prosody 13's, default `"default"`): an SQLite archive's durability. One
    /// database, one setting, as for compression.
    pub sqlite_tune: SqliteTune,
    /// `archive_expires_after` (default one week).
    pub archive_expires_after: Expiry,
    /// Smart retention (prosody-modules' mod_mam_smart_retention): on when
    /// `smart_retention_strategy` or `smart_retention_min` is set.
    pub smart_retention: Option<SmartRetention>,
    /// `archive_cleanup_interval` in seconds, or Prosody 13's
    /// `mam_remove_expired_messages_period` (default 4 hours).
    pub cleanup_interval: f64,
    /// Where the archive is: a PostgreSQL or MySQL server when `mam_rs_sql`, or else Prosody's
    /// own `sql` block, names one; otherwise the SQLite file `mam_rs_database` (default
    /// `mam_rs.sqlite` in Prosody's data directory; paths are resolved by the shim, which knows
    /// the data directory). See [`read_location`].
    pub database: Location,
    /// `mam_rs_query_workers`: threads that run archive queries (default 2).
    pub query_workers: usize,
    /// `mam_rs_max_ids_per_query`: most values in a query's `ids` field (default 1000).
    pub max_ids_per_query: usize,
    /// `mam_rs_max_prefs_jids`: most JIDs in a `<prefs>` set (default 1000).
    pub max_prefs_jids: usize,
    /// `mam_rs_max_queries_per_second`: archive queries per user per second (default: no limit).
    pub max_queries_per_second: Option<f64>,
    /// `mam_rs_max_queued_rows`: rows waiting for the database before new messages are delivered
    /// without being archived (default 100000).
    pub max_queued_rows: usize,
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
            archive_compression: true,
            sqlite_tune: SqliteTune::Default,
            archive_expires_after: Expiry::After(WEEK),
            smart_retention: None,
            cleanup_interval: 4.0 * HOUR,
            database: Location::Sqlite(PathBuf::from("mam_rs.sqlite")),
            query_workers: 2,
            max_ids_per_query: 1000,
            max_prefs_jids: 1000,
            max_queries_per_second: None,
            max_queued_rows: 100_000,
            test_query_delay: Duration::ZERO,
        }
    }
}

impl Config {
    /// How to open the archive, with `read_connections` connections for queries.
    pub fn open_options(&self, read_connections: u32) -> OpenOptions {
        OpenOptions {
            read_connections,
            compression: self.archive_compression,
            synchronous: self.sqlite_tune.synchronous(),
        }
    }
}

/// One bad option: which, what was given, what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub option: &'static str,
    pub value: String,
    /// What is accepted (for an error), or what was understood (for a warning).
    pub expected: Cow<'static, str>,
    pub severity: Severity,
}

/// How bad a [`ConfigError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The value was not usable; the default is used instead (expiry: disabled).
    Error,
    /// The value was read, but not as written; said so the admin can make it exact.
    Warning,
}

impl ConfigError {
    fn invalid(option: &'static str, value: &RawValue, expected: &'static str) -> ConfigError {
        ConfigError {
            option,
            value: value.to_string(),
            expected: Cow::Borrowed(expected),
            severity: Severity::Error,
        }
    }

    /// Prosody's log level for this line.
    pub fn level(&self) -> &'static str {
        match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warn",
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.severity {
            Severity::Warning => write!(
                f,
                "option '{}' = {}: {}",
                self.option, self.value, self.expected
            ),
            Severity::Error => {
                let consequence = match self.option {
                    "archive_expires_after" => "message expiry is disabled until this is fixed",
                    "sql" | "mam_rs_sql" => "the archive is not opened until this is fixed",
                    _ => "using the default",
                };
                write!(
                    f,
                    "invalid value {} for option '{}': expected {}; {consequence}",
                    self.value, self.option, self.expected
                )
            }
        }
    }
}

/// Builds a [`Config`] from option values; options absent from `raw` keep their defaults.
/// Returns the configuration and every error found.
pub fn from_options(raw: &BTreeMap<String, RawValue>) -> (Config, Vec<ConfigError>) {
    let mut warnings = Vec::new();
    let (config, mut errors) = read_options(raw, &mut warnings);
    errors.extend(warnings);
    (config, errors)
}

fn read_options(
    raw: &BTreeMap<String, RawValue>,
    warnings: &mut Vec<ConfigError>,
) -> (Config, Vec<ConfigError>) {
    let mut config = Config::default();
    let mut errors = Vec::new();
    let mut check =
        |option: &'static str, expected: &'static str, apply: &mut dyn FnMut(&RawValue) -> bool| {
            if let Some(value) = raw.get(option) {
                if !apply(value) {
                    errors.push(ConfigError::invalid(option, value, expected));
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
    check("archive_compression", "true or false", &mut |v| {
        as_bool(v).map(|b| config.archive_compression = b).is_some()
    });
    check(
        "sqlite_tune",
        "\"default\", \"normal\", \"fast\" or \"safe\"",
        &mut |v| {
            let RawValue::String(s) = v else { return false };
            let tune = SqliteTune::ALL.into_iter().find(|t| t.as_str() == s);
            tune.map(|t| config.sqlite_tune = t).is_some()
        },
    );
    // An unreadable expiry disables expiry rather than falling back to the default: deleting
    // after a week what the admin meant to keep for a year would lose data.
    match read_period(raw, "archive_expires_after", warnings) {
        Some(expiry) => config.archive_expires_after = expiry,
        None if raw.contains_key("archive_expires_after") => {
            config.archive_expires_after = Expiry::Never
        }
        None => {}
    }
    if raw.contains_key("smart_retention_strategy") || raw.contains_key("smart_retention_min") {
        let mut smart = SmartRetention {
            strategy: crate::store::Strategy::One,
            min_seconds: DAY,
        };
        match raw.get("smart_retention_strategy") {
            None => {}
            Some(RawValue::String(s)) if s == "one" => smart.strategy = crate::store::Strategy::One,
            Some(RawValue::String(s)) if s == "all" => smart.strategy = crate::store::Strategy::All,
            Some(other) => warnings.push(ConfigError::invalid(
                "smart_retention_strategy",
                other,
                "\"one\" or \"all\"",
            )),
        }
        match read_period(raw, "smart_retention_min", warnings) {
            Some(Expiry::After(seconds)) => smart.min_seconds = seconds,
            Some(Expiry::Never) => warnings.push(ConfigError::invalid(
                "smart_retention_min",
                &raw["smart_retention_min"],
                "a period",
            )),
            None => {}
        }
        config.smart_retention = Some(smart);
    }
    for option in [
        "mam_remove_expired_messages_period",
        "archive_cleanup_interval",
    ] {
        match read_period(raw, option, warnings) {
            Some(Expiry::After(seconds)) if seconds >= 1.0 => config.cleanup_interval = seconds,
            Some(_) => warnings.push(ConfigError::invalid(
                option,
                &raw[option],
                "a period of at least one second",
            )),
            None => {}
        }
    }
    check("mam_rs_database", "a file path", &mut |v| match v {
        RawValue::String(s) if !s.is_empty() => {
            config.database = Location::Sqlite(PathBuf::from(s));
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
        "mam_rs_max_ids_per_query",
        "a whole number from 1 up",
        &mut |v| match as_whole(v) {
            Some(n) if n >= 1 => {
                config.max_ids_per_query = n as usize;
                true
            }
            _ => false,
        },
    );
    check(
        "mam_rs_max_prefs_jids",
        "a whole number from 0 up",
        &mut |v| match as_whole(v) {
            Some(n) if n >= 0 => {
                config.max_prefs_jids = n as usize;
                true
            }
            _ => false,
        },
    );
    check(
        "mam_rs_max_queries_per_second",
        "a number above 0",
        &mut |v| match v {
            RawValue::Integer(n) if *n > 0 => {
                config.max_queries_per_second = Some(*n as f64);
                true
            }
            RawValue::Number(n) if *n > 0.0 && n.is_finite() => {
                config.max_queries_per_second = Some(*n);
                true
            }
            _ => false,
        },
    );
    check(
        "mam_rs_max_queued_rows",
        "a whole number from 1 up",
        &mut |v| match as_whole(v) {
            Some(n) if n >= 1 => {
                config.max_queued_rows = n as usize;
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
    config.database = read_location(raw, config.database, &mut errors);
    (config, errors)
}

/// How long to wait for a database server to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const SQL_SHAPE: &str = "a table like Prosody's sql option: { driver = \"PostgreSQL\" (or \"MySQL\", \"SQLite3\"); database = \"prosody\"; host = \"localhost\"; port = 5432; username = \"prosody\"; password = \"...\" }";

/// Where the archive goes: `mam_rs_sql` when set, else Prosody's own `sql` block when it names
/// a server, else `sqlite` (the `mam_rs_database` file). Prosody's `sql` with SQLite3 keeps the
/// module on its own file. A block that cannot be read is an error naming it, and leaves the
/// archive closed ([`Location::Unusable`]): falling back to a local file would split one
/// archive in two without anyone noticing.
fn read_location(
    raw: &BTreeMap<String, RawValue>,
    sqlite: Location,
    errors: &mut Vec<ConfigError>,
) -> Location {
    let (option, value) = match (raw.get("mam_rs_sql"), raw.get("sql")) {
        (Some(value), _) => ("mam_rs_sql", value),
        (None, Some(value)) => ("sql", value),
        (None, None) => return sqlite,
    };
    match sql_location(value) {
        Ok(SqlTarget::Server(location)) => location,
        Ok(SqlTarget::Sqlite(Some(path))) if option == "mam_rs_sql" => Location::Sqlite(path),
        Ok(SqlTarget::Sqlite(_)) => sqlite,
        Err(expected) => {
            let why = format!("option '{option}' is invalid: {expected}");
            errors.push(ConfigError {
                expected: Cow::Owned(expected),
                ..ConfigError::invalid(option, value, "")
            });
            Location::Unusable(why)
        }
    }
}

enum SqlTarget {
    Server(Location),
    /// SQLite3, with the file named in the block, if any.
    Sqlite(Option<PathBuf>),
}

/// Reads one `sql`-shaped block as Prosody's mod_storage_sql does: `driver` (the LuaDBI names),
/// `database`, `host`, `port`, `username`, `password`. Other keys are Prosody's business.
fn sql_location(value: &RawValue) -> Result<SqlTarget, String> {
    let RawValue::Map(block) = value else {
        return Err(SQL_SHAPE.to_string());
    };
    let text = |key: &str| -> Result<Option<String>, String> {
        match block.get(key) {
            None => Ok(None),
            Some(RawValue::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            // Never echo a password.
            Some(_) if key == "password" => Err("password must be a non-empty string".to_string()),
            Some(other) => Err(format!("{key} must be a non-empty string, not {other}")),
        }
    };
    let driver = text("driver")?.ok_or_else(|| format!("no driver given; expected {SQL_SHAPE}"))?;
    let database = text("database")?;
    let host = text("host")?;
    let username = text("username")?;
    let password = text("password")?;
    let port = match block.get("port") {
        None => None,
        Some(v) => match as_whole(v) {
            Some(n) if (1..=65535).contains(&n) => Some(n as u16),
            _ => return Err(format!("port must be a number from 1 to 65535, not {v}")),
        },
    };
    match driver.as_str() {
        "SQLite3" => Ok(SqlTarget::Sqlite(database.map(PathBuf::from))),
        "PostgreSQL" | "MySQL" => {
            let database = database
                .ok_or_else(|| format!("driver {driver:?} needs database = \"<name>\""))?;
            let server = ServerOptions {
                // The client libraries' defaults, as LuaDBI gets them: the local socket
                // (libpq's directory, Debian's MySQL socket) and the OS user.
                host: host.unwrap_or_else(|| match driver.as_str() {
                    "PostgreSQL" => "/var/run/postgresql".to_string(),
                    _ => "/run/mysqld/mysqld.sock".to_string(),
                }),
                port,
                database,
                user: username.unwrap_or_else(os_user),
                password,
                pool_size: 1,
                connect_timeout: CONNECT_TIMEOUT,
            };
            Ok(SqlTarget::Server(if driver == "PostgreSQL" {
                Location::Postgres(server)
            } else {
                Location::Mysql(server)
            }))
        }
        other => Err(format!(
            "driver must be \"PostgreSQL\", \"MySQL\" or \"SQLite3\" (as Prosody spells them), not {other:?}"
        )),
    }
}

/// The user this process runs as (libpq's and libmysqlclient's default user name).
fn os_user() -> String {
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: getpwuid_r writes into `pw` and `buf`, both valid for the sizes given, and sets
    // `found` to `&mut pw` or null; the name is copied out before they go.
    unsafe {
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        );
        if rc != 0 || found.is_null() || pw.pw_name.is_null() {
            return "prosody".to_string();
        }
        std::ffi::CStr::from_ptr(pw.pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

/// A period option, with its warning or error added to `problems`; `None` when absent or unusable.
fn read_period(
    raw: &BTreeMap<String, RawValue>,
    option: &'static str,
    problems: &mut Vec<ConfigError>,
) -> Option<Expiry> {
    let value = raw.get(option)?;
    match parse_period(value) {
        Ok((expiry, warning)) => {
            if let Some(understood) = warning {
                problems.push(ConfigError {
                    severity: Severity::Warning,
                    expected: Cow::Owned(understood),
                    ..ConfigError::invalid(option, value, "")
                });
            }
            Some(expiry)
        }
        Err(expected) => {
            problems.push(ConfigError::invalid(option, value, expected));
            None
        }
    }
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

    fn block(pairs: &[(&str, RawValue)]) -> RawValue {
        RawValue::Map(opts(pairs))
    }

    fn text(s: &str) -> RawValue {
        RawValue::String(s.to_string())
    }

    #[test]
    fn prosodys_postgresql_sql_block_puts_the_archive_on_that_server() {
        let sql = block(&[
            ("driver", text("PostgreSQL")),
            ("database", text("prosody")),
            ("host", text("db.example.net")),
            ("port", RawValue::Integer(5433)),
            ("username", text("xmpp")),
            ("password", text("secret")),
        ]);
        let (config, errors) = from_options(&opts(&[("sql", sql)]));
        assert!(errors.is_empty(), "{errors:?}");
        let Location::Postgres(pg) = &config.database else {
            panic!("{:?}", config.database)
        };
        assert_eq!(
            (
                pg.host.as_str(),
                pg.port,
                pg.database.as_str(),
                pg.user.as_str()
            ),
            ("db.example.net", Some(5433), "prosody", "xmpp")
        );
        assert_eq!(pg.password.as_deref(), Some("secret"));
        assert_eq!(
            config.database.describe(),
            "PostgreSQL xmpp@db.example.net:5433/prosody"
        );
    }

    #[test]
    fn postgresql_defaults_are_libpqs_the_local_socket_and_a_numeric_string_port() {
        let sql = block(&[
            ("driver", text("PostgreSQL")),
            ("database", text("prosody")),
            ("port", text("5432")),
        ]);
        let (config, errors) = from_options(&opts(&[("sql", sql)]));
        assert!(errors.is_empty(), "{errors:?}");
        let Location::Postgres(pg) = &config.database else {
            panic!("{:?}", config.database)
        };
        assert_eq!(
            (pg.host.as_str(), pg.port),
            ("/var/run/postgresql", Some(5432))
        );
        assert!(!pg.user.is_empty());
        assert_eq!(pg.connect_timeout, CONNECT_TIMEOUT);
    }

    #[test]
    fn prosodys_mysql_sql_block_puts_the_archive_on_that_server() {
        let sql = block(&[
            ("driver", text("MySQL")),
            ("database", text("prosody")),
            ("host", text("127.0.0.1")),
            ("port", RawValue::Integer(3307)),
            ("username", text("xmpp")),
            ("password", text("secret")),
        ]);
        let (config, errors) = from_options(&opts(&[("sql", sql)]));
        assert!(errors.is_empty(), "{errors:?}");
        let Location::Mysql(my) = &config.database else {
            panic!("{:?}", config.database)
        };
        assert_eq!(
            (
                my.host.as_str(),
                my.port,
                my.database.as_str(),
                my.user.as_str()
            ),
            ("127.0.0.1", Some(3307), "prosody", "xmpp")
        );
        assert_eq!(my.password.as_deref(), Some("secret"));
        assert!(!config.database.describe().contains("secret"));

        let local = block(&[("driver", text("MySQL")), ("database", text("prosody"))]);
        let (config, _) = from_options(&opts(&[("sql", local)]));
        let Location::Mysql(my) = &config.database else {
            panic!("{:?}", config.database)
        };
        assert_eq!(my.host, "/run/mysqld/mysqld.sock");
    }

    #[test]
    fn sqlite3_in_prosodys_block_keeps_the_module_on_its_own_file() {
        let sql = block(&[
            ("driver", text("SQLite3")),
            ("database", text("prosody.sqlite")),
        ]);
        let (config, errors) = from_options(&opts(&[
            ("sql", sql),
            ("mam_rs_database", text("/var/lib/prosody/mam_rs.sqlite")),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            config.database,
            Location::Sqlite(PathBuf::from("/var/lib/prosody/mam_rs.sqlite"))
        );
    }

    #[test]
    fn mam_rs_sql_overrides_prosodys_block_either_way() {
        let server = block(&[
            ("driver", text("PostgreSQL")),
            ("database", text("prosody")),
        ]);
        let file = block(&[
            ("driver", text("SQLite3")),
            ("database", text("/srv/archive.sqlite")),
        ]);
        let (config, errors) =
            from_options(&opts(&[("sql", server.clone()), ("mam_rs_sql", file)]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            config.database,
            Location::Sqlite(PathBuf::from("/srv/archive.sqlite"))
        );

        let other = block(&[
            ("driver", text("PostgreSQL")),
            ("database", text("archive")),
        ]);
        let (config, _) = from_options(&opts(&[("sql", server), ("mam_rs_sql", other)]));
        let Location::Postgres(pg) = &config.database else {
            panic!("{:?}", config.database)
        };
        assert_eq!(pg.database, "archive");
    }

    #[test]
    fn a_bad_sql_block_is_named_and_leaves_the_archive_closed_never_showing_the_password() {
        for (sql, says) in [
            (text("postgres://x"), "a table like Prosody's sql option"),
            (block(&[("database", text("p"))]), "no driver given"),
            (
                block(&[("driver", text("postgres")), ("database", text("p"))]),
                "driver must be \"PostgreSQL\", \"MySQL\" or \"SQLite3\"",
            ),
            (block(&[("driver", text("PostgreSQL"))]), "needs database ="),
            (
                block(&[
                    ("driver", text("PostgreSQL")),
                    ("database", text("p")),
                    ("port", RawValue::Integer(70000)),
                ]),
                "port must be a number from 1 to 65535, not 70000",
            ),
            (
                block(&[
                    ("driver", text("PostgreSQL")),
                    ("database", text("p")),
                    ("password", RawValue::Integer(1234)),
                ]),
                "password must be a non-empty string",
            ),
        ] {
            let (config, errors) = from_options(&opts(&[(
                "sql",
                match sql {
                    RawValue::Map(mut m) => {
                        m.insert("username".into(), text("u"));
                        if !m.contains_key("password") {
                            m.insert("password".into(), text("hunter2"));
                        }
                        RawValue::Map(m)
                    }
                    other => other,
                },
            )]));
            assert_eq!(errors.len(), 1, "{errors:?}");
            let line = errors[0].to_string();
            assert!(line.contains("option 'sql'"), "{line}");
            assert!(line.contains(says), "{line}");
            assert!(
                line.contains("the archive is not opened until this is fixed"),
                "{line}"
            );
            assert!(
                !line.contains("hunter2") && !line.contains("1234"),
                "{line}"
            );
            assert!(matches!(config.database, Location::Unusable(_)), "{line}");
        }
    }

    #[test]
    fn compression_is_on_by_default_and_quiet_on_a_server_archive() {
        let (c, errors) = from_options(&BTreeMap::new());
        assert!(errors.is_empty());
        assert!(c.archive_compression);
        let sql = |driver| block(&[("driver", text(driver)), ("database", text("prosody"))]);
        for driver in ["PostgreSQL", "MySQL"] {
            let (c, errors) = from_options(&opts(&[("sql", sql(driver))]));
            assert!(errors.is_empty(), "{errors:?}");
            assert!(c.archive_compression);
            let (c, errors) = from_options(&opts(&[
                ("sql", sql(driver)),
                ("archive_compression", RawValue::Bool(true)),
            ]));
            assert!(errors.is_empty(), "{errors:?}");
            assert!(c.archive_compression);
        }
        let (c, errors) = from_options(&opts(&[("archive_compression", RawValue::Bool(false))]));
        assert!(errors.is_empty());
        assert!(!c.archive_compression);
    }

    #[test]
    fn sqlite_tune_sets_what_mod_storage_sql_sets() {
        let (c, errors) = from_options(&BTreeMap::new());
        assert!(errors.is_empty());
        assert_eq!(c.sqlite_tune.synchronous(), Synchronous::Full);
        for (value, synchronous) in [
            ("default", Synchronous::Full),
            ("normal", Synchronous::Normal),
            ("fast", Synchronous::Off),
            ("safe", Synchronous::Extra),
        ] {
            let (c, errors) = from_options(&opts(&[("sqlite_tune", text(value))]));
            assert!(errors.is_empty(), "{value}: {errors:?}");
            assert_eq!(c.sqlite_tune.as_str(), value);
            assert_eq!(c.open_options(1).synchronous, synchronous, "{value}");
        }
        // Prosody 13 logs a value outside its set and then tunes nothing: the default.
        for bad in [
            text("turbo"),
            text("FAST"),
            RawValue::Bool(true),
            RawValue::Integer(1),
        ] {
            let (c, errors) = from_options(&opts(&[("sqlite_tune", bad.clone())]));
            assert_eq!(c.sqlite_tune, SqliteTune::Default, "{bad}");
            assert_eq!(errors.len(), 1, "{bad}");
            assert_eq!(
                errors[0].to_string(),
                format!(
                    "invalid value {bad} for option 'sqlite_tune': expected \"default\", \"normal\", \"fast\" or \"safe\"; using the default"
                )
            );
        }
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

    fn period(v: RawValue) -> Result<(Expiry, Option<String>), &'static str> {
        parse_period(&v)
    }

    fn seconds(text: &str) -> f64 {
        match period(RawValue::String(text.into())) {
            Ok((Expiry::After(s), None)) => s,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn periods_read_as_prosody_13_reads_them() {
        assert_eq!(seconds("1d"), DAY);
        assert_eq!(seconds("2 days"), 2.0 * DAY);
        assert_eq!(seconds("2w"), 2.0 * WEEK);
        assert_eq!(seconds("3 hours"), 3.0 * HOUR);
        assert_eq!(seconds("1h"), HOUR, "0.12 misread this as one second");
        assert_eq!(seconds("5 minutes"), 5.0 * MINUTE);
        assert_eq!(seconds("2 months"), 2.0 * MONTH);
        assert_eq!(seconds("1y"), YEAR);
        assert_eq!(seconds("1 year"), YEAR);
        assert_eq!(seconds("30s"), 30.0);
        assert_eq!(seconds("1W"), WEEK, "case does not matter");
    }

    #[test]
    fn numbers_are_seconds_and_never_means_never() {
        assert_eq!(
            period(RawValue::Integer(86400)),
            Ok((Expiry::After(DAY), None))
        );
        assert_eq!(
            period(RawValue::Number(1.5)),
            Ok((Expiry::After(1.5), None))
        );
        assert_eq!(period(RawValue::Integer(-1)), Ok((Expiry::Never, None)));
        assert_eq!(
            period(RawValue::String("never".into())),
            Ok((Expiry::Never, None))
        );
        assert_eq!(period(RawValue::Bool(false)), Ok((Expiry::Never, None)));
    }

    #[test]
    fn ambiguous_periods_are_read_as_upstream_with_a_warning() {
        for (text, want) in [
            ("2m", 2.0 * MONTH),
            ("10", 10.0),
            ("1mo", MONTH),
            ("1mi", MINUTE),
            ("1.5d", 1.0),
        ] {
            match period(RawValue::String(text.into())) {
                Ok((Expiry::After(s), Some(warning))) => {
                    assert_eq!(s, want, "{text}");
                    assert!(warning.contains("full syntax"), "{warning}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn unreadable_periods_are_errors_that_disable_expiry() {
        for bad in [
            RawValue::String("forever".into()),
            RawValue::String("Never".into()),
            RawValue::Bool(true),
        ] {
            assert!(period(bad.clone()).is_err(), "{bad}");
            let (c, errors) = from_options(&opts(&[("archive_expires_after", bad)]));
            assert_eq!(c.archive_expires_after, Expiry::Never);
            assert_eq!(errors.len(), 1);
            let line = errors[0].to_string();
            assert!(
                line.contains("'archive_expires_after'") && line.contains("expiry is disabled"),
                "{line}"
            );
            assert_eq!(errors[0].level(), "error");
        }
    }

    #[test]
    fn smart_retention_is_off_unless_asked_for() {
        assert_eq!(Config::default().smart_retention, None);
        let (c, errors) = from_options(&opts(&[(
            "smart_retention_strategy",
            RawValue::String("all".into()),
        )]));
        assert!(errors.is_empty());
        assert_eq!(
            c.smart_retention,
            Some(SmartRetention {
                strategy: crate::store::Strategy::All,
                min_seconds: DAY
            })
        );
        let (c, _) = from_options(&opts(&[(
            "smart_retention_min",
            RawValue::String("2 hours".into()),
        )]));
        assert_eq!(
            c.smart_retention,
            Some(SmartRetention {
                strategy: crate::store::Strategy::One,
                min_seconds: 2.0 * HOUR
            })
        );
        let (_, errors) = from_options(&opts(&[(
            "smart_retention_strategy",
            RawValue::String("some".into()),
        )]));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("'smart_retention_strategy'"));
    }

    #[test]
    fn cleanup_interval_takes_seconds_or_prosody_13s_name() {
        let (c, errors) = from_options(&BTreeMap::new());
        assert!(errors.is_empty());
        assert_eq!(c.archive_expires_after, Expiry::After(WEEK));
        assert_eq!(c.cleanup_interval, 4.0 * HOUR);
        let (c, _) = from_options(&opts(&[(
            "archive_cleanup_interval",
            RawValue::Integer(600),
        )]));
        assert_eq!(c.cleanup_interval, 600.0);
        let (c, _) = from_options(&opts(&[(
            "mam_remove_expired_messages_period",
            RawValue::String("1 hour".into()),
        )]));
        assert_eq!(c.cleanup_interval, HOUR);
        let (_, errors) =
            from_options(&opts(&[("archive_cleanup_interval", RawValue::Integer(0))]));
        assert_eq!(errors.len(), 1);
    }
}
