//! rustls configurations, ring provider only: the client-facing server config with a
//! certificate chosen by SNI (a tenant may have its own), the per-shard client configs with
//! libpq's `sslmode` meanings, and the `tls-server-end-point` channel-binding hash (RFC 5929
//! §4.1) that SCRAM-SHA-256-PLUS needs.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::auth::identity::sni_label;
use crate::config::{CertMaterial, ServerTlsMode, Shard, Snapshot};

/// The one crypto provider pgtenant uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS setup failure (bad key, unsupported algorithm).
#[derive(Debug, thiserror::Error)]
#[error("TLS configuration: {0}")]
pub struct TlsConfigError(String);

struct ServedCert {
    key: Arc<CertifiedKey>,
    channel_binding: Vec<u8>,
}

impl ServedCert {
    fn new(material: &CertMaterial, provider: &CryptoProvider) -> Result<Self, TlsConfigError> {
        let key =
            CertifiedKey::from_der(material.chain.clone(), material.key.clone_key(), provider)
                .map_err(|e| TlsConfigError(e.to_string()))?;
        let leaf = material
            .chain
            .first()
            .ok_or_else(|| TlsConfigError("empty certificate chain".into()))?;
        Ok(ServedCert {
            key: Arc::new(key),
            channel_binding: end_point_hash(leaf),
        })
    }
}

/// Picks the certificate for a client hello: the tenant's own when SNI names a tenant that has
/// one, the listener's otherwise.
pub struct SniResolver {
    default: ServedCert,
    by_subdomain: HashMap<String, ServedCert>,
    suffix: Option<String>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("tenant_certs", &self.by_subdomain.len())
            .finish()
    }
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> &ServedCert {
        sni.zip(self.suffix.as_deref())
            .and_then(|(host, suffix)| sni_label(host, suffix))
            .and_then(|label| self.by_subdomain.get(&label.to_ascii_lowercase()))
            .unwrap_or(&self.default)
    }

    /// The channel-binding data of the certificate served for `sni`.
    pub fn channel_binding(&self, sni: Option<&str>) -> Vec<u8> {
        self.pick(sni).channel_binding.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.pick(hello.server_name()).key))
    }
}

/// What the listener needs for TLS.
pub struct ClientTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub resolver: Arc<SniResolver>,
}

/// Builds the client-facing TLS setup from the snapshot, if `[listen.tls]` is configured.
pub fn client_tls(snapshot: &Snapshot) -> Result<Option<ClientTls>, TlsConfigError> {
    let Some(listen_tls) = &snapshot.listen.tls else {
        return Ok(None);
    };
    let provider = provider();
    let mut by_subdomain = HashMap::new();
    for tenant in &snapshot.tenants {
        if let Some(material) = &tenant.tls {
            by_subdomain.insert(
                tenant.subdomain.clone(),
                ServedCert::new(material, &provider)?,
            );
        }
    }
    let resolver = Arc::new(SniResolver {
        default: ServedCert::new(&listen_tls.cert, &provider)?,
        by_subdomain,
        suffix: listen_tls.sni_suffix.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
    // PostgreSQL 17 direct TLS negotiates this ALPN; older clients send none.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(ClientTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        resolver,
    }))
}

/// The rustls client config for connections to `shard`, or `None` for `tls = "disable"`.
pub fn server_tls(shard: &Shard) -> Result<Option<Arc<ClientConfig>>, TlsConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError(e.to_string()))?;
    let config = match shard.tls {
        ServerTlsMode::Disable => return Ok(None),
        ServerTlsMode::Prefer | ServerTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
        ServerTlsMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            for ca in &shard.ca {
                roots
                    .add(ca.clone())
                    .map_err(|e| TlsConfigError(format!("shard {:?} CA: {e}", shard.name)))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The server name rustls verifies and sends as SNI for `host`.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(host.to_owned()).map_err(|e| TlsConfigError(format!("host {host:?}: {e}")))
}

/// libpq's `sslmode=require`: encrypt, check the handshake signature, but do not verify the
/// certificate chain or host name.
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `tls-server-end-point` channel-binding data for a certificate: its hash with the digest of
/// its signature algorithm, SHA-256 for MD5/SHA-1 (RFC 5929 §4.1) and for algorithms without
/// a digest of their own.
pub fn end_point_hash(cert: &[u8]) -> Vec<u8> {
    const SHA384_OIDS: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
    ];
    const SHA512_OIDS: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
    ];
    match signature_algorithm_oid(cert) {
        Some(oid) if SHA384_OIDS.contains(&oid) => Sha384::digest(cert).to_vec(),
        Some(oid) if SHA512_OIDS.contains(&oid) => Sha512::digest(cert).to_vec(),
        _ => Sha256::digest(cert).to_vec(),
    }
}

/// The OID bytes of `Certificate.signatureAlgorithm` (X.509: a SEQUENCE of tbsCertificate,
/// signatureAlgorithm, signatureValue), read with a minimal DER walk.
fn signature_algorithm_oid(cert: &[u8]) -> Option<&[u8]> {
    let (tag, outer, _) = der_element(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_tbs) = der_element(outer)?;
    let (tag, algorithm, _) = der_element(after_tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_element(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// One DER element: `(tag, contents, rest)`.
fn der_element(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_binding_uses_the_signature_digest() {
        let cert = rcgen::generate_simple_self_signed(vec!["x.example".into()]).unwrap();
        let der = cert.cert.der();
        // rcgen signs with ECDSA P-256 + SHA-256 by default.
        assert_eq!(
            signature_algorithm_oid(der),
            Some(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02][..])
        );
        assert_eq!(end_point_hash(der), Sha256::digest(der).to_vec());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["y.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            end_point_hash(cert.der()),
            Sha384::digest(cert.der()).to_vec()
        );
    }

    #[test]
    fn garbage_certificates_fall_back_to_sha256() {
        assert_eq!(
            end_point_hash(b"\x30\x82\xff"),
            Sha256::digest(b"\x30\x82\xff").to_vec()
        );
        assert_eq!(signature_algorithm_oid(&[]), None);
    }
}
