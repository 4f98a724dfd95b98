//! Optional bearer-token auth: a token grants reading some namespaces (or
//! all of them, `*`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::state::AppState;

/// What one request may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    All,
    Namespaces(Arc<BTreeSet<String>>),
}

impl Access {
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Access::All => true,
            Access::Namespaces(allowed) => allowed.contains(namespace),
        }
    }

    /// `Err(403)` naming `field` unless the namespace may be read.
    pub fn check(&self, field: &str, namespace: &str) -> Result<(), ApiError> {
        if self.allows(namespace) {
            Ok(())
        } else {
            Err(ApiError::forbidden(field, namespace))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading tokens file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("tokens file {path}: expected a map of token to a list of namespaces: {source}")]
    Parse { path: String, source: serde_yaml::Error },
    #[error("tokens file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Token → namespaces it may read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens(HashMap<String, Access>);

impl std::fmt::Debug for Tokens {
    // Tokens are secrets: logs and panics show only how many there are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} tokens)", self.0.len())
    }
}

impl Tokens {
    /// Reads a YAML (or JSON, which YAML includes) map of token to the list
    /// of namespaces it may read, `*` standing for all.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read { path: shown.clone(), source })?;
        Tokens::parse(&text).map_err(|e| match e {
            TokensError::Parse { source, .. } => TokensError::Parse { path: shown, source },
            TokensError::Invalid { reason, .. } => TokensError::Invalid { path: shown, reason },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Tokens, TokensError> {
        let raw: HashMap<String, Vec<String>> =
            serde_yaml::from_str(text).map_err(|source| TokensError::Parse { path: String::new(), source })?;
        if raw.keys().any(|t| t.trim().is_empty()) {
            return Err(TokensError::Invalid { path: String::new(), reason: "an empty token".into() });
        }
        Ok(Tokens::from_map(raw))
    }

    /// Tokens given in code (tests, embedding).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [&'a str])>) -> Tokens {
        Tokens::from_map(entries.into_iter().map(|(t, ns)| (t.to_string(), ns.iter().map(|n| n.to_string()).collect())).collect())
    }

    fn from_map(raw: HashMap<String, Vec<String>>) -> Tokens {
        let grant = |namespaces: Vec<String>| {
            if namespaces.iter().any(|n| n == "*") {
                Access::All
            } else {
                Access::Namespaces(Arc::new(namespaces.into_iter().collect()))
            }
        };
        Tokens(raw.into_iter().map(|(token, namespaces)| (token, grant(namespaces))).collect())
    }

    fn access(&self, token: &str) -> Option<&Access> {
        self.0.get(token)
    }
}

/// The request's [`Access`], from its bearer token; a missing or unknown
/// token is rejected with 401 before the handler runs. Every `/v1` handler
/// takes one (first, so a bad token is reported before bad input), which
/// is what puts those routes behind auth.
impl FromRequestParts<AppState> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Access, ApiError> {
        let Some(tokens) = state.tokens() else { return Ok(Access::All) };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match presented {
            None => Err(ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)")),
            Some(token) => tokens.access(token).cloned().ok_or_else(|| ApiError::unauthorized("invalid bearer token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_and_json() {
        let yaml = Tokens::parse("admin: ['*']\ngrowth-reader: [growth, crm]\n").unwrap();
        assert_eq!(yaml.access("admin"), Some(&Access::All));
        let reader = yaml.access("growth-reader").unwrap();
        assert!(reader.allows("crm") && !reader.allows("billing"));
        let json = Tokens::parse(r#"{"t1": ["a"]}"#).unwrap();
        assert!(json.access("t1").unwrap().allows("a"));
        assert!(Tokens::parse("t1: 5").is_err());
        assert!(Tokens::parse("'': [a]").is_err());
        assert!(!format!("{yaml:?}").contains("admin"), "tokens stay out of logs");
    }
}
