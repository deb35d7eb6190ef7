//! Pagination as a pure state machine: given the page just read, the URL of the next one.
//!
//! * `page`: `?page=<n>&limit=<size>`; stops at `total_pages` when the API gives it, else at
//!   an empty or short page.
//! * `offset`: `?offset=<n>&limit=<size>`; stops at an empty or short page.
//! * `cursor`: the token at a JSON pointer, sent back as a parameter; stops when it is absent,
//!   empty, repeated, or the page is empty.
//! * `link`: RFC 8288 `Link: <url>; rel="next"`, relative links resolved against the page URL.

use serde_json::Value;
use tardis_common::config::Pagination;
use url::Url;

/// What the pager needs to know about the page just read.
#[derive(Debug)]
pub struct PageInfo<'a> {
    pub url: &'a Url,
    pub body: &'a Value,
    /// The `Link` header, when there is one.
    pub link: Option<&'a str>,
    pub records: usize,
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
        }
    }

    /// The URL of the first page.
    pub fn first(&self) -> Url {
        self.url_for(&self.position)
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

    /// The next page's URL after `page`, or `None` when the run has read everything.
    pub fn next(&mut self, page: &PageInfo<'_>) -> Option<Url> {
        let short = page.records < self.page_size as usize;
        let next = match (&self.pagination, &self.position) {
            (
                Pagination::Page {
                    total_pages_pointer,
                    first_page,
                    ..
                },
                Position::Page(n),
            ) => {
                if page.records == 0 {
                    return None;
                }
                let total = total_pages_pointer
                    .as_deref()
                    .and_then(|p| page.body.pointer(p))
                    .and_then(Value::as_u64);
                match total {
                    Some(total) if n + 1 - first_page >= total => return None,
                    Some(_) => {}
                    None if short => return None,
                    None => {}
                }
                Position::Page(n + 1)
            }
            (Pagination::Offset { .. }, Position::Offset(n)) => {
                if page.records == 0 || short {
                    return None;
                }
                Position::Offset(n + page.records as u64)
            }
            (Pagination::Cursor { cursor_pointer, .. }, Position::Token(current)) => {
                if page.records == 0 {
                    return None;
                }
                let token = match page.body.pointer(cursor_pointer) {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => return None,
                };
                if current.as_deref() == Some(token.as_str()) {
                    return None;
                }
                Position::Token(Some(token))
            }
            (Pagination::Link { .. }, Position::Link) => {
                let next = next_link(page.link?)?;
                return page.url.join(&next).ok();
            }
            _ => return None,
        };
        let url = self.url_for(&next);
        self.position = next;
        Some(url)
    }
}

/// The `rel="next"` target of a `Link` header value.
pub fn next_link(header: &str) -> Option<String> {
    let links = parse_link_header::parse_with_rel(header).ok()?;
    links.get("next").map(|l| l.raw_uri.clone())
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

    #[test]
    fn page_numbers_stop_at_total_pages() {
        let mut p = Pager::new(Pagination::default(), base(), since(), 2, None);
        let first = p.first();
        assert_eq!(
            first.as_str(),
            "https://api.example.com/v2/quotes?since=2026-11-01T00%3A00%3A00Z&limit=2&page=1"
        );
        let body = json!({"data": [{}, {}], "pagination": {"total_pages": 2}});
        let second = p
            .next(&PageInfo {
                url: &first,
                body: &body,
                link: None,
                records: 2,
            })
            .unwrap();
        assert!(second.as_str().ends_with("limit=2&page=2"), "{second}");
        assert_eq!(
            p.next(&PageInfo {
                url: &second,
                body: &body,
                link: None,
                records: 2
            }),
            None
        );
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
        let u2 = p
            .next(&PageInfo {
                url: &u,
                body: &body,
                link: None,
                records: 3,
            })
            .unwrap();
        assert!(u2.as_str().ends_with("p=1"));
        assert_eq!(
            p.next(&PageInfo {
                url: &u2,
                body: &body,
                link: None,
                records: 2
            }),
            None
        );
        let mut p = Pager::new(pagination, base(), vec![], 3, None);
        let u = p.first();
        assert_eq!(
            p.next(&PageInfo {
                url: &u,
                body: &body,
                link: None,
                records: 0
            }),
            None
        );
    }

    #[test]
    fn total_pages_wins_over_a_short_page() {
        let mut p = Pager::new(Pagination::default(), base(), vec![], 100, None);
        let u = p.first();
        let body = json!({"pagination": {"total_pages": 3}});
        assert!(
            p.next(&PageInfo {
                url: &u,
                body: &body,
                link: None,
                records: 50
            })
            .is_some(),
            "the API capped the page size"
        );
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
        let u = p
            .next(&PageInfo {
                url: &u,
                body: &body,
                link: None,
                records: 2,
            })
            .unwrap();
        assert!(u.as_str().ends_with("limit=2&offset=2"), "{u}");
        assert_eq!(
            p.next(&PageInfo {
                url: &u,
                body: &body,
                link: None,
                records: 1
            }),
            None
        );
    }

    #[test]
    fn cursor_tokens_come_from_the_body() {
        let pagination = Pagination::Cursor {
            cursor_pointer: "/meta/next".into(),
            cursor_param: "cursor".into(),
            limit_param: "limit".into(),
        };
        let mut p = Pager::new(pagination, base(), vec![], 2, None);
        let u = p.first();
        assert!(!u.as_str().contains("cursor="));
        let body = json!({"meta": {"next": "abc=="}});
        let u2 = p
            .next(&PageInfo {
                url: &u,
                body: &body,
                link: None,
                records: 2,
            })
            .unwrap();
        assert!(u2.as_str().ends_with("limit=2&cursor=abc%3D%3D"), "{u2}");
        assert_eq!(p.current_token(), Some("abc=="));
        assert_eq!(
            p.next(&PageInfo {
                url: &u2,
                body: &body,
                link: None,
                records: 2
            }),
            None,
            "a repeated token ends the run"
        );
        let end = json!({"meta": {"next": null}});
        let mut p = Pager::new(
            Pagination::Cursor {
                cursor_pointer: "/meta/next".into(),
                cursor_param: "c".into(),
                limit_param: "l".into(),
            },
            base(),
            vec![],
            2,
            Some("t0".into()),
        );
        assert!(p.first().as_str().ends_with("c=t0"));
        assert_eq!(
            p.next(&PageInfo {
                url: &u,
                body: &end,
                link: None,
                records: 2
            }),
            None
        );
    }

    #[test]
    fn link_headers_resolve_relative_urls() {
        let mut p = Pager::new(
            Pagination::Link {
                limit_param: "per_page".into(),
            },
            base(),
            since(),
            50,
            None,
        );
        let u = p.first();
        let body = json!([]);
        let link = r#"<https://api.example.com/v2/quotes?page=1>; rel="prev", </v2/quotes?page=3&per_page=50>; rel="next""#;
        let next = p
            .next(&PageInfo {
                url: &u,
                body: &body,
                link: Some(link),
                records: 50,
            })
            .unwrap();
        assert_eq!(
            next.as_str(),
            "https://api.example.com/v2/quotes?page=3&per_page=50"
        );
        let last = r#"<https://api.example.com/v2/quotes?page=1>; rel="first""#;
        assert_eq!(
            p.next(&PageInfo {
                url: &next,
                body: &body,
                link: Some(last),
                records: 50
            }),
            None
        );
        assert_eq!(
            p.next(&PageInfo {
                url: &next,
                body: &body,
                link: None,
                records: 50
            }),
            None
        );
    }
}
