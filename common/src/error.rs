//! Error helpers.

use std::error::Error;

/// An error and all its sources, joined with `: ` — what `{:#}` prints for `anyhow`, for
/// errors (deadpool's, tokio-postgres's) whose own `Display` hides the cause ("db error").
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.ends_with(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_sources() {
        let e = Outer(std::io::Error::other("password authentication failed"));
        assert_eq!(super::chain(&e), "outer: password authentication failed");
    }
}
