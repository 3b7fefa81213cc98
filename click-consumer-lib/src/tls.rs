//! An HTTPS client for ClickHouse that trusts a private CA (`CLICKHOUSE_CA_FILE`).

use std::{sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::error::{Error, Result};

/// ClickHouse closes idle HTTP connections after 3 s; drop ours before that (as the
/// clickhouse crate's own client does).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A ClickHouse client whose TLS trusts exactly the certificates in `pem`. Certificates
/// are verified (chain and host name) as with the default client.
pub(crate) fn client_trusting(pem: &str) -> Result<clickhouse::Client> {
    let bad = |reason: String| Error::setting("CLICKHOUSE_CA_FILE", reason);
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let certificate = certificate.map_err(|e| bad(format!("unreadable PEM: {e}")))?;
        roots
            .add(certificate)
            .map_err(|e| bad(format!("unusable certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("no TLS versions available: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector);
    Ok(clickhouse::Client::with_http_client(http))
}
