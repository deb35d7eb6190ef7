//! Pagination as a pure state machine: given the page just read, the URL of the next one.
//!
//! What the fetcher adds to the source's URL (whose own query parameters are kept):
//!
//! * `page`: `<limit_param>=<page_size>&<page_param>=<n>` from `first_page`; stops at
//!   `total_pages` when the API gives it, else at an empty or short page.
//! * `offset`: `<limit_param>=<page_size>&<offset_param>=<n>` from 0, advanced by the records
//!   read; stops at an empty or short page.
//! * `cursor`: `<limit_param>=<page_size>`, then `<cursor_param>=<token>` with the token read at
//!   `cursor_pointer`; stops when the token is absent, `null` or empty, or the page is empty.
//! * `link`: `<limit_param>=<page_size>` on the first request only; then the RFC 8288
//!   `Link: <url>; rel="next"` target exactly as the API wrote it (relative targets resolved
//!   against the page URL); stops when there is no `rel="next"`.
//!
//! Every style also sends the incremental parameters (`since_param`, `after_id_param`) on the
//! first request (and, except `link`, on every request).
//!
//! Never "end of data" by mistake: a `Link` header that is present but not RFC 8288, a
//! total-pages or cursor value of the wrong type, or a next page already read in this run
//! (`?_page=0` answered with the same `next` forever) is a [`PageError`] that fails the
//! source. A full page with no way to the next one ends the run but says so
//! ([`End::FullPageWithoutNext`]), so a misconfigured source is seen on its first run.

use std::collections::HashSet;

use crate::sources::Pagination;
use serde_json::Value;
use url::Url;

use crate::link;

/// What the pager needs to know about the page just read.
#[derive(Debug)]
pub struct PageInfo<'a> {
    pub url: &'a Url,
    pub body: &'a Value,
    /// The `Link` header, when there is one.
    pub link: Option<&'a str>,
    pub records: usize,
}

/// Where a run goes after a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Next(Url),
    End(End),
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source said this was the last page (short or empty page, total pages, no token).
    LastPage,
    /// The page was full, yet the source gave no way to the next one: either exactly the
    /// last page, or the pagination is not configured as the source pages.
    FullPageWithoutNext,
}

/// Why the next page cannot be known: the source fails, never "end of data".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("the Link header is present but is not valid RFC 8288: {0}")]
    BadLinkHeader(link::LinkError),
    #[error("the Link header's next target {target:?} is not a valid URL reference")]
    BadLinkTarget { target: String },
    #[error("the value at {pointer} is not {expected}: {found}")]
    BadValue {
        pointer: String,
        expected: &'static str,
        found: String,
    },
    /// The next page is one this run already read: the pagination does not advance.
    #[error("the next page was already read in this run: the source's pagination does not advance")]
    Loop { url: Url },
}

impl PageError {
    /// The URL the error is about, for the caller to show redacted.
    pub fn url(&self) -> Option<&Url> {
        match self {
            PageError::Loop { url } => Some(url),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    Page(u64),
    Offset(u64),
    Token(Option<String>),
    Link,
}

/// Walks the pages of one run.
#[derive(Debug, Clone)]
pub struct Pager {
    pagination: Pagination,
    base: Url,
    /// Parameters on every request of the run (incremental and page size).
    fixed: Vec<(String, String)>,
    page_size: u32,
    position: Position,
    /// Every page URL requested in this run.
    visited: HashSet<Url>,
}

impl Pager {
    /// `base` is the source URL; `fixed` the parameters every request carries (`since`,
    /// `after_id`); `start_token` resumes a cursor-paginated source.
    pub fn new(
        pagination: Pagination,
        base: Url,
        mut fixed: Vec<(String, String)>,
        page_size: u32,
        start_token: Option<String>,
    ) -> Self {
        let limit_param = match &pagination {
            Pagination::Page { limit_param, .. }
            | Pagination::Offset { limit_param, .. }
            | Pagination::Cursor { limit_param, .. }
            | Pagination::Link { limit_param } => limit_param.clone(),
        };
        fixed.push((limit_param, page_size.to_string()));
        let position = match &pagination {
            Pagination::Page { first_page, .. } => Position::Page(*first_page),
            Pagination::Offset { .. } => Position::Offset(0),
            Pagination::Cursor { .. } => Position::Token(start_token),
            Pagination::Link { .. } => Position::Link,
        };
        Self {
            pagination,
            base,
            fixed,
            page_size,
            position,
            visited: HashSet::new(),
        }
    }

    /// The URL of the first page.
    pub fn first(&mut self) -> Url {
        let url = self.url_for(&self.position);
        self.visited.insert(url.clone());
        url
    }

    /// The token the current page was fetched with (cursor pagination).
    pub fn current_token(&self) -> Option<&str> {
        match &self.position {
            Position::Token(t) => t.as_deref(),
            _ => None,
        }
    }

    fn url_for(&self, position: &Position) -> Url {
        let mut url = self.base.clone();
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &self.fixed {
                q.append_pair(k, v);
            }
            match (&self.pagination, position) {
                (Pagination::Page { page_param, .. }, Position::Page(n)) => {
                    q.append_pair(page_param, &n.to_string());
                }
                (Pagination::Offset { offset_param, .. }, Position::Offset(n)) => {
                    q.append_pair(offset_param, &n.to_string());
                }
                (Pagination::Cursor { cursor_param, .. }, Position::Token(Some(t))) => {
                    q.append_pair(cursor_param, t);
                }
                _ => {}
            }
        }
        url
    }

    /// Where to go after `page`.
    pub fn next(&mut self, page: &PageInfo<'_>) -> Result<Step, PageError> {
        let full = page.records >= self.page_size as usize;
        let short = !full;
        let (next, url) = match (&self.pagination, &self.position) {
            (
                Pagination::Page {
                    total_pages_pointer,
                    first_page,
                    ..
                },
                Position::Page(n),
            ) => {
                if page.records == 0 {
                    return Ok(Step::End(End::LastPage));
                }
                let total = match total_pages_pointer.as_deref() {
                    None => None,
                    Some(p) => match page.body.pointer(p) {
                        None | Some(Value::Null) => None,
                        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
                        Some(Value::String(s)) if s.trim().parse::<u64>().is_ok() => {
                            s.trim().parse::<u64>().ok()
                        }
                        Some(other) => {
                            return Err(PageError::BadValue {
                                pointer: p.to_string(),
                                expected: "a whole number of pages",
                                found: shorten(other),
                            });
                        }
                    },
                };
                match total {
                    Some(total) if n + 1 - first_page >= total => {
                        return Ok(Step::End(End::LastPage));
                    }
                    Some(_) => {}
                    None if short => return Ok(Step::End(End::LastPage)),
                    None => {}
                }
                let next = Position::Page(n + 1);
                let url = self.url_for(&next);
                (next, url)
            }
            (Pagination::Offset { .. }, Position::Offset(n)) => {
                if page.records == 0 || short {
                    return Ok(Step::End(End::LastPage));
                }
                let next = Position::Offset(n + page.records as u64);
                let url = self.url_for(&next);
                (next, url)
            }
            (Pagination::Cursor { cursor_pointer, .. }, Position::Token(_)) => {
                if page.records == 0 {
                    return Ok(Step::End(End::LastPage));
                }
                let token = match page.body.pointer(cursor_pointer) {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    // The API says there is no next page.
                    Some(Value::Null | Value::String(_)) => return Ok(Step::End(End::LastPage)),
                    // Nothing where the token should be: maybe the last page, maybe the
                    // wrong `cursor_pointer`.
                    None => return Ok(end_of(full)),
                    Some(other) => {
                        return Err(PageError::BadValue {
                            pointer: cursor_pointer.clone(),
                            expected: "a string or number token",
                            found: shorten(other),
                        });
                    }
                };
                let next = Position::Token(Some(token));
                let url = self.url_for(&next);
                (next, url)
            }
            (Pagination::Link { .. }, Position::Link) => {
                let Some(header) = page.link else {
                    // No Link header at all: maybe the last page, maybe a source that needs a
                    // parameter to paginate (json-server without `_page`).
                    return Ok(end_of(full));
                };
                let links = link::parse(header).map_err(PageError::BadLinkHeader)?;
                let Some(target) = links
                    .into_iter()
                    .find(|l| l.has_rel("next"))
                    .map(|l| l.target)
                else {
                    // The source paginates with links and gave none to a next page: the last.
                    return Ok(Step::End(End::LastPage));
                };
                let url = page
                    .url
                    .join(&target)
                    .map_err(|_| PageError::BadLinkTarget { target })?;
                (Position::Link, url)
            }
            _ => return Ok(Step::End(End::LastPage)),
        };
        if !self.visited.insert(url.clone()) {
            return Err(PageError::Loop { url });
        }
        self.position = next;
        Ok(Step::Next(url))
    }
}

fn end_of(full: bool) -> Step {
    Step::End(if full {
        End::FullPageWithoutNext
    } else {
        End::LastPage
    })
}

fn shorten(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Url {
        Url::parse("https://api.example.com/v2/quotes").unwrap()
    }

    fn since() -> Vec<(String, String)> {
        vec![("since".into(), "2026-11-01T00:00:00Z".into())]
    }

    fn after(
        p: &mut Pager,
        url: &Url,
        body: &Value,
        link: Option<&str>,
        records: usize,
    ) -> Result<Step, PageError> {
        p.next(&PageInfo {
            url,
            body,
            link,
            records,
        })
    }

    fn next_url(step: Result<Step, PageError>) -> Url {
        match step {
            Ok(Step::Next(u)) => u,
            other => panic!("expected a next page, got {other:?}"),
        }
    }

    const LAST: Result<Step, PageError> = Ok(Step::End(End::LastPage));
    const FULL: Result<Step, PageError> = Ok(Step::End(End::FullPageWithoutNext));

    #[test]
    fn page_numbers_stop_at_total_pages() {
        let mut p = Pager::new(Pagination::default(), base(), since(), 2, None);
        let first = p.first();
        assert_eq!(
            first.as_str(),
            "https://api.example.com/v2/quotes?since=2026-11-01T00%3A00%3A00Z&limit=2&page=1"
        );
        let body = json!({"data": [{}, {}], "pagination": {"total_pages": 2}});
        let second = next_url(after(&mut p, &first, &body, None, 2));
        assert!(second.as_str().ends_with("limit=2&page=2"), "{second}");
        assert_eq!(after(&mut p, &second, &body, None, 2), LAST);
        let as_text = json!({"pagination": {"total_pages": "3"}});
        let mut p = Pager::new(Pagination::default(), base(), vec![], 2, None);
        let u = p.first();
        next_url(after(&mut p, &u, &as_text, None, 2));
    }

    #[test]
    fn a_total_pages_of_the_wrong_type_is_an_error() {
        let mut p = Pager::new(Pagination::default(), base(), vec![], 2, None);
        let u = p.first();
        let body = json!({"pagination": {"total_pages": {"n": 3}}});
        assert!(matches!(
            after(&mut p, &u, &body, None, 2),
            Err(PageError::BadValue { .. })
        ));
    }

    #[test]
    fn page_numbers_without_total_stop_at_a_short_or_empty_page() {
        let pagination = Pagination::Page {
            page_param: "p".into(),
            limit_param: "n".into(),
            total_pages_pointer: None,
            first_page: 0,
        };
        let mut p = Pager::new(pagination.clone(), base(), vec![], 3, None);
        let u = p.first();
        assert!(u.as_str().ends_with("?n=3&p=0"), "{u}");
        let body = json!({});
        let u2 = next_url(after(&mut p, &u, &body, None, 3));
        assert!(u2.as_str().ends_with("p=1"));
        assert_eq!(after(&mut p, &u2, &body, None, 2), LAST);
        let mut p = Pager::new(pagination, base(), vec![], 3, None);
        let u = p.first();
        assert_eq!(after(&mut p, &u, &body, None, 0), LAST);
    }

    #[test]
    fn total_pages_wins_over_a_short_page() {
        let mut p = Pager::new(Pagination::default(), base(), vec![], 100, None);
        let u = p.first();
        let body = json!({"pagination": {"total_pages": 3}});
        next_url(after(&mut p, &u, &body, None, 50));
    }

    #[test]
    fn offsets_advance_by_records_read() {
        let pagination = Pagination::Offset {
            offset_param: "offset".into(),
            limit_param: "limit".into(),
        };
        let mut p = Pager::new(pagination, base(), vec![], 2, None);
        let u = p.first();
        assert!(u.as_str().ends_with("limit=2&offset=0"));
        let body = json!({});
        let u = next_url(after(&mut p, &u, &body, None, 2));
        assert!(u.as_str().ends_with("limit=2&offset=2"), "{u}");
        assert_eq!(after(&mut p, &u, &body, None, 1), LAST);
    }

    fn cursor_pagination() -> Pagination {
        Pagination::Cursor {
            cursor_pointer: "/meta/next".into(),
            cursor_param: "cursor".into(),
            limit_param: "limit".into(),
        }
    }

    #[test]
    fn cursor_tokens_come_from_the_body() {
        let mut p = Pager::new(cursor_pagination(), base(), vec![], 2, None);
        let u = p.first();
        assert!(!u.as_str().contains("cursor="));
        let body = json!({"meta": {"next": "abc=="}});
        let u2 = next_url(after(&mut p, &u, &body, None, 2));
        assert!(u2.as_str().ends_with("limit=2&cursor=abc%3D%3D"), "{u2}");
        assert_eq!(p.current_token(), Some("abc=="));
        let end = json!({"meta": {"next": null}});
        assert_eq!(
            after(&mut p, &u2, &end, None, 2),
            LAST,
            "null: no next page"
        );
        let mut p = Pager::new(cursor_pagination(), base(), vec![], 2, Some("t0".into()));
        assert!(p.first().as_str().ends_with("cursor=t0"));
        assert_eq!(
            after(&mut p, &u, &json!({"meta": {}}), None, 2),
            FULL,
            "a full page with nothing at cursor_pointer is reported"
        );
        assert_eq!(after(&mut p, &u, &json!({}), None, 1), LAST);
        let mut p = Pager::new(cursor_pagination(), base(), vec![], 2, None);
        let u = p.first();
        assert!(matches!(
            after(&mut p, &u, &json!({"meta": {"next": ["x"]}}), None, 2),
            Err(PageError::BadValue { .. })
        ));
    }

    #[test]
    fn a_repeated_cursor_token_is_a_loop_not_the_end() {
        let mut p = Pager::new(cursor_pagination(), base(), vec![], 2, None);
        let u = p.first();
        let body = json!({"meta": {"next": "abc"}});
        let u2 = next_url(after(&mut p, &u, &body, None, 2));
        match after(&mut p, &u2, &body, None, 2) {
            Err(PageError::Loop { url }) => assert_eq!(url, u2),
            other => panic!("{other:?}"),
        }
    }

    fn link_pager(size: u32) -> Pager {
        Pager::new(
            Pagination::Link {
                limit_param: "per_page".into(),
            },
            base(),
            since(),
            size,
            None,
        )
    }

    #[test]
    fn link_headers_resolve_relative_urls() {
        let mut p = link_pager(50);
        let u = p.first();
        assert_eq!(
            u.as_str(),
            "https://api.example.com/v2/quotes?since=2026-11-01T00%3A00%3A00Z&per_page=50"
        );
        let body = json!([]);
        let link = r#"<https://api.example.com/v2/quotes?page=1>; rel="prev", </v2/quotes?page=3&per_page=50>; rel="next""#;
        let next = next_url(after(&mut p, &u, &body, Some(link), 50));
        assert_eq!(
            next.as_str(),
            "https://api.example.com/v2/quotes?page=3&per_page=50"
        );
        let last = r#"<https://api.example.com/v2/quotes?page=1>; rel="first""#;
        assert_eq!(after(&mut p, &next, &body, Some(last), 10), LAST);
        assert_eq!(after(&mut p, &next, &body, None, 10), LAST);
    }

    #[test]
    fn a_comma_inside_a_link_target_keeps_the_run_going() {
        let mut p = link_pager(10);
        let u = p.first();
        let link = r#"<http://localhost:3000/events?_sort=updated_at,id&_page=1&_limit=10>; rel="first", <http://localhost:3000/events?_sort=updated_at,id&_page=2&_limit=10>; rel="next", <http://localhost:3000/events?_sort=updated_at,id&_page=50&_limit=10>; rel="last""#;
        let next = next_url(after(&mut p, &u, &json!([]), Some(link), 10));
        assert_eq!(
            next.as_str(),
            "http://localhost:3000/events?_sort=updated_at,id&_page=2&_limit=10"
        );
    }

    #[test]
    fn an_unparseable_link_header_is_an_error_not_the_last_page() {
        let mut p = link_pager(10);
        let u = p.first();
        let r = after(
            &mut p,
            &u,
            &json!([]),
            Some(r#"<http://x/?page=2; rel="next""#),
            10,
        );
        assert!(matches!(r, Err(PageError::BadLinkHeader(_))), "{r:?}");
    }

    #[test]
    fn a_next_link_already_visited_is_a_loop() {
        let mut p = link_pager(10);
        let u = p.first();
        let link = r#"<http://localhost:3000/events?_page=1&_limit=10>; rel="next""#;
        let second = next_url(after(&mut p, &u, &json!([]), Some(link), 10));
        match after(&mut p, &second, &json!([]), Some(link), 10) {
            Err(PageError::Loop { url }) => assert_eq!(url, second),
            other => panic!("{other:?}"),
        }
        let mut p = link_pager(10);
        let u = p.first();
        let to_self = format!("<{u}>; rel=\"next\"");
        assert!(matches!(
            after(&mut p, &u, &json!([]), Some(&to_self), 10),
            Err(PageError::Loop { .. })
        ));
    }

    #[test]
    fn a_full_page_without_a_next_link_is_reported() {
        let mut p = link_pager(10);
        let u = p.first();
        assert_eq!(after(&mut p, &u, &json!([]), None, 10), FULL);
        assert_eq!(
            after(&mut p, &u, &json!([]), Some(r#"</a>; rel="prev""#), 10),
            LAST,
            "a source that sends links and no next one is on its last page"
        );
        assert_eq!(after(&mut p, &u, &json!([]), None, 9), LAST);
    }
}
