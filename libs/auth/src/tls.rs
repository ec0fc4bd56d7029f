//! TLS and mutual TLS for the gRPC listener and for outbound calls (rustls
//! through tonic), from the PEM files `[tls]` names. Certificates prove which
//! machine is calling; tokens still decide what the caller may do (R14).

use estate_config::TlsSettings;
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls.{what} {}: {e}", path.display()))
}

/// The listener's TLS configuration, or `None` for plaintext.
pub fn server_config(s: &TlsSettings) -> Result<Option<ServerTlsConfig>, String> {
    let (cert, key) = match (&s.cert_file, &s.key_file) {
        (None, None) => {
            if s.client_ca_file.is_some() {
                return Err("tls.client_ca_file needs tls.cert_file and tls.key_file".into());
            }
            return Ok(None);
        }
        (Some(c), Some(k)) => (c, k),
        _ => return Err("tls.cert_file and tls.key_file go together".into()),
    };
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read("cert_file", cert)?, read("key_file", key)?));
    if let Some(ca) = &s.client_ca_file {
        config = config
            .client_ca_root(Certificate::from_pem(read("client_ca_file", ca)?))
            .client_auth_optional(s.client_auth_optional);
    }
    Ok(Some(config))
}

/// TLS for an outbound call to `url`: `None` for `http://`, the configured CA
/// and client certificate for `https://`.
pub fn client_config(s: &TlsSettings, url: &str) -> Result<Option<ClientTlsConfig>, String> {
    if !url.starts_with("https://") {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new();
    match &s.ca_file {
        Some(ca) => config = config.ca_certificate(Certificate::from_pem(read("ca_file", ca)?)),
        None => return Err(format!("{url} is https but tls.ca_file (the CA to trust) is not set")),
    }
    match (&s.client_cert_file, &s.client_key_file) {
        (Some(c), Some(k)) => {
            config = config.identity(Identity::from_pem(read("client_cert_file", c)?, read("client_key_file", k)?));
        }
        (None, None) => {}
        _ => return Err("tls.client_cert_file and tls.client_key_file go together".into()),
    }
    if let Some(name) = &s.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(Some(config))
}
