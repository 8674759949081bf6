//! `allowed_hosts`: the hosts a task may reach over HTTP, and the checks the runner makes
//! before every connection (every redirect hop included).
//!
//! A rule is `*` (any public host), a name (`api.example.com`), a wildcard for subdomains
//! (`*.example.com`), or an IP address; any of them may end with `:port`. Addresses in special
//! ranges (loopback, private networks, link-local such as 169.254.169.254, ...) are refused
//! unless a rule names that address itself, or the request is for `localhost` and `localhost`
//! is listed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::problem::Problem;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Subdomains(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    pattern: Pattern,
    port: Option<u16>,
    text: String,
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn normalise(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl HostRule {
    pub fn parse(text: &str) -> Result<Self, Problem> {
        let invalid = |why: &str| {
            Problem {
            message: format!("`{text}` is not a host rule: {why}"),
            hint: Some(
                "write \"api.example.com\", \"*.example.com\", \"api.example.com:8443\", \"10.0.0.7\", \"[::1]:8080\" or \"*\"".into(),
            ),
        }
        };
        let trimmed = text.trim();
        if trimmed.contains("://") || trimmed.contains('/') {
            return Err(invalid("give the host only, without a scheme or path"));
        }
        let (host, port) = split_port(trimmed).map_err(|why| invalid(&why))?;
        let pattern = if host == "*" {
            Pattern::Any
        } else if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Pattern::Address(ip)
        } else if let Some(domain) = host.strip_prefix("*.") {
            check_name(domain).map_err(|why| invalid(&why))?;
            Pattern::Subdomains(format!(".{}", normalise(domain)))
        } else {
            check_name(host).map_err(|why| invalid(&why))?;
            Pattern::Exact(normalise(host))
        };
        Ok(Self { pattern, port, text: trimmed.to_string() })
    }

    fn matches_name(&self, host: &str, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && self.matches_host(host)
    }

    fn matches_host(&self, host: &str) -> bool {
        let host = normalise(host);
        match &self.pattern {
            Pattern::Any => true,
            Pattern::Exact(name) => *name == host,
            Pattern::Subdomains(suffix) => host.ends_with(suffix.as_str()),
            Pattern::Address(ip) => parse_ip(&host) == Some(*ip),
        }
    }
}

fn parse_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

fn split_port(text: &str) -> Result<(&str, Option<u16>), String> {
    // `[::1]:8080`, `::1` (no port: several colons), `host:8080`, `host`.
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("an opening `[` without `]`")?;
        (inside, after.strip_prefix(':'))
    } else if text.matches(':').count() == 1 {
        let (host, port) = text.split_once(':').expect("one colon");
        (host, Some(port))
    } else {
        (text, None)
    };
    let port = match port {
        Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p != 0).ok_or(format!("`{port}` is not a port"))?),
        None => None,
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    Ok((host, port))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        });
    if ok { Ok(()) } else { Err(format!("`{name}` is not a valid host name")) }
}

/// The special range an address is in, if any: such addresses need an explicit rule.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "unspecified (0.0.0.0/8)",
        (10, ..) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (127, ..) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, ..) => "multicast (224.0.0.0/4)",
        (240..=255, ..) => "reserved (240.0.0.0/4)",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return special_v4(v4).or(Some("IPv4-mapped (::ffff:0:0/96)"));
    }
    let first = ip.segments()[0];
    Some(match () {
        _ if ip.is_loopback() => "loopback (::1)",
        _ if ip.is_unspecified() => "unspecified (::)",
        _ if first & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        _ if first & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        _ if first & 0xff00 == 0xff00 => "multicast (ff00::/8)",
        _ if first == 0x2001 && ip.segments()[1] == 0x0db8 => "documentation (2001:db8::/32)",
        _ if ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => "NAT64 (64:ff9b::/96)",
        _ if first == 0x0100 && ip.segments()[1..4] == [0, 0, 0] => "discard (100::/64)",
        _ => return None,
    })
}

/// A task's rules. In the manifest, the list of rules as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    rules: Vec<HostRule>,
}

impl HostPolicy {
    pub fn parse(rules: &[String]) -> Result<Self, Problem> {
        Ok(Self { rules: rules.iter().map(|r| HostRule::parse(r)).collect::<Result<_, _>>()? })
    }

    pub fn from_rules(rules: Vec<HostRule>) -> Self {
        Self { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules as written.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.text.as_str())
    }

    fn listed(&self) -> String {
        self.rules.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ")
    }

    /// May `host` (a name or an address) on `port` be contacted at all? Checked before
    /// resolving, for the first request and every redirect.
    pub fn check_host(&self, host: &str, port: u16) -> Result<(), String> {
        if self.rules.is_empty() {
            return Err("this task has no `allowed_hosts`, so it may not make HTTP requests".into());
        }
        if !self.rules.iter().any(|r| r.matches_name(host, port)) {
            return Err(format!("`{host}:{port}` is not in this task's `allowed_hosts` ({})", self.listed()));
        }
        if let Some(ip) = parse_ip(host) {
            return self.check_address(host, port, ip);
        }
        Ok(())
    }

    /// Is a request to `scheme://host:port` one of a secret's (whose hosts these rules are)?
    /// `Ok(false)` for another host; refused for one of its hosts over plain HTTP or on
    /// another port than the rule names (443 when it names none), where the credential would
    /// travel in clear or to another service.
    pub fn secret_goes_to(&self, scheme: &str, host: &str, port: u16) -> Result<bool, String> {
        let matching: Vec<&HostRule> = self.rules.iter().filter(|r| r.matches_host(host)).collect();
        if matching.is_empty() {
            return Ok(false);
        }
        if scheme != "https" {
            return Err(format!("a secret for `{host}` goes over HTTPS only, not `{scheme}://`"));
        }
        if matching.iter().any(|r| r.port.unwrap_or(443) == port) {
            return Ok(true);
        }
        let expected: Vec<String> = matching.iter().map(|r| r.port.unwrap_or(443).to_string()).collect();
        Err(format!("a secret for `{host}` goes to port {} only, not {port}", expected.join(" or ")))
    }

    /// May the address `ip`, which `host` resolved to, be connected to on `port`?
    pub fn check_address(&self, host: &str, port: u16, ip: IpAddr) -> Result<(), String> {
        let Some(range) = special_range(ip) else { return Ok(()) };
        let named_address = self
            .rules
            .iter()
            .any(|r| matches!(r.pattern, Pattern::Address(a) if a == ip) && r.matches_name(&ip.to_string(), port));
        let local_name = normalise(host) == "localhost"
            && ip.is_loopback()
            && self.rules.iter().any(|r| r.pattern == Pattern::Exact("localhost".into()) && r.matches_name(host, port));
        if named_address || local_name {
            return Ok(());
        }
        Err(format!(
            "`{host}` resolves to {ip}, a {range} address, which is refused unless `allowed_hosts` lists \"{ip}\"{}",
            if ip.is_loopback() { " or \"localhost\"" } else { "" }
        ))
    }
}

impl serde::Serialize for HostPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.texts())
    }
}

impl<'de> serde::Deserialize<'de> for HostPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let rules = Vec::<String>::deserialize(deserializer)?;
        Self::parse(&rules).map_err(|e| serde::de::Error::custom(e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str]) -> HostPolicy {
        HostPolicy::parse(&rules.iter().map(|r| r.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn parses_rules_and_refuses_bad_ones() {
        for ok in [
            "*",
            "api.example.com",
            "*.example.com",
            "api.example.com:8443",
            "10.0.0.7",
            "::1",
            "[::1]:8080",
            "localhost",
        ] {
            assert!(HostRule::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["https://example.com", "example.com/path", "exa mple.com", "host:99999", "host:0", "*.", "[::1"] {
            assert!(HostRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matches_names_wildcards_and_ports() {
        let p = policy(&["api.example.com", "*.example.org", "static.example.net:8443"]);
        assert!(p.check_host("api.example.com", 443).is_ok());
        assert!(p.check_host("API.Example.com.", 443).is_ok());
        assert!(p.check_host("a.b.example.org", 80).is_ok());
        assert!(p.check_host("example.org", 80).is_err(), "a wildcard is for subdomains only");
        assert!(p.check_host("static.example.net", 8443).is_ok());
        assert!(p.check_host("static.example.net", 443).is_err());
        let refused = p.check_host("evil.com", 443).unwrap_err();
        assert!(refused.contains("not in this task's `allowed_hosts`"), "{refused}");
        assert!(policy(&[]).check_host("example.com", 443).unwrap_err().contains("no `allowed_hosts`"));
    }

    #[test]
    fn secrets_go_over_https_to_the_rules_port_only() {
        let p = policy(&["api.example.com", "vault.example.com:8200"]);
        assert_eq!(p.secret_goes_to("https", "api.example.com", 443), Ok(true));
        assert_eq!(p.secret_goes_to("https", "other.example.com", 443), Ok(false));
        assert!(p.secret_goes_to("http", "api.example.com", 80).unwrap_err().contains("HTTPS only"));
        assert!(p.secret_goes_to("https", "api.example.com", 8443).unwrap_err().contains("port 443 only"));
        assert_eq!(p.secret_goes_to("https", "vault.example.com", 8200), Ok(true));
        assert!(p.secret_goes_to("http", "vault.example.com", 8200).is_err());
    }

    #[test]
    fn special_addresses_need_an_explicit_rule() {
        let any = policy(&["*"]);
        assert!(any.check_address("example.com", 443, "93.184.216.34".parse().unwrap()).is_ok());
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            let error = any.check_address("example.com", 80, ip.parse().unwrap()).unwrap_err();
            assert!(error.contains("refused unless"), "{ip}: {error}");
        }
        assert!(any.check_host("169.254.169.254", 80).is_err(), "an address in the URL is checked too");
        let local = policy(&["127.0.0.1"]);
        assert!(local.check_host("127.0.0.1", 8080).is_ok());
        let by_name = policy(&["localhost"]);
        assert!(by_name.check_address("localhost", 8080, "127.0.0.1".parse().unwrap()).is_ok());
        let other_name = policy(&["internal.test"]);
        assert!(other_name.check_address("internal.test", 80, "127.0.0.1".parse().unwrap()).is_err());
    }
}
