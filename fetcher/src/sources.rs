//! `DATA_SOURCES` and the legacy fetch keys (`CHUNK_SIZE`, `MAX_RETRIES`, `RETRY_DELAY`,
//! `COLLECTION_INTERVAL`).
//!
//! The legacy shape — `name`, `url`, `auth_type`, `schedule` — parses unchanged; every other
//! field is optional with a default that matches the legacy API
//! (`GET <url>?since=<RFC3339>&page=<n>&limit=<CHUNK_SIZE>[&after_id=<id>]` answering
//! `{"data": [...], "pagination": {"total_pages": N}}`).

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use tardis_common::Secret;
use tardis_common::config::{Reader, parse_duration, parse_http_url};

/// The environment variable holding a source's credential unless the source names another.
pub const DEFAULT_CREDENTIAL_ENV: &str = "DATA_API_KEY";

const SOURCES_EXAMPLE: &str = r#"DATA_SOURCES='[{"name":"market_data","url":"https://api.example.com/v2/market/quotes","auth_type":"bearer","schedule":"*/15 * * * *"}]'"#;

/// How a source authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    /// `Authorization: Bearer <credential>`.
    Bearer,
    /// The credential in a header (`api_key_header`, default `X-API-Key`).
    ApiKey,
    /// The credential in a query parameter (`api_key_param`, default `api_key`).
    ApiKeyQuery,
    /// `Authorization: Basic`, the credential being `user:password`.
    Basic,
    /// No credential.
    None,
}

impl AuthType {
    pub const ALL: [AuthType; 5] = [
        AuthType::Bearer,
        AuthType::ApiKey,
        AuthType::ApiKeyQuery,
        AuthType::Basic,
        AuthType::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::Bearer => "bearer",
            AuthType::ApiKey => "api_key",
            AuthType::ApiKeyQuery => "api_key_query",
            AuthType::Basic => "basic",
            AuthType::None => "none",
        }
    }
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a source pages through its results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pagination {
    /// `?page=<n>&limit=<size>`, stopping at `total_pages`, an empty page or a short page.
    Page {
        #[serde(default = "default_page_param")]
        page_param: String,
        #[serde(default = "default_limit_param")]
        limit_param: String,
        /// JSON pointer to the total number of pages; `null` when the API has none.
        #[serde(default = "default_total_pages_pointer")]
        total_pages_pointer: Option<String>,
        #[serde(default = "default_first_page")]
        first_page: u64,
    },
    /// `?offset=<n>&limit=<size>`, stopping at an empty or short page.
    Offset {
        #[serde(default = "default_offset_param")]
        offset_param: String,
        #[serde(default = "default_limit_param")]
        limit_param: String,
    },
    /// An opaque cursor token read from the body, sent back as a query parameter.
    Cursor {
        #[serde(default = "default_cursor_pointer")]
        cursor_pointer: String,
        #[serde(default = "default_cursor_param")]
        cursor_param: String,
        #[serde(default = "default_limit_param")]
        limit_param: String,
    },
    /// RFC 8288 `Link: <...>; rel="next"` headers.
    Link {
        #[serde(default = "default_limit_param")]
        limit_param: String,
    },
}

impl Default for Pagination {
    fn default() -> Self {
        Pagination::Page {
            page_param: default_page_param(),
            limit_param: default_limit_param(),
            total_pages_pointer: default_total_pages_pointer(),
            first_page: default_first_page(),
        }
    }
}

fn default_page_param() -> String {
    "page".into()
}
fn default_limit_param() -> String {
    "limit".into()
}
fn default_total_pages_pointer() -> Option<String> {
    Some("/pagination/total_pages".into())
}
fn default_first_page() -> u64 {
    1
}
fn default_offset_param() -> String {
    "offset".into()
}
fn default_cursor_pointer() -> String {
    "/pagination/next_cursor".into()
}
fn default_cursor_param() -> String {
    "cursor".into()
}

/// Whether a source returns records in `(updated_at, id)` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Sorted (the default): the cursor follows each published chunk, so a run cut short
    /// continues where it stopped. Disorder is still detected, and then handled as `unsorted`.
    #[default]
    Sorted,
    /// Not sorted: the cursor moves only when a run has read every page.
    Unsorted,
}

/// When a source runs in daemon mode.
#[derive(Debug, Clone)]
pub enum ScheduleSpec {
    /// A cron expression evaluated in a time zone.
    Cron {
        expression: String,
        cron: Box<croner::Cron>,
        timezone: chrono_tz::Tz,
    },
    /// Every `COLLECTION_INTERVAL` (sources without a `schedule`).
    Every(Duration),
}

impl ScheduleSpec {
    /// The next time this schedule fires strictly after `after`.
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        match self {
            ScheduleSpec::Cron { cron, timezone, .. } => cron
                .find_next_occurrence(&after.with_timezone(timezone), false)
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc)),
            ScheduleSpec::Every(every) => {
                chrono::Duration::from_std(*every).ok().map(|d| after + d)
            }
        }
    }
}

/// One configured source, validated.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub url: Url,
    pub auth_type: AuthType,
    /// The environment variable the credential was read from.
    pub credential_env: String,
    /// The credential (absent only for `auth_type: none`).
    pub credential: Option<Secret<String>>,
    pub api_key_header: String,
    pub api_key_param: String,
    pub schedule: ScheduleSpec,
    pub pagination: Pagination,
    /// JSON pointer to the records array.
    pub records_pointer: String,
    /// JSON pointer, inside a record, to its id.
    pub id_pointer: String,
    /// JSON pointer, inside a record, to its last-modified time; `None` when it has none.
    pub updated_at_pointer: Option<String>,
    pub since_param: Option<String>,
    pub after_id_param: Option<String>,
    pub initial_lookback: Duration,
    pub page_size: u32,
    pub max_pages: u32,
    /// Requests per second; `None` is unlimited.
    pub rate_limit: Option<f64>,
    pub timeout: Duration,
    pub max_retries: u32,
    pub retry_delay: Duration,
    /// `RETRY_MAX_WAIT`: the longest server-given wait (`Retry-After`) honoured.
    pub retry_max_wait: Duration,
    /// The order the source returns records in.
    pub order: Order,
    /// The largest page body read, in bytes (`max_page_bytes`, default 64 MiB).
    pub max_page_bytes: usize,
    /// JSON pointers left out of a record's content (`crate::content`): its `updated_at`
    /// field and the source's `ignore_fields`. A record whose content is unchanged reuses its
    /// stored enrichment.
    pub content_ignore: Vec<String>,
}

/// A duration in JSON: seconds as a number, or a string such as `"24h"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum JsonDuration {
    Seconds(f64),
    Text(String),
}

impl JsonDuration {
    fn parse(&self) -> Result<Duration, String> {
        match self {
            JsonDuration::Seconds(s) => parse_duration(&s.to_string()),
            JsonDuration::Text(t) => parse_duration(t),
        }
    }
}

/// The JSON shape of one `DATA_SOURCES` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    url: String,
    #[serde(default)]
    auth_type: Option<String>,
    #[serde(default)]
    credential_env: Option<String>,
    #[serde(default)]
    api_key_header: Option<String>,
    #[serde(default)]
    api_key_param: Option<String>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default, alias = "time_zone")]
    timezone: Option<String>,
    #[serde(default)]
    pagination: Option<Pagination>,
    #[serde(default)]
    records_pointer: Option<String>,
    #[serde(default)]
    id_field: Option<String>,
    #[serde(default, deserialize_with = "explicit_null")]
    updated_at_field: Option<Option<String>>,
    #[serde(default, deserialize_with = "explicit_null")]
    since_param: Option<Option<String>>,
    #[serde(default, deserialize_with = "explicit_null")]
    after_id_param: Option<Option<String>>,
    #[serde(default)]
    initial_lookback: Option<JsonDuration>,
    #[serde(default)]
    page_size: Option<i64>,
    #[serde(default)]
    max_pages: Option<i64>,
    #[serde(default)]
    rate_limit: Option<f64>,
    #[serde(default)]
    timeout: Option<JsonDuration>,
    #[serde(default)]
    max_retries: Option<i64>,
    #[serde(default)]
    retry_delay: Option<JsonDuration>,
    #[serde(default)]
    order: Option<Order>,
    #[serde(default)]
    max_page_bytes: Option<i64>,
    #[serde(default)]
    ignore_fields: Option<Vec<String>>,
}

/// Tells "absent" (outer `None`) from "explicitly null" (`Some(None)`).
fn explicit_null<'de, D>(d: D) -> Result<Option<Option<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<String>::deserialize(d).map(Some)
}

/// A field name or JSON pointer, as a JSON pointer.
fn as_pointer(field: &str) -> String {
    if field.starts_with('/') {
        field.to_string()
    } else {
        format!("/{}", field.replace('~', "~0").replace('/', "~1"))
    }
}

/// Whether a name is usable as one NATS subject token and a metric label.
pub fn is_valid_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The sources and the legacy fetch keys.
#[derive(Debug, Clone)]
pub struct SourcesConfig {
    pub sources: Vec<SourceConfig>,
    /// `CHUNK_SIZE`: records per page request and per published chunk.
    pub chunk_size: u32,
    /// `MAX_RETRIES`: retries per request after the first attempt.
    pub max_retries: u32,
    /// `RETRY_DELAY`: the base of the exponential backoff.
    pub retry_delay: Duration,
    /// `COLLECTION_INTERVAL`: how often a source without a `schedule` runs in daemon mode.
    pub collection_interval: Duration,
    /// `RETRY_MAX_WAIT`: the longest server-given wait honoured (default 5 min).
    pub retry_max_wait: Duration,
}

impl SourcesConfig {
    pub const DEFAULT_CHUNK_SIZE: u32 = 1000;
    pub const DEFAULT_MAX_RETRIES: u32 = 3;
    pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(30);
    pub const DEFAULT_COLLECTION_INTERVAL: Duration = Duration::from_secs(3600);
    pub const DEFAULT_INITIAL_LOOKBACK: Duration = Duration::from_secs(24 * 3600);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_PAGES: u32 = 10_000;
    pub const DEFAULT_MAX_PAGE_BYTES: usize = 64 << 20;

    pub fn read(r: &mut Reader<'_>) -> Self {
        let chunk_size = r.positive_u32("CHUNK_SIZE", Self::DEFAULT_CHUNK_SIZE);
        let max_retries = r.non_negative_u32("MAX_RETRIES", Self::DEFAULT_MAX_RETRIES);
        let retry_delay = r.duration("RETRY_DELAY", Self::DEFAULT_RETRY_DELAY);
        let collection_interval =
            r.duration("COLLECTION_INTERVAL", Self::DEFAULT_COLLECTION_INTERVAL);
        let retry_max_wait = r.duration(
            "RETRY_MAX_WAIT",
            tardis_common::backoff::DEFAULT_RETRY_MAX_WAIT,
        );
        let mut config = Self {
            sources: Vec::new(),
            chunk_size,
            max_retries,
            retry_delay,
            collection_interval,
            retry_max_wait,
        };
        let Some(raw) = r.raw("DATA_SOURCES") else {
            r.problem(
                "DATA_SOURCES",
                "is not set",
                format!("set it to a JSON array of sources, for example {SOURCES_EXAMPLE}"),
            );
            return config;
        };
        let entries: Vec<serde_json::Value> = match serde_json::from_str(&raw) {
            Ok(serde_json::Value::Array(entries)) => entries,
            Ok(_) => {
                r.problem(
                    "DATA_SOURCES",
                    "must be a JSON array of sources",
                    format!("for example {SOURCES_EXAMPLE}"),
                );
                return config;
            }
            Err(e) => {
                r.problem(
                    "DATA_SOURCES",
                    format!(
                        "is not valid JSON: {} at line {} column {}",
                        describe_json_error(&e),
                        e.line(),
                        e.column()
                    ),
                    format!("fix the JSON, for example {SOURCES_EXAMPLE}"),
                );
                return config;
            }
        };
        if entries.is_empty() {
            r.problem(
                "DATA_SOURCES",
                "is an empty list",
                format!("configure at least one source, for example {SOURCES_EXAMPLE}"),
            );
        }
        let mut seen = HashSet::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let name_hint = entry
                .get("name")
                .and_then(|n| n.as_str())
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let raw_source: RawSource = match serde_path_to_error::deserialize(entry) {
                Ok(s) => s,
                Err(e) => {
                    let path = e.path().to_string();
                    let key = if path == "." {
                        format!("DATA_SOURCES[{i}]")
                    } else {
                        format!("DATA_SOURCES[{i}].{path}")
                    };
                    let inner = e.into_inner().to_string();
                    let fix = if inner.contains("unknown field") {
                        "remove or rename the field (see the source reference in README.md)"
                            .to_string()
                    } else {
                        format!("for example {SOURCES_EXAMPLE}")
                    };
                    r.problem(format!("{key}{name_hint}"), inner, fix);
                    continue;
                }
            };
            if let Some(source) = validate_source(r, i, raw_source, &config) {
                if !seen.insert(source.name.clone()) {
                    r.problem(
                        format!("DATA_SOURCES[{i}].name"),
                        format!("duplicate source name {:?}", source.name),
                        "give every source a unique name",
                    );
                    continue;
                }
                config.sources.push(source);
            }
        }
        config
    }

    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }
}

fn describe_json_error(e: &serde_json::Error) -> String {
    // serde_json appends " at line L column C"; we print the position ourselves.
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    }
}

fn validate_source(
    r: &mut Reader<'_>,
    i: usize,
    raw: RawSource,
    defaults: &SourcesConfig,
) -> Option<SourceConfig> {
    let before = r.problem_count();
    let name = raw.name.trim().to_string();
    let key = |field: &str| format!("DATA_SOURCES[{i}].{field}");
    let label = if name.is_empty() {
        format!("source #{i}")
    } else {
        format!("source {name:?}")
    };
    if !is_valid_token(&name) {
        r.problem(
            key("name"),
            format!("{label}: name must be 1 to 64 letters, digits, '_' or '-'"),
            "for example \"name\": \"market_data\"",
        );
    }
    let url = match parse_http_url(raw.url.trim()) {
        Ok(url) => Some(url),
        Err(problem) => {
            r.problem(
                key("url"),
                format!("{label}: url {problem}"),
                "for example \"url\": \"https://api.example.com/v2/market/quotes\"",
            );
            None
        }
    };
    let auth_type = match raw.auth_type.as_deref().map(str::trim) {
        None | Some("") => AuthType::None,
        Some(text) => match AuthType::ALL.into_iter().find(|a| a.as_str() == text) {
            Some(a) => a,
            None => {
                r.problem(
                    key("auth_type"),
                    format!("{label}: unknown auth_type {text:?}"),
                    format!(
                        "use one of {}",
                        AuthType::ALL.map(AuthType::as_str).join(", ")
                    ),
                );
                AuthType::None
            }
        },
    };
    let credential_env = raw
        .credential_env
        .unwrap_or_else(|| DEFAULT_CREDENTIAL_ENV.to_string());
    let credential = if auth_type == AuthType::None {
        None
    } else {
        let value = r.secret(&credential_env);
        match &value {
            None => r.problem(
                credential_env.clone(),
                format!("is not set, but {label} uses auth_type {auth_type}"),
                format!(
                    "set {credential_env} to the source's credential, or name another variable with \"credential_env\""
                ),
            ),
            Some(v) if auth_type == AuthType::Basic && !v.expose().contains(':') => r.problem(
                credential_env.clone(),
                format!("{label} uses auth_type basic, which needs the credential as user:password"),
                format!("for example {credential_env}=collector:s3cret"),
            ),
            Some(_) => {}
        }
        value
    };
    let timezone = match raw.timezone.as_deref().map(str::trim) {
        None | Some("") => chrono_tz::UTC,
        Some(tz) => match chrono_tz::Tz::from_str(tz) {
            Ok(tz) => tz,
            Err(_) => {
                r.problem(
                    key("timezone"),
                    format!("{label}: unknown time zone {tz:?}"),
                    "use an IANA time zone name, for example \"timezone\": \"Europe/Paris\"",
                );
                chrono_tz::UTC
            }
        },
    };
    let schedule = match raw.schedule.as_deref().map(str::trim) {
        None | Some("") => ScheduleSpec::Every(defaults.collection_interval),
        Some(expr) => match croner::Cron::from_str(expr) {
            Ok(cron) => ScheduleSpec::Cron {
                expression: expr.to_string(),
                cron: Box::new(cron),
                timezone,
            },
            Err(e) => {
                r.problem(
                    key("schedule"),
                    format!("{label}: invalid cron expression {expr:?} ({e})"),
                    "use five fields (minute hour day-of-month month day-of-week), for example \"schedule\": \"*/15 * * * *\"",
                );
                ScheduleSpec::Every(defaults.collection_interval)
            }
        },
    };
    let mut duration =
        |field: &str, value: Option<JsonDuration>, default: Duration, example: &str| match value {
            None => default,
            Some(v) => match v.parse() {
                Ok(d) => d,
                Err(problem) => {
                    r.problem(
                        key(field),
                        format!("{label}: {field} {problem}"),
                        format!("for example \"{field}\": \"{example}\""),
                    );
                    default
                }
            },
        };
    let initial_lookback = duration(
        "initial_lookback",
        raw.initial_lookback,
        SourcesConfig::DEFAULT_INITIAL_LOOKBACK,
        "24h",
    );
    let timeout = duration(
        "timeout",
        raw.timeout,
        SourcesConfig::DEFAULT_TIMEOUT,
        "30s",
    );
    let retry_delay = duration("retry_delay", raw.retry_delay, defaults.retry_delay, "30s");
    let mut positive = |field: &str, value: Option<i64>, default: u32, allow_zero: bool| match value
    {
        None => default,
        Some(n) if (n > 0 || (allow_zero && n == 0)) && n <= i64::from(u32::MAX) => n as u32,
        Some(n) => {
            r.problem(
                key(field),
                format!(
                    "{label}: {field} must be a {} integer, got {n}",
                    if allow_zero {
                        "non-negative"
                    } else {
                        "positive"
                    }
                ),
                format!("for example \"{field}\": {default}"),
            );
            default
        }
    };
    let page_size = positive("page_size", raw.page_size, defaults.chunk_size, false);
    let max_pages = positive(
        "max_pages",
        raw.max_pages,
        SourcesConfig::DEFAULT_MAX_PAGES,
        false,
    );
    let max_retries = positive("max_retries", raw.max_retries, defaults.max_retries, true);
    let max_page_bytes = match raw.max_page_bytes {
        None => SourcesConfig::DEFAULT_MAX_PAGE_BYTES,
        Some(n) if (1024..=1 << 40).contains(&n) => n as usize,
        Some(n) => {
            r.problem(
                key("max_page_bytes"),
                format!("{label}: max_page_bytes must be between 1024 and 2^40, got {n}"),
                "for example \"max_page_bytes\": 67108864 (64 MiB)",
            );
            SourcesConfig::DEFAULT_MAX_PAGE_BYTES
        }
    };
    let rate_limit = match raw.rate_limit {
        Some(rps) if !(rps.is_finite() && rps > 0.0) => {
            r.problem(
                key("rate_limit"),
                format!("{label}: rate_limit must be a positive number of requests per second, got {rps}"),
                "for example \"rate_limit\": 5",
            );
            None
        }
        other => other,
    };
    let pointer = |v: Option<String>, default: &str| {
        as_pointer(v.as_deref().map(str::trim).unwrap_or(default))
    };
    let updated_at_pointer = match raw.updated_at_field {
        None => Some(as_pointer("updated_at")),
        Some(None) => None,
        Some(Some(f)) => Some(as_pointer(f.trim())),
    };
    let mut content_ignore: Vec<String> = updated_at_pointer.iter().cloned().collect();
    for field in raw.ignore_fields.unwrap_or_default() {
        let field = field.trim();
        if field.is_empty() || field == "/" {
            r.problem(
                key("ignore_fields"),
                format!("{label}: ignore_fields holds an empty field name"),
                "list field names or JSON pointers, for example \"ignore_fields\": [\"view_count\", \"/stats/last_seen\"]",
            );
            continue;
        }
        let pointer = as_pointer(field);
        if !content_ignore.contains(&pointer) {
            content_ignore.push(pointer);
        }
    }
    let source = SourceConfig {
        name,
        url: url?,
        auth_type,
        credential_env,
        credential,
        api_key_header: raw.api_key_header.unwrap_or_else(|| "X-API-Key".into()),
        api_key_param: raw.api_key_param.unwrap_or_else(|| "api_key".into()),
        schedule,
        pagination: raw.pagination.unwrap_or_default(),
        records_pointer: pointer(raw.records_pointer, "/data"),
        id_pointer: pointer(raw.id_field, "id"),
        updated_at_pointer,
        since_param: raw.since_param.unwrap_or_else(|| Some("since".into())),
        after_id_param: raw
            .after_id_param
            .unwrap_or_else(|| Some("after_id".into())),
        initial_lookback,
        page_size,
        max_pages,
        rate_limit,
        timeout,
        max_retries,
        retry_delay,
        retry_max_wait: defaults.retry_max_wait,
        order: raw.order.unwrap_or_default(),
        max_page_bytes,
        content_ignore,
    };
    (r.problem_count() == before).then_some(source)
}
