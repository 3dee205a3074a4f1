//! TLS for both servers and for billing's client of the directory: certificates and keys read
//! from PEM files, turned into tonic's configurations.

use std::path::Path;

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The server side of TLS: our certificate chain and key, and for mutual TLS the CA that
/// client certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From `--tls-cert`, `--tls-key`, `--tls-client-ca`: none (plaintext), or cert and key
    /// together, optionally with a client CA.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> anyhow::Result<Option<Self>> {
        let tls = match (cert, key) {
            (None, None) => {
                anyhow::ensure!(
                    client_ca.is_none(),
                    "--tls-client-ca needs --tls-cert and --tls-key"
                );
                return Ok(None);
            }
            (Some(cert), Some(key)) => Self {
                cert_pem: read(cert, "TLS certificate")?,
                key_pem: read(key, "TLS key")?,
                client_ca_pem: client_ca.map(|p| read(p, "client CA")).transpose()?,
            },
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        tonic::transport::Server::builder()
            .tls_config(tls.config())
            .context("the TLS certificate and key do not make a valid server identity")?;
        Ok(Some(tls))
    }

    pub fn config(&self) -> ServerTlsConfig {
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// The client side of TLS: the CA to trust, and for mutual TLS our certificate and key.
#[derive(Clone, Default)]
pub struct ClientTls {
    pub ca_pem: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("custom_ca", &self.ca_pem.is_some())
            .field("mutual", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// From `--directory-ca`, `--directory-client-cert`, `--directory-client-key`.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                Some((read(cert, "client certificate")?, read(key, "client key")?))
            }
            _ => anyhow::bail!("--directory-client-cert and --directory-client-key go together"),
        };
        Ok(Self {
            ca_pem: ca.map(|p| read(p, "directory CA")).transpose()?,
            identity,
        })
    }

    pub fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&bytes).contains("-----BEGIN"),
        "the {what} {} is not PEM",
        path.display()
    );
    Ok(bytes)
}
