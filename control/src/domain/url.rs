//! The http(s) URLs evstor itself fetches (an IdP's issuer, its JWKS, a proxy): parsed here,
//! without I/O, so `decide` can judge a configuration and the fetcher can use it as judged.

use std::net::IpAddr;

use crate::limits::URL_BYTES_MAX;

/// An absolute `http://` or `https://` URL: no user info, no fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub https: bool,
    /// A DNS name or an IP address (IPv6 without its brackets).
    pub host: String,
    pub port: u16,
    /// The path and query, `/` at least.
    pub path: String,
}

impl HttpUrl {
    /// Parses `text`; the error says what is wrong in user terms.
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        if text.len() > URL_BYTES_MAX {
            return Err(format!("longer than {URL_BYTES_MAX} bytes"));
        }
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("holds a space or a control character".into());
        }
        let (https, rest) = split_scheme(text)?;
        if rest.contains('#') {
            return Err("has a fragment (#)".into());
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err("has user info (user@host); give credentials separately".into());
        }
        let (host, port) = split_authority(authority)?;
        let port = match port {
            Some(p) => p,
            None if https => 443,
            None => 80,
        };
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        Ok(HttpUrl {
            https,
            host,
            port,
            path,
        })
    }

    /// Whether the host is this machine's loopback (where plain http cannot be intercepted
    /// on the way).
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// `host:port` as a `Host` header or a CONNECT target names it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL with `suffix` appended to its path (`/` between them exactly once).
    pub fn join(&self, suffix: &str) -> HttpUrl {
        let mut out = self.clone();
        out.path = format!(
            "{}/{}",
            self.path.trim_end_matches('/'),
            suffix.trim_start_matches('/')
        );
        out
    }
}

fn split_scheme(text: &str) -> Result<(bool, &str), String> {
    let (scheme, rest) = text
        .split_once("://")
        .ok_or("is not an absolute URL (http:// or https://)")?;
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok((true, rest)),
        "http" => Ok((false, rest)),
        other => Err(format!(
            "has scheme {other:?}; only http and https are fetched"
        )),
    }
}

fn split_authority(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("has an unclosed [IPv6] host")?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("has an invalid IPv6 host [{host}]"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("has junk after its [IPv6] host")?,
            ),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let host_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':');
    if host.is_empty() || !host.chars().all(host_ok) {
        return Err(format!("has an invalid host {host:?}"));
    }
    let port = port
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("has an invalid port {p:?}")),
        })
        .transpose()?;
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_paths() {
        let u = HttpUrl::parse("https://idp.example.com/realms/x").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "idp.example.com", 443, "/realms/x")
        );
        let u = HttpUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8080, "/"));
        assert!(u.is_loopback());
        let u = HttpUrl::parse("HTTP://[::1]:9000?a=b").unwrap();
        assert_eq!((u.host.as_str(), u.path.as_str()), ("::1", "/?a=b"));
        assert_eq!(u.authority(), "[::1]:9000");
        assert!(u.is_loopback());
        assert!(!HttpUrl::parse("http://10.0.0.1/").unwrap().is_loopback());
        assert_eq!(
            HttpUrl::parse("https://h/adfs/")
                .unwrap()
                .join("/.well-known/openid-configuration")
                .path,
            "/adfs/.well-known/openid-configuration"
        );
    }

    #[test]
    fn what_is_not_fetched_is_refused() {
        for bad in [
            "ftp://h/",
            "h/path",
            "https://user:pw@h/",
            "https://h/#frag",
            "https://h:0/",
            "https://h:99999/",
            "https:///x",
            "https://[::1/",
            "https://h h/",
            "https://h_h/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(HttpUrl::parse(&format!("https://h/{}", "a".repeat(URL_BYTES_MAX))).is_err());
    }
}
