//! Object storage by URI: `s3://bucket/prefix` (credentials, region and
//! endpoint from the usual `AWS_*` environment) or `file:///abs/path`
//! and `file://./relative/path` (relative to the working directory).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("`{uri}` is not an s3:// or file:// URI: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("{0}")]
    Store(#[from] object_store::Error),
}

/// A store and a path inside it.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    /// The path of the URI inside `store` (no leading slash).
    pub path: Path,
    /// The store's root as a URL (`s3://bucket/`, `file:///`), the key
    /// under which a query engine registers `store`.
    pub root: Url,
}

/// Opens the store a URI points into.
pub fn locate(uri: &str) -> Result<Location, ObjectsError> {
    let bad = |reason: &str| ObjectsError::BadUri { uri: uri.to_string(), reason: reason.to_string() };
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        // Path-style requests and plain HTTP for S3-compatible servers
        // (MinIO, moto) named by AWS_ENDPOINT_URL.
        if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")) {
            builder = builder.with_endpoint(&endpoint).with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
        }
        let store = builder.build()?;
        let root = Url::parse(&format!("s3://{bucket}/")).map_err(|e| bad(&e.to_string()))?;
        return Ok(Location { store: Arc::new(store), path: Path::from(key.trim_end_matches('/')), root });
    }
    if let Some(rest) = uri.strip_prefix("file://") {
        let path = local_path(rest).map_err(|e| bad(&e))?;
        let object_path = Path::from_absolute_path(&path).map_err(|e| bad(&e.to_string()))?;
        let root = Url::parse("file:///").map_err(|e| bad(&e.to_string()))?;
        return Ok(Location { store: Arc::new(LocalFileSystem::new()), path: object_path, root });
    }
    Err(bad("unsupported scheme"))
}

/// `/abs` stays as it is; `./rel` (or `rel`) is taken from the working directory.
fn local_path(rest: &str) -> Result<PathBuf, String> {
    if rest.starts_with('/') {
        return Ok(PathBuf::from(rest));
    }
    let cwd = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
    let relative = rest.trim_start_matches("./");
    Ok(cwd.join(relative))
}

/// `location.path` joined with a child name.
pub fn child(path: &Path, name: &str) -> Path {
    let base = path.as_ref().trim_end_matches('/');
    if base.is_empty() {
        Path::from(name)
    } else {
        Path::from(format!("{base}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_resolve_to_a_store_and_a_path() {
        let s3 = locate("s3://results/growth/vip/v3/").unwrap();
        assert_eq!((s3.root.as_str(), s3.path.as_ref()), ("s3://results/", "growth/vip/v3"));
        let abs = locate("file:///tmp/lake/orders/").unwrap();
        assert_eq!((abs.root.as_str(), abs.path.as_ref()), ("file:///", "tmp/lake/orders"));
        let rel = locate("file://./lake/orders/").unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert!(
            rel.path.as_ref().ends_with("lake/orders")
                && rel.path.as_ref().starts_with(cwd.to_str().unwrap().trim_start_matches('/'))
        );
        assert!(matches!(locate("gs://x/y"), Err(ObjectsError::BadUri { .. })));
        assert!(matches!(locate("s3:///key"), Err(ObjectsError::BadUri { .. })));
        assert_eq!(child(&Path::from("a/b"), "c.txt").as_ref(), "a/b/c.txt");
    }
}
