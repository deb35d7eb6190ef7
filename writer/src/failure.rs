//! What a failed transaction means for its batch, from the SQLSTATE (pure policy): the
//! consuming loop ([`crate::consume`]) naks, pauses, isolates or dead-letters by this class.

/// Why a transaction failed, by what happens next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// Postgres unreachable: nak, pause pulling until it answers.
    Connection(String),
    /// The data was refused (SQLSTATE classes 22, 23, 54, and 21000): isolate, then
    /// dead-letter.
    Data(String),
    /// `statement_timeout`, `idle_in_transaction_session_timeout`, a lock or serialization
    /// conflict (57014, 25P03, 55P03, 40001, 40P01): nak with a delay and try again.
    Busy(String),
}

/// The class of a failure from its SQLSTATE (pure).
pub(crate) fn classify_code(code: Option<&str>, text: String) -> WriteError {
    match code {
        // Data exceptions, integrity violations, a value past a limit (an index row too
        // large), a cardinality violation: this data can never be written.
        Some(c)
            if c.starts_with("22")
                || c.starts_with("23")
                || c.starts_with("54")
                || c == "21000" =>
        {
            WriteError::Data(text)
        }
        Some("57014" | "25P03" | "55P03" | "40001" | "40P01") => WriteError::Busy(text),
        _ => WriteError::Connection(text),
    }
}

pub(crate) fn classify(e: tokio_postgres::Error) -> WriteError {
    let text = tardis_common::error::chain(&e);
    classify_code(e.code().map(|c| c.code()), text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_decide_what_happens_next() {
        let c = |code: Option<&str>| classify_code(code, String::new());
        assert_eq!(c(Some("23505")), WriteError::Data(String::new()));
        assert_eq!(c(Some("22P02")), WriteError::Data(String::new()));
        assert_eq!(
            c(Some("54000")),
            WriteError::Data(String::new()),
            "an id too long for the index"
        );
        assert_eq!(c(Some("21000")), WriteError::Data(String::new()));
        for busy in ["57014", "25P03", "55P03", "40001", "40P01"] {
            assert_eq!(c(Some(busy)), WriteError::Busy(String::new()), "{busy}");
        }
        assert_eq!(c(Some("08006")), WriteError::Connection(String::new()));
        assert_eq!(c(None), WriteError::Connection(String::new()));
    }
}
