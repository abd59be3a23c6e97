//! `hosts_allow` entries: IP addresses and CIDR blocks, parsed from configuration and matched
//! against a peer's address.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address or CIDR block from `hosts_allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    addr: IpAddr,
    prefix: u8,
}

/// A `hosts_allow` entry is malformed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid host pattern {0:?}: expected an IP address or CIDR block such as 10.0.0.0/24")]
pub struct HostPatternError(String);

impl FromStr for HostPattern {
    type Err = HostPatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HostPatternError(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| err())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(err());
        }
        Ok(HostPattern { addr, prefix })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl HostPattern {
    /// True if `ip` falls in the pattern. IPv4-mapped IPv6 peers match IPv4 patterns.
    pub fn matches(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        let p: HostPattern = "10.255.60.0/24".parse().unwrap();
        assert!(p.matches("10.255.60.9".parse().unwrap()));
        assert!(p.matches("::ffff:10.255.60.9".parse().unwrap()));
        assert!(!p.matches("10.255.61.9".parse().unwrap()));
        let any: HostPattern = "0.0.0.0/0".parse().unwrap();
        assert!(any.matches("1.2.3.4".parse().unwrap()));
        let v6: HostPattern = "fd00::/8".parse().unwrap();
        assert!(v6.matches("fd12::1".parse().unwrap()));
        assert!(!v6.matches("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "host.example", "", "::/129"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
    }
}
