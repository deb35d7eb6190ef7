//! The container health probe (`tardis-probe`): the images have no shell and no curl, so their
//! `HEALTHCHECK` runs this. One blocking HTTP/1.0 `GET` with a deadline; healthy means a 2xx.
//!
//! The target is the URL given on the command line, or `/ready` on the port of `OPS_ADDR`
//! (read with the same rules as the workers, so a moved ops port moves the probe with it).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use url::Url;

use crate::config::{Env, Reader};
use crate::ops::OpsSettings;

/// Where to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    /// From an `http://host:port/path` URL.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let parsed = Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!("{url}: only http:// is supported"));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("{url}: no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let mut path = parsed.path().to_string();
        if let Some(query) = parsed.query() {
            path = format!("{path}?{query}");
        }
        Ok(Self {
            host,
            port: parsed.port_or_known_default().unwrap_or(80),
            path,
        })
    }

    /// `/ready` on the worker's own ops port (`OPS_ADDR`); a wildcard address probes loopback.
    pub fn from_env(env: &dyn Env) -> Result<Self, String> {
        let mut r = Reader::new(env);
        let ops = OpsSettings::read(&mut r);
        r.finish().map_err(|e| e.to_string())?;
        let ip = match ops.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Ok(Self {
            host: ip.to_string(),
            port: ops.addr.port(),
            path: "/ready".into(),
        })
    }

    /// Sends the request and returns the status code; `Err` when nothing usable came back
    /// within `timeout` (for the connection, and again for the answer).
    pub fn check(&self, timeout: Duration) -> Result<u16, String> {
        let addr: SocketAddr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("{}:{}: {e}", self.host, self.port))?
            .next()
            .ok_or_else(|| format!("{}:{}: no address", self.host, self.port))?;
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| format!("{addr}: {e}"))?;
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            stream,
            "GET {} HTTP/1.0\r\nHost: {host}:{}\r\nUser-Agent: tardis-probe\r\n\r\n",
            self.path, self.port
        )
        .map_err(|e| format!("sending to {addr}: {e}"))?;
        // The status line is all we need; read at most a little more than it.
        let mut head = [0u8; 64];
        let mut len = 0;
        while len < head.len() {
            match stream.read(&mut head[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) => return Err(format!("reading from {addr}: {e}")),
            }
            if head[..len].contains(&b'\n') {
                break;
            }
        }
        status_code(&head[..len]).ok_or_else(|| format!("{addr}: not an HTTP answer"))
    }
}

/// The status code of an HTTP/1.x status line.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn urls_give_host_port_and_path() {
        assert_eq!(
            Target::from_url("http://127.0.0.1:8081/health").unwrap(),
            Target {
                host: "127.0.0.1".into(),
                port: 8081,
                path: "/health".into()
            }
        );
        let t = Target::from_url("http://[::1]/ready?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 80, "/ready?x=1")
        );
        assert!(Target::from_url("https://example.com/").is_err());
        assert!(Target::from_url("not a url").is_err());
    }

    #[test]
    fn the_default_target_is_ready_on_the_ops_port_over_loopback() {
        let env = BTreeMap::new();
        assert_eq!(
            Target::from_env(&env).unwrap(),
            Target {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/ready".into()
            }
        );
        let env = BTreeMap::from([("OPS_ADDR".to_string(), "[::]:9000".to_string())]);
        let t = Target::from_env(&env).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        let env = BTreeMap::from([("OPS_ADDR".to_string(), "nonsense".to_string())]);
        assert!(Target::from_env(&env).unwrap_err().contains("OPS_ADDR"));
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status_code(b"HTTP/1.1 200 OK\r\ncontent-length: 3"),
            Some(200)
        );
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }
}
