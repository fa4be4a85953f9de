//! HTTPS for the REST API: the rustls server config made from the `api_tls` files.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use super::config::ApiTls;

/// Reads the certificate chain and key and checks they belong together, so a wrong file is
/// refused at start rather than at every client's handshake. HTTP/2 and HTTP/1.1 are offered.
pub fn server_config(tls: &ApiTls) -> Result<Arc<ServerConfig>> {
    let chain = certificates(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).with_context(|| {
        format!(
            "api_tls.key_file {}: no usable private key",
            tls.key_file.display()
        )
    })?;
    // Named explicitly: rumqttc also compiles in aws-lc-rs, and with two providers rustls
    // will not pick one by itself.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "api_tls: the key in {} does not fit the certificate in {}",
                tls.key_file.display(),
                tls.cert_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("api_tls.cert_file {}", path.display()))?;
    if chain.is_empty() {
        bail!(
            "api_tls.cert_file {}: no certificate in the file",
            path.display()
        );
    }
    Ok(chain)
}
