//! Where an Iceberg table's current metadata is: asked of the catalog the
//! namespace's ComputeClass names ([`IcebergCatalog`]), never of a host
//! the SegmentSource chooses.
//!
//! - `sql`: the JDBC / SQLAlchemy catalog's `iceberg_tables` table
//!   (`catalog_name`, `table_namespace` as the levels joined by `.`,
//!   `table_name`, `metadata_location`), in a SQLite file opened read-only.
//! - `rest`: the Iceberg REST catalog protocol: `GET v1/config` (the
//!   `prefix` it gives, for the class's `warehouse`), then
//!   `GET v1/{prefix}/namespaces/{namespace}/tables/{table}`, whose answer
//!   holds the metadata and its location. The class's bearer token goes to
//!   the class's URL alone: redirects are not followed, and a `uri` the
//!   catalog's configuration suggests is ignored.

use std::time::Duration;

use segment_core::api::{IcebergCatalog, IcebergCatalogType};
use segment_core::iceberg::TableRef;
use serde_json::Value;

use crate::lake_table::{unreadable, unsupported, TableError};

/// A table's current metadata file, and the metadata itself when the
/// catalog gave it.
#[derive(Debug, Clone)]
pub struct CatalogTable {
    pub metadata_location: String,
    pub metadata: Option<Value>,
}

pub async fn load_table(catalog: &IcebergCatalog, table: &TableRef) -> Result<CatalogTable, TableError> {
    match catalog.type_ {
        IcebergCatalogType::Sql => {
            let (catalog, table) = (catalog.clone(), table.clone());
            tokio::task::spawn_blocking(move || sql_metadata_location(&catalog, &table))
                .await
                .map_err(|e| unreadable(format!("the SQL catalog: {e}")))?
        }
        IcebergCatalogType::Rest => rest_load_table(catalog, table).await,
    }
}

fn sql_metadata_location(catalog: &IcebergCatalog, table: &TableRef) -> Result<CatalogTable, TableError> {
    use rusqlite::{OpenFlags, OptionalExtension};
    let name = &catalog.name;
    let file = catalog
        .uri
        .strip_prefix("sqlite://")
        .filter(|path| path.starts_with('/'))
        .ok_or_else(|| unsupported(format!("catalog `{name}`: only sqlite:///<absolute path> SQL catalogs are supported")))?;
    let failed = |e: rusqlite::Error| unreadable(format!("catalog `{name}`: {e}"));
    let connection =
        rusqlite::Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(failed)?;
    let catalog_name = catalog.catalog_name.as_deref().unwrap_or(name);
    let location: Option<Option<String>> = connection
        .query_row(
            "SELECT metadata_location FROM iceberg_tables WHERE catalog_name = ?1 AND table_namespace = ?2 AND table_name = ?3",
            (catalog_name, table.namespace.join("."), &table.table),
            |row| row.get(0),
        )
        .optional()
        .map_err(failed)?;
    match location.flatten() {
        Some(metadata_location) => Ok(CatalogTable { metadata_location, metadata: None }),
        None => Err(unreadable(format!("catalog `{name}` has no table {}.{}", table.namespace.join("."), table.table))),
    }
}

async fn rest_load_table(catalog: &IcebergCatalog, table: &TableRef) -> Result<CatalogTable, TableError> {
    let name = &catalog.name;
    let failed = |e: String| unreadable(format!("catalog `{name}`: {e}"));
    let token = match &catalog.token_env {
        Some(variable) => Some(std::env::var(variable).map_err(|_| {
            unreadable(format!("catalog `{name}`: the environment variable {variable} holding its token is not set"))
        })?),
        None => None,
    };
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let base = format!("{}/v1", catalog.uri.trim_end_matches('/'));
    let get = |url: String| {
        let mut request = client.get(url).header("Accept", "application/json");
        if let Some(token) = &token {
            request = request.bearer_auth(token);
        }
        request
    };
    let mut config = get(format!("{base}/config"));
    if let Some(warehouse) = &catalog.warehouse {
        config = config.query(&[("warehouse", warehouse)]);
    }
    let config = answer(config, "v1/config").await.map_err(failed)?;
    let prefix = ["overrides", "defaults"].iter().find_map(|k| config.get(*k)?.get("prefix")?.as_str().map(str::to_string));
    let namespace = table.namespace.iter().map(|level| encoded(level)).collect::<Vec<_>>().join("%1F");
    let path = match prefix {
        // The catalog's own prefix may span segments (`catalogs/main`);
        // each is encoded, so it stays a path under the class's URL.
        Some(prefix) => {
            let prefix = prefix.split('/').filter(|s| !s.is_empty() && *s != "." && *s != "..").map(encoded).collect::<Vec<_>>();
            format!("{}/namespaces/{namespace}/tables/{}", prefix.join("/"), encoded(&table.table))
        }
        None => format!("namespaces/{namespace}/tables/{}", encoded(&table.table)),
    };
    let loaded = answer(get(format!("{base}/{path}")), "loading the table").await.map_err(failed)?;
    let metadata_location = loaded
        .get("metadata-location")
        .and_then(Value::as_str)
        .ok_or_else(|| failed("the table has no metadata-location".to_string()))?
        .to_string();
    Ok(CatalogTable { metadata_location, metadata: loaded.get("metadata").cloned() })
}

/// The JSON answer of a request, or why there is none: the status and
/// the catalog's error type, never the body's text.
async fn answer(request: reqwest::RequestBuilder, what: &str) -> Result<Value, String> {
    let response = request.send().await.map_err(|e| format!("{what}: {}", without_url(&e)))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let kind = body.pointer("/error/type").and_then(Value::as_str).unwrap_or("");
    Err(format!("{what}: HTTP {status} {kind}").trim_end().to_string())
}

fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "the catalog");
    }
    text
}

/// A path segment, percent-encoded.
fn encoded(segment: &str) -> String {
    segment.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
        out
    })
}
