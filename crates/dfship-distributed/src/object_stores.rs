//! Tables and results on object stores: `s3://` (AWS and S3-compatible
//! servers), `gs://`, `az://`/`abfss://` and `http(s)://`, besides local paths.
//!
//! DataFusion finds the store of a URL in its `RuntimeEnv`'s
//! [`ObjectStoreRegistry`]; the default one knows only `file://`, and its
//! error for anything else ("No suitable object store found … likely a bug
//! in DataFusion") points at the wrong project. [`LazyObjectStores`] builds
//! the store a URL names the first time it is asked for, from this
//! process's own configuration, and keeps it for the next queries. Both
//! sides install it: the coordinator (it lists files while planning, and a
//! `COPY … TO` sink runs there in datafusion-distributed 4.0) and every
//! worker (its stage plans name files by URL only). So credentials never
//! travel in plans: a worker resolves `s3://bucket/` from its own
//! environment and `--storage-option`s.
//!
//! Configuration, per process, the way `object_store` reads it:
//! - the standard environment variables: `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//!   `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`…; `GOOGLE_APPLICATION_CREDENTIALS`,
//!   `GOOGLE_SERVICE_ACCOUNT`…; `AZURE_STORAGE_ACCOUNT_NAME`,
//!   `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_CLIENT_ID`…;
//! - explicit options ([`StorageOptions`]), `object_store`'s own keys with
//!   their store's prefix (`aws_endpoint`, `google_service_account`,
//!   `azure_storage_account_name`) or none for the HTTP client's settings
//!   shared by every store (`allow_http`, `timeout`, `connect_timeout`), plus
//!   `max_retries` and `retry_timeout`; they win over the environment.
//!
//! `object_store` reads no `~/.aws` files (profiles, SSO); neither does this.
//!
//! **No cloud metadata service unless asked.** Without credentials,
//! `object_store` asks the instance metadata service (169.254.169.254) for
//! them, with minutes of retries, from any machine. Here a store without
//! credentials fails its first request at once, with an error that names
//! the process, the URL and what to set; [`StorageOptions::cloud_metadata`]
//! (`--cloud-metadata`) restores the fallback on machines that have an
//! instance role.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use dfship_codec::ErrorKind;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential};
use object_store::azure::{AzureConfigKey, AzureCredential, MicrosoftAzureBuilder};
use object_store::gcp::{GcpCredential, GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::{
    ClientConfigKey, CredentialProvider, ObjectStore, ObjectStoreScheme, RetryConfig,
};
use url::Url;

/// Where this process finds the credentials and endpoints of object
/// stores, over what the environment says (see the module docs).
///
/// ```
/// use dfship_distributed::StorageOptions;
///
/// let options = StorageOptions::parse([
///     "aws_endpoint=http://127.0.0.1:9000",
///     "aws_allow_http=true",
///     "aws_region=us-east-1",
/// ])
/// .unwrap();
/// assert!(!options.cloud_metadata);
/// assert!(StorageOptions::parse(["aws_endpont=http://x"]).is_err());
/// ```
#[derive(Clone, Default, PartialEq)]
pub struct StorageOptions {
    options: Vec<(String, String)>,
    /// Stores without credentials may ask the cloud's instance metadata
    /// service for them (169.254.169.254); off, they fail at once.
    pub cloud_metadata: bool,
}

/// Values are credentials: only the keys are shown.
impl std::fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("StorageOptions")
            .field("keys", &keys)
            .field("cloud_metadata", &self.cloud_metadata)
            .finish()
    }
}

/// Keys of dfship's own, for every store's retries.
const MAX_RETRIES: &str = "max_retries";
const RETRY_TIMEOUT: &str = "retry_timeout";

impl StorageOptions {
    /// Options from `KEY=VALUE` pairs; a key no store knows is an error that
    /// lists the kinds of keys there are.
    pub fn parse<I, S>(pairs: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut options = Vec::new();
        for pair in pairs {
            let pair = pair.as_ref().trim();
            if pair.is_empty() {
                continue;
            }
            let Some((key, value)) = pair.split_once('=') else {
                return Err(DataFusionError::Configuration(format!(
                    "storage option '{}' is not KEY=VALUE: write e.g. \
                     aws_endpoint=http://127.0.0.1:9000",
                    key_only(pair)
                )));
            };
            let key = key.trim().to_ascii_lowercase();
            check_key(&key, value.trim())?;
            options.push((key, value.trim().to_string()));
        }
        Ok(Self {
            options,
            cloud_metadata: false,
        })
    }

    /// These options with the metadata fallback on or off.
    pub fn with_cloud_metadata(mut self, allowed: bool) -> Self {
        self.cloud_metadata = allowed;
        self
    }

    /// The keys given (their values are credentials, so not shown).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.options.iter().map(|(k, _)| k.as_str())
    }

    /// The options of one store: those with its prefix, and the shared ones.
    fn for_store<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.options
            .iter()
            .filter(move |(k, _)| k.starts_with(prefix) || store_of(k).is_none())
            .filter(|(k, _)| k != MAX_RETRIES && k != RETRY_TIMEOUT)
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `object_store`'s retry settings, with `max_retries`/`retry_timeout` if given.
    fn retry(&self) -> RetryConfig {
        let mut retry = RetryConfig::default();
        if let Some(n) = self.value(MAX_RETRIES).and_then(|v| v.parse().ok()) {
            retry.max_retries = n;
        }
        if let Some(t) = self.value(RETRY_TIMEOUT).and_then(parse_seconds) {
            retry.retry_timeout = t;
        }
        retry
    }
}

fn key_only(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(k, _)| k)
}

fn parse_seconds(text: &str) -> Option<Duration> {
    let text = text.trim();
    let number = text.strip_suffix('s').unwrap_or(text);
    number
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// The store a prefixed key belongs to.
fn store_of(key: &str) -> Option<&'static str> {
    ["aws_", "google_", "azure_"]
        .into_iter()
        .find(|prefix| key.starts_with(prefix))
}

/// Refuses a key no store knows, or a value its store cannot take.
fn check_key(key: &str, value: &str) -> Result<()> {
    let known = match store_of(key) {
        Some("aws_") => AmazonS3ConfigKey::from_str(key).is_ok(),
        Some("google_") => GoogleConfigKey::from_str(key).is_ok(),
        Some(_) => AzureConfigKey::from_str(key).is_ok(),
        None if key == MAX_RETRIES => {
            return value.parse::<usize>().map(|_| ()).map_err(|_| {
                DataFusionError::Configuration(format!(
                    "storage option max_retries={value:?} is not a whole number of retries"
                ))
            })
        }
        None if key == RETRY_TIMEOUT => {
            return parse_seconds(value).map(|_| ()).ok_or_else(|| {
                DataFusionError::Configuration(format!(
                    "storage option retry_timeout={value:?} is not a number of seconds"
                ))
            })
        }
        None => ClientConfigKey::from_str(key).is_ok(),
    };
    if known {
        Ok(())
    } else {
        Err(DataFusionError::Configuration(format!(
            "unknown storage option '{key}': use object_store's keys with their store's prefix \
             (aws_endpoint, aws_region, aws_allow_http, aws_access_key_id, \
             google_service_account, azure_storage_account_name, ...), the HTTP client's keys \
             shared by every store (allow_http, timeout, connect_timeout, proxy_url, ...), or \
             max_retries / retry_timeout"
        )))
    }
}

/// The `RuntimeEnv` of a coordinator or worker whose object stores come
/// from `options` and the environment; `node` names this process in errors
/// ("worker 10.0.0.5:50051", "the coordinator").
pub fn runtime_env_with_object_stores(
    options: StorageOptions,
    node: impl Into<String>,
) -> Result<Arc<RuntimeEnv>> {
    let registry = Arc::new(LazyObjectStores::new(options, node));
    RuntimeEnvBuilder::new()
        .with_object_store_registry(registry)
        .build_arc()
}

/// An [`ObjectStoreRegistry`] that builds the store of an `s3://`, `gs://`,
/// `az://`, `abfss://` or `http(s)://` URL when it is first asked for (see
/// the module docs). Stores registered explicitly, and `file://`, are
/// served as by DataFusion's default registry.
#[derive(Debug)]
pub struct LazyObjectStores {
    explicit: DefaultObjectStoreRegistry,
    built: RwLock<HashMap<String, Arc<dyn ObjectStore>>>,
    options: StorageOptions,
    node: String,
}

impl LazyObjectStores {
    pub fn new(options: StorageOptions, node: impl Into<String>) -> Self {
        Self {
            explicit: DefaultObjectStoreRegistry::new(),
            built: RwLock::new(HashMap::new()),
            options,
            node: node.into(),
        }
    }

    fn build(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        let (scheme, _) = ObjectStoreScheme::parse(url).map_err(|_| unsupported(url))?;
        let options = &self.options;
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => Arc::new(self.s3(url)?.build().map_err(|e| {
                build_error(url, &e, "AWS_REGION, AWS_ENDPOINT_URL, aws_* storage options")
            })?),
            ObjectStoreScheme::GoogleCloudStorage => {
                Arc::new(self.gcs(url)?.build().map_err(|e| {
                    build_error(
                        url,
                        &e,
                        "GOOGLE_APPLICATION_CREDENTIALS, google_* storage options",
                    )
                })?)
            }
            ObjectStoreScheme::MicrosoftAzure => Arc::new(self.azure(url)?.build().map_err(|e| {
                build_error(
                    url,
                    &e,
                    "AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, azure_* storage options",
                )
            })?),
            ObjectStoreScheme::Http => {
                let base = format!("{}://{}", url.scheme(), authority(url));
                let mut builder = HttpBuilder::new()
                    .with_url(base)
                    .with_retry(options.retry())
                    // The URL asked for plain HTTP itself.
                    .with_config(ClientConfigKey::AllowHttp, "true");
                for (key, value) in options.for_store("http_") {
                    if let Ok(key) = ClientConfigKey::from_str(key) {
                        builder = builder.with_config(key, value);
                    }
                }
                Arc::new(
                    builder
                        .build()
                        .map_err(|e| build_error(url, &e, "the URL"))?,
                )
            }
            _ => return Err(unsupported(url)),
        };
        tracing::info!(store = %key_of(url), "object store ready");
        Ok(store)
    }

    fn s3(&self, url: &Url) -> Result<AmazonS3Builder> {
        let mut builder = AmazonS3Builder::from_env()
            .with_url(url.as_str())
            .with_retry(self.options.retry());
        for (key, value) in self.options.for_store("aws_") {
            builder =
                builder.with_config(AmazonS3ConfigKey::from_str(key).map_err(bad_key)?, value);
        }
        let has = |key: AmazonS3ConfigKey| builder.get_config_value(&key).is_some();
        let configured = has(AmazonS3ConfigKey::AccessKeyId)
            || has(AmazonS3ConfigKey::SecretAccessKey)
            || (has(AmazonS3ConfigKey::WebIdentityTokenFile) && has(AmazonS3ConfigKey::RoleArn))
            || has(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
            || has(AmazonS3ConfigKey::ContainerCredentialsFullUri)
            || is_true(builder.get_config_value(&AmazonS3ConfigKey::SkipSignature));
        if !configured && !self.options.cloud_metadata {
            builder = builder.with_credentials(Arc::new(self.missing::<AwsCredential>(
                url,
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for \
                 temporary ones) in its environment, or the storage options \
                 aws_access_key_id/aws_secret_access_key; for a public bucket set \
                 AWS_SKIP_SIGNATURE=true",
            )));
        }
        Ok(builder)
    }

    fn gcs(&self, url: &Url) -> Result<GoogleCloudStorageBuilder> {
        let mut builder = GoogleCloudStorageBuilder::from_env()
            .with_url(url.as_str())
            .with_retry(self.options.retry());
        for (key, value) in self.options.for_store("google_") {
            builder = builder.with_config(GoogleConfigKey::from_str(key).map_err(bad_key)?, value);
        }
        let has = |key: GoogleConfigKey| builder.get_config_value(&key).is_some();
        // object_store also reads gcloud's application-default file.
        let adc_file = std::env::var_os("HOME")
            .map(PathBuf::from)
            .map(|home| home.join(".config/gcloud/application_default_credentials.json"))
            .is_some_and(|path| path.is_file());
        let configured = has(GoogleConfigKey::ServiceAccount)
            || has(GoogleConfigKey::ServiceAccountKey)
            || has(GoogleConfigKey::ApplicationCredentials)
            || adc_file
            || is_true(builder.get_config_value(&GoogleConfigKey::SkipSignature));
        if !configured && !self.options.cloud_metadata {
            builder = builder.with_credentials(Arc::new(self.missing::<GcpCredential>(
                url,
                "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file in its \
                 environment, or the storage option google_service_account; for a public \
                 bucket set GOOGLE_SKIP_SIGNATURE=true",
            )));
        }
        Ok(builder)
    }

    fn azure(&self, url: &Url) -> Result<MicrosoftAzureBuilder> {
        let mut builder = MicrosoftAzureBuilder::from_env()
            .with_url(url.as_str())
            .with_retry(self.options.retry());
        for (key, value) in self.options.for_store("azure_") {
            builder = builder.with_config(AzureConfigKey::from_str(key).map_err(bad_key)?, value);
        }
        let has = |key: AzureConfigKey| builder.get_config_value(&key).is_some();
        let configured = has(AzureConfigKey::AccessKey)
            || has(AzureConfigKey::SasKey)
            || has(AzureConfigKey::Token)
            || (has(AzureConfigKey::ClientId)
                && (has(AzureConfigKey::ClientSecret) || has(AzureConfigKey::FederatedTokenFile)))
            || has(AzureConfigKey::MsiEndpoint)
            || is_true(builder.get_config_value(&AzureConfigKey::UseAzureCli))
            || is_true(builder.get_config_value(&AzureConfigKey::UseEmulator))
            || is_true(builder.get_config_value(&AzureConfigKey::SkipSignature));
        if !configured && !self.options.cloud_metadata {
            builder = builder.with_credentials(Arc::new(self.missing::<AzureCredential>(
                url,
                "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or \
                 AZURE_STORAGE_SAS_KEY, or AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID) \
                 in its environment, or the matching azure_* storage options",
            )));
        }
        Ok(builder)
    }

    fn missing<T>(&self, url: &Url, remedy: &str) -> MissingCredentials<T> {
        MissingCredentials {
            message: format!(
                "{} {} has no credentials for {}: {remedy}. It did not ask the cloud's instance \
                 metadata service (169.254.169.254); start it with --cloud-metadata (or \
                 DFSHIP_CLOUD_METADATA=true) where an instance role should be used",
                ErrorKind::Storage.tag(),
                self.node,
                key_of(url)
            ),
            _credential: std::marker::PhantomData,
        }
    }
}

fn is_true(value: Option<String>) -> bool {
    value.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on"))
}

fn bad_key(error: object_store::Error) -> DataFusionError {
    DataFusionError::Configuration(format!("storage option: {error}"))
}

fn authority(url: &Url) -> &str {
    &url[url::Position::BeforeHost..url::Position::AfterPort]
}

/// `scheme://authority/`: one store per bucket, container or HTTP server.
fn key_of(url: &Url) -> String {
    format!("{}://{}/", url.scheme(), authority(url))
}

fn unsupported(url: &Url) -> DataFusionError {
    DataFusionError::Configuration(format!(
        "{} no object store for {}: dfship reads and writes local paths (file://), s3:// and \
         s3a:// (AWS and S3-compatible servers), gs://, az:// / abfs:// / abfss:// / adl:// and \
         http(s):// URLs; check the URL's scheme",
        ErrorKind::Storage.tag(),
        key_of(url)
    ))
}

fn build_error(url: &Url, error: &object_store::Error, settings: &str) -> DataFusionError {
    DataFusionError::Configuration(format!(
        "{} cannot set up the object store for {}: {error}; check {settings}",
        ErrorKind::Storage.tag(),
        key_of(url)
    ))
}

impl ObjectStoreRegistry for LazyObjectStores {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.explicit.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.explicit.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.explicit.get_store(url) {
            return Ok(store);
        }
        let key = key_of(url);
        if let Some(store) = self.built.read().ok().and_then(|b| b.get(&key).cloned()) {
            return Ok(store);
        }
        let store = self.build(url)?;
        let mut built = self
            .built
            .write()
            .map_err(|_| DataFusionError::Internal("object store cache poisoned".to_string()))?;
        Ok(Arc::clone(built.entry(key).or_insert(store)))
    }
}

/// The credentials of a store that has none configured: every request fails
/// at once with `message` (instead of asking the instance metadata service).
struct MissingCredentials<T> {
    message: String,
    _credential: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for MissingCredentials<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MissingCredentials")
    }
}

#[async_trait]
impl<T: Send + Sync + 'static> CredentialProvider for MissingCredentials<T> {
    type Credential = T;

    async fn get_credential(&self) -> object_store::Result<Arc<T>> {
        Err(object_store::Error::Generic {
            store: "credentials",
            source: self.message.clone().into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::path::Path;
    use object_store::ObjectStoreExt;

    fn registry(options: &[&str]) -> LazyObjectStores {
        LazyObjectStores::new(StorageOptions::parse(options).unwrap(), "worker test:1")
    }

    #[test]
    fn options_refuse_unknown_keys_and_bad_values_and_hide_their_values() {
        for bad in [
            "aws_endpont=http://x",
            "endpoint=http://x",
            "google_nope=1",
            "no_equals_sign",
            "max_retries=many",
            "retry_timeout=-3",
        ] {
            let error = StorageOptions::parse([bad]).unwrap_err().to_string();
            assert!(error.contains("storage option"), "{bad}: {error}");
        }
        let options = StorageOptions::parse([
            "AWS_SECRET_ACCESS_KEY=hunter2",
            "allow_http=true",
            "max_retries=2",
        ])
        .unwrap();
        let shown = format!("{options:?}");
        assert!(shown.contains("aws_secret_access_key") && !shown.contains("hunter2"));
        assert_eq!(options.retry().max_retries, 2);
    }

    #[test]
    fn unknown_schemes_name_the_supported_ones() {
        let error = registry(&[])
            .get_store(&Url::parse("hdfs://namenode:8020/").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no object store for hdfs://namenode:8020/"),
            "{error}"
        );
        assert!(error.contains("s3://"), "{error}");
    }

    /// Without credentials every store fails its first request at once and
    /// says why, without a single packet to a metadata address: the
    /// metadata endpoint is pointed at a port that records connections.
    #[tokio::test]
    async fn stores_without_credentials_fail_fast_naming_the_process_url_and_remedy() {
        let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        trap.set_nonblocking(true).unwrap();
        let trap_url = format!("http://{}", trap.local_addr().unwrap());
        let stores = registry(&[
            &format!("aws_metadata_endpoint={trap_url}"),
            "aws_region=us-east-1",
            "aws_endpoint=http://127.0.0.1:9",
            "aws_allow_http=true",
            "azure_storage_account_name=acct",
        ]);
        for (url, names) in [
            ("s3://bucket/", "AWS_ACCESS_KEY_ID"),
            ("gs://bucket/", "GOOGLE_APPLICATION_CREDENTIALS"),
            ("az://container/", "AZURE_STORAGE_ACCOUNT_KEY"),
        ] {
            let url = Url::parse(url).unwrap();
            let store = stores.get_store(&url).unwrap();
            let started = std::time::Instant::now();
            let error = store
                .head(&Path::from("t/part-0.parquet"))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{url}: slow failure"
            );
            assert!(
                error.contains("worker test:1 has no credentials for")
                    && error.contains(url.as_str())
                    && error.contains(names)
                    && error.contains("--cloud-metadata"),
                "{url}: {error}"
            );
        }
        assert!(
            trap.accept().is_err(),
            "nothing reached the metadata endpoint"
        );
    }

    #[test]
    fn stores_are_built_once_per_bucket() {
        let stores = registry(&["aws_region=eu-west-1", "aws_skip_signature=true"]);
        let a = stores.get_store(&Url::parse("s3://one/").unwrap()).unwrap();
        let b = stores.get_store(&Url::parse("s3://one/").unwrap()).unwrap();
        let c = stores.get_store(&Url::parse("s3://two/").unwrap()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        // file:// is still DataFusion's local store.
        assert!(stores.get_store(&Url::parse("file:///").unwrap()).is_ok());
    }
}
