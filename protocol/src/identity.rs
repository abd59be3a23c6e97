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
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
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
        let certs = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| IdentityError::Pem {
            path: key.to_path_buf(),
            what: format!("no private key: {e}"),
        })?;
        Ok(Identity { certs, key })
    }

    /// Fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.certs[0])
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
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for (file, text, mode) in [("key.pem", &key_pem, 0o600), ("cert.pem", &cert_pem, 0o644)] {
            let path = dir.join(file);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(|source| IdentityError::Io {
                    path: path.clone(),
                    source,
                })?;
            f.write_all(text.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|source| IdentityError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(identity)
    }
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
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
