//! The per-sandbox certificate authority: an ECDSA P-256 key generated in memory when the
//! sandbox starts (never written anywhere) that signs a leaf certificate for each intercepted
//! server name. The guest trusts its certificate; nothing else does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use crate::proxy::ProxyError;

/// Leaf configurations kept; past this the cache starts over (names come from the allow list,
/// so this is only hit by `*` rules).
const MAX_LEAVES: usize = 1024;

/// The CA and its cache of per-name TLS server configurations.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> ProxyError {
    ProxyError(format!("{what}: {e}"))
}

impl Ca {
    /// Generates a fresh CA.
    pub fn generate() -> Result<Ca, ProxyError> {
        let key = KeyPair::generate().map_err(|e| err("cannot generate the sandbox CA key", e))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| err("sandbox CA parameters", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Airlock sandbox CA");
        dn.push(DnType::OrganizationName, "Airlock");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| err("cannot sign the sandbox CA", e))?;
        Ok(Ca {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.cert_pem
    }

    /// TLS server configuration presenting a leaf for `name` (normalised DNS name), ALPN h2 and
    /// http/1.1.
    pub fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, ProxyError> {
        if let Some(c) = self.leaves.lock().unwrap().get(name) {
            return Ok(c.clone());
        }
        let key = KeyPair::generate().map_err(|e| err("cannot generate a leaf key", e))?;
        let mut params = CertificateParams::new(vec![name.to_string()])
            .map_err(|e| err("leaf certificate parameters", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err("cannot sign a leaf certificate", e))?;
        let chain = vec![leaf.der().clone(), self.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| err("TLS server configuration", e))?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| err("TLS server configuration", e))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        let mut leaves = self.leaves.lock().unwrap();
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(name.to_string(), cfg.clone());
        Ok(cfg)
    }
}
