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
//!   holds the metadata and its location. The class's bearer token (its
//!   `tokenEnv`'s, or one issued for its `credentialEnv`'s OAuth2 client
//!   credentials) goes to the class's URL alone: redirects are not
//!   followed, and a `uri` the catalog's configuration suggests is ignored.

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
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let base = format!("{}/v1", catalog.uri.trim_end_matches('/'));
    let token = bearer_token(catalog, &client, &base).await?;
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

/// The bearer token the catalog's requests carry, if any: the one
/// `tokenEnv` holds, or one the token endpoint issues for the OAuth2
/// client credentials `credentialEnv` holds (the client credentials grant,
/// as Iceberg's `credential` property does it). Either way it goes to the
/// class's `uri` alone, and the client secret to the token endpoint alone.
/// No message holds a variable's value, the token or an answer's text.
async fn bearer_token(catalog: &IcebergCatalog, client: &reqwest::Client, base: &str) -> Result<Option<String>, TableError> {
    let name = &catalog.name;
    let variable = |variable: &str, holding: &str| {
        std::env::var(variable).map_err(|_| {
            unreadable(format!("catalog `{name}`: the environment variable {variable} holding its {holding} is not set"))
        })
    };
    let (token_env, credential_env) = (&catalog.token_env, &catalog.credential_env);
    let credential_env = match (token_env, credential_env) {
        (Some(_), Some(_)) => {
            // The operator refuses such a class; a task written by hand
            // gets no guess at which was meant.
            return Err(unsupported(format!("catalog `{name}`: both tokenEnv and credentialEnv are set")));
        }
        (Some(token_env), None) => return variable(token_env, "token").map(Some),
        (None, None) => return Ok(None),
        (None, Some(credential_env)) => credential_env,
    };
    let credential = variable(credential_env, "client credentials")?;
    let Some((client_id, client_secret)) = credential.split_once(':') else {
        return Err(unreadable(format!(
            "catalog `{name}`: the environment variable {credential_env} does not hold client credentials as client_id:client_secret"
        )));
    };
    let endpoint = catalog.oauth2_server_uri.clone().unwrap_or_else(|| format!("{base}/oauth/tokens"));
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", client_secret),
        ("scope", catalog.scope.as_deref().unwrap_or("catalog")),
    ];
    let request = client.post(endpoint).header("Accept", "application/json").form(&form);
    let issued = answer(request, "the OAuth2 token request").await.map_err(|e| unreadable(format!("catalog `{name}`: {e}")))?;
    // A token that is not a header value would fail later, in a message
    // about a request; an empty one would be no authentication at all.
    match issued.get("access_token").and_then(Value::as_str) {
        Some(token) if !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic() || b == b' ') => {
            Ok(Some(token.to_string()))
        }
        _ => Err(unreadable(format!("catalog `{name}`: the OAuth2 token endpoint's answer has no usable access_token"))),
    }
}

/// The error codes of an OAuth2 token endpoint's answer (RFC 6749 5.2,
/// the Iceberg REST spec's `OAuthError`): the only text of such an answer
/// a message repeats.
const OAUTH_ERRORS: &[&str] =
    &["invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type", "invalid_scope"];

/// The JSON answer of a request, or why there is none: the status and
/// the catalog's error type (or the token endpoint's OAuth2 error code),
/// never the body's text.
async fn answer(request: reqwest::RequestBuilder, what: &str) -> Result<Value, String> {
    let response = request.send().await.map_err(|e| format!("{what}: {}", without_url(&e)))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let kind = body
        .pointer("/error/type")
        .and_then(Value::as_str)
        .or_else(|| body.get("error").and_then(Value::as_str).filter(|code| OAUTH_ERRORS.contains(code)))
        .unwrap_or("");
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
