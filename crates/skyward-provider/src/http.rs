//! The HTTP client every REST/GraphQL provider uses: authentication, retries (429 honouring
//! `Retry-After`, 5xx for idempotent calls), error classification and redaction.
//!
//! Invariant: the credential never appears in an error or a log line. Only method, path, status
//! and timing are logged; error bodies are cut to a few hundred characters and scrubbed of the
//! credential in case a server echoes it.

use crate::{ProviderError, Secret};
use serde_json::Value;
use std::time::Duration;

/// How a provider authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `Authorization: Bearer <token>`.
    Bearer(Secret<String>),
    /// A named header carrying the key (`api_key: ...`, `X-Auth-Token: ...`).
    Header(&'static str, Secret<String>),
}

impl Auth {
    fn secret(&self) -> &str {
        match self {
            Self::Bearer(s) | Self::Header(_, s) => s.expose(),
        }
    }
}

/// Whether a call may be repeated after a server error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotent {
    /// Reads and deletes: retried on 5xx and transport errors.
    Yes,
    /// Creates: never repeated blindly (the provider checks whether a machine exists first).
    No,
}

/// What a provider's classifier says an error response means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// No machines of that kind now.
    Capacity,
    /// Account limit or balance.
    Quota,
    /// Bad credentials.
    Auth,
    /// The request is wrong.
    Invalid,
}

/// An HTTP response that was not a success, given to the provider's classifier.
#[derive(Debug, Clone)]
pub struct ErrorResponse {
    /// HTTP status.
    pub status: u16,
    /// Body text (cut and scrubbed).
    pub body: String,
}

/// A successful call's JSON body, or the resource was not found (404).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 2xx with its body (`Null` when empty).
    Ok(Value),
    /// 404.
    NotFound,
}

/// One provider's API client.
#[derive(Debug, Clone)]
pub struct Api {
    provider: &'static str,
    base: String,
    auth: Auth,
    /// Environment variable or setting that holds the credential (named in auth errors).
    credential_hint: &'static str,
    client: reqwest::Client,
    retries: u32,
    max_retry_after: Duration,
    classify: fn(&ErrorResponse) -> Option<ErrorClass>,
}

const BODY_LIMIT: usize = 400;

impl Api {
    /// A client for `base` (no trailing slash), timing requests out after `timeout`.
    pub fn new(
        provider: &'static str,
        base: impl Into<String>,
        auth: Auth,
        credential_hint: &'static str,
        timeout: Duration,
        classify: fn(&ErrorResponse) -> Option<ErrorClass>,
    ) -> Result<Self, ProviderError> {
        let base = base.into().trim_end_matches('/').to_string();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(ProviderError::Invalid { provider, message: format!("endpoint {base:?} is not an http(s) URL") });
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("skyward/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Invalid { provider, message: format!("HTTP client: {e}") })?;
        Ok(Self { provider, base, auth, credential_hint, client, retries: 4, max_retry_after: Duration::from_secs(30), classify })
    }

    /// How many times a throttled or failed idempotent call is repeated (default 4).
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET`/`POST`/... `path` (joined to the base) with an optional JSON body; a non-2xx answer
    /// becomes a typed `ProviderError`, except 404 which is `Reply::NotFound`.
    pub async fn call(
        &self,
        operation: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        idem: Idempotent,
    ) -> Result<Reply, ProviderError> {
        let url = format!("{}{}", self.base, path);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self.client.request(method.clone(), &url);
            req = match &self.auth {
                Auth::Bearer(token) => req.bearer_auth(token.expose()),
                Auth::Header(name, key) => req.header(*name, key.expose()),
            };
            if let Some(b) = body {
                req = req.json(b);
            }
            let started = std::time::Instant::now();
            let sent = req.send().await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    let message = self.scrub(&describe_reqwest(&e));
                    tracing::debug!(provider = self.provider, %method, path, attempt, error = %message, "request failed");
                    if idem == Idempotent::Yes && attempt <= self.retries {
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    return Err(ProviderError::Failed { provider: self.provider, operation, message });
                }
            };
            let status = response.status().as_u16();
            tracing::debug!(provider = self.provider, %method, path, status, elapsed = ?started.elapsed(), "api call");
            let retry_after =
                response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                if text.trim().is_empty() {
                    return Ok(Reply::Ok(Value::Null));
                }
                return serde_json::from_str(&text).map(Reply::Ok).map_err(|e| ProviderError::Failed {
                    provider: self.provider,
                    operation,
                    message: format!("malformed response to {method} {path}: {e}: {}", self.cut(&text)),
                });
            }
            if status == 404 {
                return Ok(Reply::NotFound);
            }
            let error = ErrorResponse { status, body: self.cut(&text) };
            if status == 429 {
                if attempt <= self.retries {
                    let wait = retry_after.unwrap_or_else(|| backoff(attempt)).min(self.max_retry_after);
                    tracing::info!(provider = self.provider, operation, ?wait, "throttled (429); waiting");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return Err(ProviderError::RateLimited {
                    provider: self.provider,
                    operation,
                    message: format!("HTTP 429 after {} attempts: {}", attempt, error.body),
                });
            }
            match (self.classify)(&error) {
                Some(class) => return Err(self.classified(class, operation, &error)),
                None if status == 401 || status == 403 => return Err(self.classified(ErrorClass::Auth, operation, &error)),
                None if status == 402 => return Err(self.classified(ErrorClass::Quota, operation, &error)),
                None if status >= 500 => {
                    if idem == Idempotent::Yes && attempt <= self.retries {
                        tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(attempt)).min(self.max_retry_after)).await;
                        continue;
                    }
                    return Err(ProviderError::Failed {
                        provider: self.provider,
                        operation,
                        message: format!("HTTP {status}: {}", error.body),
                    });
                }
                None => return Err(self.classified(ErrorClass::Invalid, operation, &error)),
            }
        }
    }

    /// `call` for a resource that must exist: 404 is an error naming the path.
    pub async fn json(
        &self,
        operation: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        idem: Idempotent,
    ) -> Result<Value, ProviderError> {
        match self.call(operation, method.clone(), path, body, idem).await? {
            Reply::Ok(v) => Ok(v),
            Reply::NotFound => {
                Err(ProviderError::Failed { provider: self.provider, operation, message: format!("{method} {path}: HTTP 404 not found") })
            }
        }
    }

    /// The typed error for `class`.
    pub fn classified(&self, class: ErrorClass, operation: &'static str, error: &ErrorResponse) -> ProviderError {
        let provider = self.provider;
        let message = format!("{operation}: HTTP {}: {}", error.status, error.body);
        match class {
            ErrorClass::Capacity => ProviderError::NoCapacity { provider, message },
            ErrorClass::Quota => ProviderError::Quota { provider, message },
            ErrorClass::Auth => ProviderError::Auth { provider, message: format!("{message} (hint: check {})", self.credential_hint) },
            ErrorClass::Invalid => ProviderError::Invalid { provider, message },
        }
    }

    /// Remove the credential from `text` (servers sometimes echo a request).
    pub fn scrub(&self, text: &str) -> String {
        let secret = self.auth.secret();
        if secret.len() >= 4 { text.replace(secret, "<redacted>") } else { text.to_string() }
    }

    fn cut(&self, text: &str) -> String {
        let text = self.scrub(text.trim());
        match text.char_indices().nth(BODY_LIMIT) {
            Some((i, _)) => format!("{}...", &text[..i]),
            None => text,
        }
    }
}

/// A `Retry-After` value: seconds (`2`) or an HTTP date (a past date is zero).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs >= 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate_parse(v)?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// RFC 7231 IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form servers send today.
fn httpdate_parse(v: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].iter().position(|m| *m == parts[2])?
        as u64
        + 1;
    let year: u64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4].split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    if hms.len() != 3 || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(days * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2]))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6)))
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A required credential from `explicit` or the environment variable `var`; a clear error
/// naming both when neither is set.
pub fn credential(provider: &'static str, explicit: Option<&Secret<String>>, var: &'static str) -> Result<Secret<String>, ProviderError> {
    if let Some(s) = explicit {
        return check_credential(provider, s.clone(), var);
    }
    match std::env::var(var) {
        Ok(v) => check_credential(provider, Secret::new(v), var),
        Err(_) => Err(ProviderError::Auth { provider, message: format!("no API key (hint: set {var} or pass api_key)") }),
    }
}

fn check_credential(provider: &'static str, s: Secret<String>, var: &'static str) -> Result<Secret<String>, ProviderError> {
    let v = s.expose();
    if v.trim().is_empty() {
        return Err(ProviderError::Auth { provider, message: format!("the API key is empty (hint: set {var})") });
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProviderError::Auth {
            provider,
            message: format!(
                "the API key is malformed: it contains whitespace or control characters (hint: check {var} for a stray newline)"
            ),
        });
    }
    Ok(s)
}

/// Read a required field, with an error naming the provider, the field and the object.
pub fn field<'a>(provider: &'static str, object: &'static str, v: &'a Value, name: &str) -> Result<&'a Value, ProviderError> {
    match v.get(name) {
        Some(x) if !x.is_null() => Ok(x),
        _ => Err(malformed(provider, object, name, "missing")),
    }
}

/// A string field.
pub fn str_field<'a>(provider: &'static str, object: &'static str, v: &'a Value, name: &str) -> Result<&'a str, ProviderError> {
    field(provider, object, v, name)?.as_str().ok_or_else(|| malformed(provider, object, name, "not a string"))
}

/// A number field (numbers sent as strings are accepted: several APIs do that).
pub fn num_field(provider: &'static str, object: &'static str, v: &Value, name: &str) -> Result<f64, ProviderError> {
    let x = field(provider, object, v, name)?;
    as_f64(x).ok_or_else(|| malformed(provider, object, name, "not a number"))
}

/// A number, or a number in a string.
pub fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The error for a malformed response field.
pub fn malformed(provider: &'static str, object: &'static str, name: &str, what: &str) -> ProviderError {
    ProviderError::Failed { provider, operation: "reading a response", message: format!("malformed {object}: field `{name}` {what}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO), "a past date means now");
        assert_eq!(
            httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            784111777
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn credentials_are_checked_and_never_shown() {
        let err = credential("p", Some(&Secret::new("abc def".into())), "P_KEY").unwrap_err().to_string();
        assert!(err.contains("malformed") && err.contains("P_KEY") && !err.contains("abc def"), "{err}");
        let err = credential("p", Some(&Secret::new("  ".into())), "P_KEY").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let err = credential("p", None, "SKYWARD_TEST_SURELY_UNSET_VAR").unwrap_err().to_string();
        assert!(err.contains("hint: set SKYWARD_TEST_SURELY_UNSET_VAR"), "{err}");
    }

    #[test]
    fn fields_name_provider_object_and_field() {
        let v = serde_json::json!({"a": "x", "n": "1.5", "bad": [1]});
        assert_eq!(str_field("p", "Pod", &v, "a").unwrap(), "x");
        assert_eq!(num_field("p", "Pod", &v, "n").unwrap(), 1.5);
        let e = num_field("p", "Pod", &v, "bad").unwrap_err().to_string();
        assert!(e.contains("p:") && e.contains("Pod") && e.contains("`bad`"), "{e}");
        assert!(str_field("p", "Pod", &v, "missing").unwrap_err().to_string().contains("`missing` missing"));
    }
}
