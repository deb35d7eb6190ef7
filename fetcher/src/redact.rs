//! Credentials out of everything the fetcher shows: logs, run reports (`fetch_runs.error`),
//! metrics.
//!
//! * A URL loses its user info (`user:pass@`), and every query parameter whose name looks like
//!   a credential (`key`, `token`, `secret`, `password`, `signature`, `auth`, … in any case,
//!   as a whole name or as a word of it: `api_key`, `apiKey`, `X-Amz-Signature`,
//!   `access_token`) has its value replaced by `***`, whatever the source's `auth_type`. So do
//!   the parameters named in `also` (the source's `api_key_param`) and any occurrence of the
//!   source's own credential.
//! * A text (an error body) has every occurrence of the source's credential replaced by `***`,
//!   and only then is cut to its first characters, so a cut can never leave part of a secret.

use url::Url;

/// Parameter-name words that mark a credential (compared case-insensitively).
const WORDS: &[&str] = &[
    "key",
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "pass",
    "signature",
    "sig",
    "auth",
    "authorization",
    "credential",
    "credentials",
    "session",
    "sessionid",
    "jwt",
    "bearer",
    "code",
];

/// Substrings that mark a credential wherever they appear in a parameter name.
const INFIXES: &[&str] = &[
    "password",
    "secret",
    "token",
    "signature",
    "credential",
    "apikey",
    "api_key",
    "api-key",
];

/// Whether a query parameter named `name` probably carries a credential.
pub fn is_credential_param(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if INFIXES.iter().any(|w| lower.contains(w)) {
        return true;
    }
    words(name).any(|w| WORDS.contains(&w.to_ascii_lowercase().as_str()))
}

/// The words of a name: split at non-alphanumerics and at lower-to-upper case changes.
fn words(name: &str) -> impl Iterator<Item = &str> {
    let mut out = Vec::new();
    let bytes = name.as_bytes();
    let mut start = 0;
    for i in 0..=bytes.len() {
        let boundary = i == bytes.len()
            || !bytes[i].is_ascii_alphanumeric()
            || (i > start && bytes[i].is_ascii_uppercase() && bytes[i - 1].is_ascii_lowercase());
        if boundary {
            if i > start {
                out.push(&name[start..i]);
            }
            start = if i < bytes.len() && !bytes[i].is_ascii_alphanumeric() {
                i + 1
            } else {
                i
            };
        }
    }
    out.into_iter()
}

/// `url` for display: no user info, credential-like parameters (and those named in `also`)
/// as `***`, and `secret` nowhere.
pub fn url(url: &Url, also: &[&str], secret: Option<&str>) -> String {
    let mut u = url.clone();
    // Both fail only for URLs that cannot have credentials, which then have none to remove.
    if u.set_username("").is_err() || u.set_password(None).is_err() {
        tracing::trace!("url has no credentials to remove");
    }
    if u.query().is_some() {
        let mut changed = false;
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let hide = is_credential_param(&k) || also.iter().any(|a| *a == k);
                if hide && !v.is_empty() {
                    changed = true;
                    (k.into_owned(), "***".to_string())
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect();
        if changed {
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
    let shown = u.to_string();
    match secret {
        Some(s) => text(&shown, Some(s), usize::MAX),
        None => shown,
    }
}

/// `body` with every occurrence of `secret` (also URL-encoded) replaced by `***`, then cut to
/// `max_chars` characters.
pub fn text(body: &str, secret: Option<&str>, max_chars: usize) -> String {
    let mut out = body.to_string();
    if let Some(secret) = secret.filter(|s| s.len() >= 4) {
        out = out.replace(secret, "***");
        let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        if encoded != secret {
            out = out.replace(&encoded, "***");
        }
    }
    if out.chars().count() > max_chars {
        out = out.chars().take(max_chars).collect();
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_like_names() {
        for name in [
            "key",
            "api_key",
            "apiKey",
            "API-KEY",
            "access_token",
            "token",
            "client_secret",
            "password",
            "X-Amz-Signature",
            "sig",
            "auth",
            "authToken",
            "sessionId",
            "refreshToken",
            "private_key",
            "Authorization",
            "credentials",
        ] {
            assert!(is_credential_param(name), "{name}");
        }
        for name in [
            "since",
            "page",
            "_limit",
            "_sort",
            "after_id",
            "updated_at_gte",
            "author",
            "monkey_id",
            "offset",
            "cursor",
        ] {
            assert!(!is_credential_param(name), "{name}");
        }
    }

    #[test]
    fn urls_lose_user_info_and_credential_parameters_whatever_the_auth_type() {
        let u = Url::parse(
            "https://user:pw@api.example.com/x?since=1&Access_Token=t0k&page=2&X-Amz-Signature=abc&k=s3cret",
        )
        .unwrap();
        assert_eq!(
            url(&u, &["k"], None),
            "https://api.example.com/x?since=1&Access_Token=***&page=2&X-Amz-Signature=***&k=***"
        );
        let u = Url::parse("https://api.example.com/x?q=my-long-secret&since=1").unwrap();
        assert_eq!(
            url(&u, &[], Some("my-long-secret")),
            "https://api.example.com/x?q=***&since=1",
            "the source's own credential, wherever it is"
        );
        let plain = Url::parse("https://api.example.com/x?since=2026-01-01T00%3A00%3A00Z").unwrap();
        assert_eq!(
            url(&plain, &[], None),
            plain.as_str(),
            "nothing else changes"
        );
    }

    #[test]
    fn bodies_are_redacted_before_they_are_cut() {
        let secret = "placeholder-credential-value";
        let body = format!("{}{secret} trailing", "x".repeat(190));
        let shown = text(&body, Some(secret), 200);
        assert!(!shown.contains("placeholder-cred"), "{shown}");
        assert!(shown.starts_with(&"x".repeat(190)));
        assert!(shown.contains("***"));
        let encoded = text("token=a%2Bb%2Fc%3D%3D", Some("a+b/c=="), 200);
        assert_eq!(encoded, "token=***");
        assert_eq!(text("short", None, 3), "sho…");
    }
}
