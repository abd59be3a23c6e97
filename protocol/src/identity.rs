//! Certificate and key files: generation (`ferry keygen`) and loading.

use crate::fingerprint::Fingerprint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// A certificate chain and its private key, ready for [`crate::tls`].
#[derive(Debug)]
pub struct Identity {
    /// Certificate chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// An identity file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("{path}: {}", crate::io_reason(error))]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// The identity a configuration file names could not be loaded.
    #[error("{config}: {key}: {error}")]
    Configured {
        /// The configuration file.
        config: PathBuf,
        /// Which key (`cert` or `key`).
        key: &'static str,
        /// What went wrong.
        error: Box<IdentityError>,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

impl Identity {
    /// Loads a PEM certificate chain and a PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, IdentityError> {
        Ok(Identity {
            certs: load_certs(cert)?,
            key: load_key(key)?,
        })
    }

    /// Loads the `cert` and `key` that the configuration file `config` names; errors say
    /// which file, which key and which path.
    pub fn load_configured(
        config: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Identity, IdentityError> {
        let named = |k, e| IdentityError::Configured {
            config: config.to_path_buf(),
            key: k,
            error: Box::new(e),
        };
        let certs = load_certs(cert).map_err(|e| named("cert", e))?;
        let key = load_key(key).map_err(|e| named("key", e))?;
        Ok(Identity { certs, key })
    }

    /// Fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        crate::fingerprint::of_der(&self.certs[0])
    }

    /// A fresh self-signed identity, with the PEM texts of certificate and key.
    pub fn generate(name: &str) -> Result<(Identity, String, String), IdentityError> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
        let cert_pem = ck.cert.pem();
        let key_pem = ck.signing_key.serialize_pem();
        let identity = Identity {
            certs: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| {
                IdentityError::Pem {
                    path: PathBuf::from("<generated>"),
                    what: e.to_string(),
                }
            })?,
        };
        Ok((identity, cert_pem, key_pem))
    }

    /// Generates a self-signed identity into `dir/cert.pem` and `dir/key.pem` (mode 0600),
    /// refusing to overwrite existing files.
    pub fn generate_into(dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (identity, cert_pem, key_pem) = Identity::generate(name)?;
        std::fs::create_dir_all(dir).map_err(|error| IdentityError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        for (file, text, mode) in [("key.pem", &key_pem, 0o600), ("cert.pem", &cert_pem, 0o644)] {
            let path = dir.join(file);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(|error| IdentityError::Io {
                    path: path.clone(),
                    error,
                })?;
            f.write_all(text.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|error| IdentityError::Io {
                    path: path.clone(),
                    error,
                })?;
        }
        Ok(identity)
    }
}

/// Loads every certificate of a PEM file.
/// A missing or unreadable file is said plainly, before a PEM parser words it its own way.
fn readable(path: &Path) -> Result<(), IdentityError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|error| IdentityError::Io {
            path: path.to_path_buf(),
            error,
        })
}

/// Loads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    readable(path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| IdentityError::Pem {
        path: path.to_path_buf(),
        what: format!("no private key: {e}"),
    })
}

/// Loads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    readable(path)?;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| IdentityError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_back_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let made = Identity::generate_into(dir.path(), "test").unwrap();
        let loaded =
            Identity::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
        assert_eq!(made.fingerprint(), loaded.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            Identity::generate_into(dir.path(), "test").is_err(),
            "must not overwrite"
        );
    }
}
