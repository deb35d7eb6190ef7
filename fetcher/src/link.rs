//! The `Link` header (RFC 8288 §3), parsed by its grammar:
//!
//! ```text
//! Link       = #link-value
//! link-value = "<" URI-Reference ">" *( OWS ";" OWS link-param )
//! link-param = token BWS [ "=" BWS ( token / quoted-string ) ]
//! ```
//!
//! Written here because the `parse_link_header` crate splits the whole header on every comma,
//! so `<https://api.example.com/events?_sort=updated_at,id&_page=2>; rel="next"` (a URL may
//! hold commas) fails to parse. A header that does not follow the grammar is an error, never
//! "no next page": the caller fails the source instead of ending the run early.

/// One link of a `Link` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The target as written between `<` and `>` (maybe relative).
    pub target: String,
    /// The parameters in order, names lower-cased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Link {
    /// The value of the first parameter called `name` (case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether `rel` lists `relation` (relation types are space-separated, case-insensitive).
    pub fn has_rel(&self, relation: &str) -> bool {
        self.param("rel").is_some_and(|rel| {
            rel.split_ascii_whitespace()
                .any(|r| r.eq_ignore_ascii_case(relation))
        })
    }
}

/// Why a `Link` header could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem} at byte {at}")]
pub struct LinkError {
    pub problem: &'static str,
    pub at: usize,
}

/// Every link of a `Link` header value, in order.
pub fn parse(header: &str) -> Result<Vec<Link>, LinkError> {
    let mut p = Parser {
        s: header.as_bytes(),
        i: 0,
    };
    let mut links = Vec::new();
    loop {
        // `#rule`: empty elements and surrounding whitespace are allowed.
        p.skip(|c| c == b' ' || c == b'\t' || c == b',');
        if p.done() {
            break;
        }
        links.push(p.link_value()?);
        p.ows();
        if p.done() {
            break;
        }
        p.expect(b',', "expected ',' between links")?;
    }
    Ok(links)
}

/// The first `rel="next"` target, if any.
pub fn next_target(header: &str) -> Result<Option<String>, LinkError> {
    Ok(parse(header)?
        .into_iter()
        .find(|l| l.has_rel("next"))
        .map(|l| l.target))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip(&mut self, keep: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&keep) {
            self.i += 1;
        }
    }

    fn ows(&mut self) {
        self.skip(|c| c == b' ' || c == b'\t');
    }

    fn error(&self, problem: &'static str) -> LinkError {
        LinkError {
            problem,
            at: self.i,
        }
    }

    fn expect(&mut self, c: u8, problem: &'static str) -> Result<(), LinkError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(problem))
        }
    }

    fn text(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.s[from..self.i]).into_owned()
    }

    fn link_value(&mut self) -> Result<Link, LinkError> {
        self.expect(b'<', "expected '<' opening a link target")?;
        let start = self.i;
        self.skip(|c| c != b'>');
        if self.done() {
            return Err(self.error("unterminated '<' (no '>')"));
        }
        let target = self.text(start).trim().to_string();
        self.i += 1;
        let mut params = Vec::new();
        loop {
            self.ows();
            if self.peek() != Some(b';') {
                break;
            }
            self.i += 1;
            self.ows();
            if matches!(self.peek(), None | Some(b',')) {
                // A trailing ';' with no parameter: tolerated, as browsers do.
                break;
            }
            let start = self.i;
            self.skip(is_tchar);
            if self.i == start {
                return Err(self.error("expected a parameter name"));
            }
            let name = self.text(start).to_ascii_lowercase();
            self.ows();
            let value = if self.peek() == Some(b'=') {
                self.i += 1;
                self.ows();
                self.param_value()?
            } else {
                String::new()
            };
            params.push((name, value));
        }
        Ok(Link { target, params })
    }

    fn param_value(&mut self) -> Result<String, LinkError> {
        if self.peek() != Some(b'"') {
            let start = self.i;
            self.skip(is_tchar);
            if self.i == start {
                return Err(self.error("expected a token or a quoted string"));
            }
            return Ok(self.text(start));
        }
        self.i += 1;
        let mut value = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated quoted string")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(String::from_utf8_lossy(&value).into_owned());
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(c) => value.push(c),
                        None => return Err(self.error("unterminated quoted string")),
                    }
                    self.i += 1;
                }
                Some(c) => {
                    value.push(c);
                    self.i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(header: &str) -> Vec<(String, Option<String>)> {
        parse(header)
            .unwrap()
            .into_iter()
            .map(|l| (l.target.clone(), l.param("rel").map(str::to_string)))
            .collect()
    }

    // The examples of RFC 8288 §3.5.
    #[test]
    fn rfc_8288_examples() {
        let l = parse(
            r#"<http://example.com/TheBook/chapter2>; rel="previous"; title="previous chapter""#,
        )
        .unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].target, "http://example.com/TheBook/chapter2");
        assert!(l[0].has_rel("previous"));
        assert_eq!(l[0].param("title"), Some("previous chapter"));

        assert_eq!(
            targets(r#"</>; rel="http://example.net/foo""#),
            vec![("/".into(), Some("http://example.net/foo".into()))]
        );

        let l = parse(r##"</terms>; rel="copyright"; anchor="#foo""##).unwrap();
        assert_eq!(l[0].param("anchor"), Some("#foo"));

        let l = parse(
            "</TheBook/chapter2>; rel=\"previous\"; title*=UTF-8'de'letztes%20Kapitel, \
             </TheBook/chapter4>; rel=\"next\"; title*=UTF-8'de'n%c3%a4chstes%20Kapitel",
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].target, "/TheBook/chapter4");
        assert_eq!(
            l[1].param("title*"),
            Some("UTF-8'de'n%c3%a4chstes%20Kapitel")
        );

        let l = parse(r#"<http://example.org/>; rel="start http://example.net/relation/other""#)
            .unwrap();
        assert!(l[0].has_rel("start"));
        assert!(l[0].has_rel("http://example.net/relation/other"));

        assert_eq!(
            targets(
                r#"<https://example.org/>; rel="start", <https://example.org/index>; rel="index""#
            ),
            vec![
                ("https://example.org/".into(), Some("start".into())),
                ("https://example.org/index".into(), Some("index".into()))
            ]
        );
    }

    #[test]
    fn commas_inside_targets_and_quoted_strings_do_not_split_links() {
        let header = r#"<http://localhost:3000/events?_sort=updated_at,id&_page=1&_limit=10>; rel="first", <http://localhost:3000/events?_sort=updated_at,id&_page=2&_limit=10>; rel="next"; title="page 2, of 9", <http://localhost:3000/events?_sort=updated_at,id&_page=9&_limit=10>; rel="last""#;
        assert_eq!(
            next_target(header).unwrap().as_deref(),
            Some("http://localhost:3000/events?_sort=updated_at,id&_page=2&_limit=10")
        );
        assert_eq!(parse(header).unwrap().len(), 3);
    }

    #[test]
    fn relation_types_are_case_insensitive_tokens_or_lists() {
        assert_eq!(
            next_target("</p2>; REL=NEXT").unwrap().as_deref(),
            Some("/p2")
        );
        assert_eq!(
            next_target(r#"</p2>; rel="prefetch next""#)
                .unwrap()
                .as_deref(),
            Some("/p2")
        );
        assert_eq!(next_target(r#"</p1>; rel="prev""#).unwrap(), None);
        assert_eq!(
            next_target("").unwrap(),
            None,
            "an empty header has no links"
        );
        assert_eq!(
            next_target(r#" , </a>;rel=next ,, "#).unwrap().as_deref(),
            Some("/a"),
            "empty list elements and whitespace are allowed"
        );
        assert_eq!(
            next_target(r#"</a>; rel="next\"x""#).unwrap(),
            None,
            "escapes in quoted strings"
        );
        assert_eq!(
            parse(r#"</a>; rel="next\"x""#).unwrap()[0].param("rel"),
            Some("next\"x")
        );
    }

    #[test]
    fn malformed_headers_are_errors() {
        for bad in [
            "https://api.example.com/?page=2; rel=next",
            "<https://api.example.com/?page=2; rel=next",
            r#"<https://a/>; rel="next"#,
            r#"<https://a/> rel="next""#,
            r#"<https://a/>; ="next""#,
            r#"<https://a/>; rel="next" <https://b/>"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
            assert!(next_target(bad).is_err(), "{bad}");
        }
    }
}
