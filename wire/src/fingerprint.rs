//! Certificate fingerprints: `sha256:` followed by 64 lowercase hex digits of the SHA-256 of
//! the DER certificate. Peers are pinned by fingerprint; there is no certificate authority.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

/// A fingerprint string is malformed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid fingerprint {0:?}: expected `sha256:` and 64 hex digits")]
pub struct FingerprintError(String);

impl Fingerprint {
    /// The fingerprint whose SHA-256 is `digest` (`ferry_protocol::fingerprint::of_der`
    /// computes it from a certificate).
    pub const fn from_sha256(digest: [u8; 32]) -> Self {
        Fingerprint(digest)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || FingerprintError(s.to_string());
        let hex = s.trim().strip_prefix("sha256:").ok_or_else(err)?;
        if hex.len() != 64 {
            return Err(err());
        }
        let mut out = [0; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(err)?;
            // Accept upper case on input; print lower case.
            *byte = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(Fingerprint(out))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let f = Fingerprint::from_sha256(*b"a certificate's sha-256 digest..");
        let s = f.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 71);
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(
            s.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<Fingerprint>()
                .unwrap(),
            f
        );
    }

    #[test]
    fn malformed_strings_are_refused() {
        for s in [
            "",
            "sha256:",
            "md5:00",
            "sha256:zz",
            &format!("sha256:{}", "0".repeat(63)),
        ] {
            assert!(s.parse::<Fingerprint>().is_err(), "{s}");
        }
    }
}
