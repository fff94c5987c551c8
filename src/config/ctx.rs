//! What every section's validation shares: where an error is (the file, the line of a
//! span) and the helpers for names, secrets, paths and certificates.

use std::ops::Range;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::snapshot::*;
use super::*;

/// The file being validated: its text (for line numbers) and path (for relative paths).
pub(super) struct Ctx<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
}

impl Ctx<'_> {
    pub(super) fn err(
        &self,
        span: Option<Range<usize>>,
        subject: Option<String>,
        message: String,
    ) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            line: span.map(|s| line_of(self.text, s.start)),
            subject,
            message,
        }
    }

    /// Resolves `p` against the configuration file's directory.
    pub(super) fn file_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    pub(super) fn load_certs(
        &self,
        cert: &Path,
        key: &Path,
        span: Option<Range<usize>>,
        subject: Option<String>,
    ) -> Result<CertMaterial, ConfigError> {
        let cert_path = self.file_path(cert);
        let key_path = self.file_path(key);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|iter| iter.collect())
            .map_err(|e| {
                self.err(
                    span.clone(),
                    subject.clone(),
                    format!("cannot read certificate {}: {e}", cert_path.display()),
                )
            })?;
        if chain.is_empty() {
            return Err(self.err(
                span,
                subject,
                format!("no certificate in {}", cert_path.display()),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            self.err(
                span.clone(),
                subject.clone(),
                format!("cannot read private key {}: {e}", key_path.display()),
            )
        })?;
        Ok(CertMaterial { chain, key })
    }
}

pub(super) fn valid_name(name: &str, extra: &[char]) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(&c))
}

pub(super) fn secret(
    ctx: &Ctx<'_>,
    subject: &str,
    what: &str,
    plain: Option<String>,
    env: Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    match (plain, env) {
        (Some(_), Some(_)) => Err(ctx.err(
            None,
            Some(subject.to_owned()),
            format!("set either {what} or {what}_env, not both"),
        )),
        (Some(p), None) => Ok(Some(Secret(p))),
        (None, Some(var)) => std::env::var(&var).map(|v| Some(Secret(v))).map_err(|_| {
            ctx.err(
                None,
                Some(subject.to_owned()),
                format!("{what}_env names environment variable {var:?}, which is not set"),
            )
        }),
        (None, None) => Ok(None),
    }
}
