//! TLS for worker connections (tonic with rustls), and certificate
//! generation for local clusters and tests (rcgen).
//!
//! One [`TlsConfig`] describes both sides of a process: the certificate it
//! presents (a worker's server certificate, which it also presents as a
//! client when it calls other workers for shuffles) and the certificate
//! authority it trusts. A worker given a CA requires clients to present a
//! certificate signed by it (mutual TLS); a client given a CA verifies the
//! worker's certificate against it (and its host name or IP address).

use std::path::{Path, PathBuf};

use datafusion::error::{DataFusionError, Result};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// PEM material for TLS, read once from files.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// This process's certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The certificate authority peers are verified against.
    pub ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        DataFusionError::Configuration(format!(
            "cannot read the TLS {what} {}: {e}; check the path and its permissions",
            path.display()
        ))
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(DataFusionError::Configuration(format!(
            "the TLS {what} {} is not PEM (no -----BEGIN line); give a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}

impl TlsConfig {
    /// From PEM files: a certificate with its key, and/or a CA.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>> {
        let identity =
            match (cert, key) {
                (Some(cert), Some(key)) => Some((
                    read_pem(cert, "certificate")?,
                    read_pem(key, "private key")?,
                )),
                (None, None) => None,
                _ => return Err(DataFusionError::Configuration(
                    "give --tls-cert and --tls-key together (a certificate and its private key)"
                        .to_string(),
                )),
            };
        let ca = ca.map(|ca| read_pem(ca, "CA certificate")).transpose()?;
        Ok((identity.is_some() || ca.is_some()).then_some(Self { identity, ca }))
    }

    /// Whether a server with this config requires client certificates.
    pub fn requires_client_certificates(&self) -> bool {
        self.identity.is_some() && self.ca.is_some()
    }

    /// The server side: present the identity; with a CA, require clients'.
    pub(crate) fn server(&self) -> Result<ServerTlsConfig> {
        let (cert, key) = self.identity.as_ref().ok_or_else(|| {
            DataFusionError::Configuration(
                "a worker serving TLS needs --tls-cert and --tls-key".to_string(),
            )
        })?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }

    /// The client side: verify against the CA (else the system's roots are
    /// not used: a CA is required), present the identity when given.
    pub(crate) fn client(&self) -> Result<ClientTlsConfig> {
        let ca = self.ca.as_ref().ok_or_else(|| {
            DataFusionError::Configuration(
                "connecting to workers over TLS needs --tls-ca, the certificate authority that \
                 signed their certificates"
                    .to_string(),
            )
        })?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        Ok(config)
    }
}

/// Files written by [`generate_tls_files`].
#[derive(Debug, Clone)]
pub struct GeneratedTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long certificates made by [`generate_tls_files`] are valid.
pub const LOCAL_CERTIFICATE_DAYS: i64 = 365;

/// Writes a private key readable by its owner only, from the first byte on:
/// the file is opened with mode 0600 (and set to it if it existed), then written.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |e: std::io::Error| {
        DataFusionError::Execution(format!("cannot write {}: {e}", path.display()))
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(failed)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)
}

/// Writes a fresh random cluster key (32 bytes from the OS, as 64 hex
/// digits) to `path`, readable by its owner only from the first byte, and
/// returns it: for local clusters, whose workers read it with
/// `--cluster-key-file` (a path on their command line, never the key).
pub fn write_cluster_key_file(path: &Path) -> Result<dfship_codec::ClusterKey> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        DataFusionError::Execution(format!("cannot draw a random cluster key: {e}"))
    })?;
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, &text)?;
    dfship_codec::ClusterKey::new(text.into_bytes())
}

/// Writes a fresh certificate authority and one certificate signed by it,
/// valid for `hosts` (names or IP addresses) and usable by servers and
/// clients alike, into `dir` (`ca.pem`, `cert.pem`, `key.pem`; the key
/// readable by its owner only). Meant for local clusters and tests; in
/// production use your own PKI.
pub fn generate_tls_files(dir: &Path, hosts: &[String]) -> Result<GeneratedTls> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let failed = |e: rcgen::Error| {
        DataFusionError::Execution(format!("cannot generate TLS certificates: {e}"))
    };
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "dfship local CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Valid for a year (rcgen's default runs to the year 4096): a local or
    // test cluster's certificates that leak stop working.
    let now = time::OffsetDateTime::now_utc();
    let (not_before, not_after) = (
        now - time::Duration::hours(1),
        now + time::Duration::days(LOCAL_CERTIFICATE_DAYS),
    );
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca = ca_params.self_signed(&ca_key).map_err(failed)?;

    let key = KeyPair::generate().map_err(failed)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(failed)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "dfship node");
    params.not_before = not_before;
    params.not_after = not_after;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(failed)?;

    std::fs::create_dir_all(dir).map_err(|e| DataFusionError::External(Box::new(e)))?;
    let files = GeneratedTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| {
            DataFusionError::Execution(format!("cannot write {}: {e}", path.display()))
        })
    };
    write(&files.ca, ca.pem())?;
    write(&files.cert, cert.pem())?;
    write_private(&files.key, &key.serialize_pem())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_private_key_is_owner_only_even_over_an_older_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let files = generate_tls_files(dir.path(), &["localhost".to_string()]).unwrap();
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(std::fs::read_to_string(&files.key)
            .unwrap()
            .contains("PRIVATE KEY"));
    }

    #[test]
    fn a_key_path_that_is_a_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.txt");
        std::fs::write(&elsewhere, "not yours").unwrap();
        let out = dir.path().join("tls");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&elsewhere, out.join("key.pem")).unwrap();
        let error = generate_tls_files(&out, &["localhost".to_string()]).unwrap_err();
        assert!(error.to_string().contains("key.pem"), "{error}");
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "not yours");
    }
}
