//! What a namespace's [`ComputeClass`](crate::api::ComputeClass) allows
//! a Segment: its resources within the class's maximum, and its sources
//! and static list at locations the class allows, and Spark only where it
//! enables Spark. The operator checks it
//! before launching anything; a Segment that asks for more is `Stalled`
//! with reason `NotAllowed` (docs/security.md).

use crate::api::{
    ComputeClassSpec, ComputeEngine, CpuMemory, IcebergCatalogType, SegmentSourceSpec, SegmentSpec, SparkSettings,
    WorkerResources, RESERVED_WORKER_ENV,
};
use crate::reasons::SpecProblem;
use crate::validation::Invalid;

/// Where a Segment runs: its namespace, and the results base under which
/// each namespace's versions live (`<results_base>/<namespace>/`).
#[derive(Debug, Clone, Copy)]
pub struct Tenant<'a> {
    pub namespace: &'a str,
    pub results_base: &'a str,
}

/// Checks `spec`, whose compute Job reads `sources`, against `class`,
/// the class of the Segment's namespace.
pub fn check_allowed(
    spec: &SegmentSpec,
    sources: &[&SegmentSourceSpec],
    class: &ComputeClassSpec,
    tenant: Tenant<'_>,
) -> Result<(), Invalid> {
    check_class(class)?;
    if spec.compute.as_ref().is_some_and(|c| c.engine == ComputeEngine::Spark) {
        let Some(spark) = &class.spark else {
            return Err(not_allowed(
                "spec.compute.engine",
                "spark: the namespace's ComputeClass does not enable Spark (its spec.spark is unset); use engine: datafusion, \
                 or ask the cluster admin for a class with Spark settings"
                    .to_string(),
            ));
        };
        check_spark_settings(spark)?;
    }
    if let (Some(resources), Some(max)) = (spec.compute.as_ref().and_then(|c| c.resources.as_ref()), &class.max_resources) {
        check_resources(resources, max)?;
    }
    if let Some(list) = &spec.definition.static_list {
        check_location("spec.definition.static.uri", &list.uri, class, tenant)?;
    }
    for source in sources {
        let field = format!("SegmentSource of table `{}`: spec.uri", source.table);
        if source.format == crate::api::SourceFormat::Iceberg {
            // The table's locations come from the catalog at run time; the
            // worker checks them against the same prefixes.
            crate::iceberg::check_catalog_declared(&field, &source.uri, class)?;
        } else {
            check_location(&field, &source.uri, class, tenant)?;
        }
    }
    Ok(())
}

fn not_allowed(field: &str, message: String) -> Invalid {
    Invalid { reason: SpecProblem::NotAllowed, field: field.to_string(), message }
}

/// A class the operator will not run: one that sets the worker
/// environment the operator owns, a prefix that does not end a path, or
/// an Iceberg catalog whose settings contradict each other.
fn check_class(class: &ComputeClassSpec) -> Result<(), Invalid> {
    for variable in class.env.iter().flatten() {
        if RESERVED_WORKER_ENV.contains(&variable.name.as_str()) {
            return Err(not_allowed("ComputeClass spec.env", format!("{} is set by the operator", variable.name)));
        }
    }
    for prefix in class.allowed_source_prefixes.iter().flatten() {
        if !prefix.ends_with('/') || !(prefix.starts_with("s3://") || prefix.starts_with("file:///")) {
            return Err(not_allowed(
                "ComputeClass spec.allowedSourcePrefixes",
                format!("{prefix}: a prefix is an s3:// or file:/// URI ending in /"),
            ));
        }
    }
    check_iceberg_catalogs(class)
}

/// The class's Iceberg catalogs, as the worker will use them: one way to
/// authenticate to a catalog, and only the REST catalog's; the OAuth2
/// settings only with the credentials they are for. The schema cannot say
/// this, and a setting the worker would ignore is the admin's mistake.
pub fn check_iceberg_catalogs(class: &ComputeClassSpec) -> Result<(), Invalid> {
    for (i, catalog) in class.iceberg_catalogs.iter().enumerate() {
        let field = |name: &str| format!("ComputeClass spec.icebergCatalogs[{i}].{name}");
        let name = &catalog.name;
        let oauth2 = [("scope", catalog.scope.is_some()), ("oauth2ServerUri", catalog.oauth2_server_uri.is_some())];
        if catalog.type_ == IcebergCatalogType::Sql {
            let rest_only = [("tokenEnv", catalog.token_env.is_some()), ("credentialEnv", catalog.credential_env.is_some())];
            if let Some((setting, _)) = rest_only.iter().chain(&oauth2).find(|(_, set)| *set) {
                return Err(not_allowed(
                    &field(setting),
                    format!("catalog `{name}` is a sql catalog, a file the worker opens: {setting} is for rest catalogs only"),
                ));
            }
        }
        if catalog.token_env.is_some() && catalog.credential_env.is_some() {
            return Err(not_allowed(
                &field("credentialEnv"),
                format!("catalog `{name}`: tokenEnv and credentialEnv are two ways to authenticate; set one of them"),
            ));
        }
        if catalog.credential_env.is_none() {
            if let Some((setting, _)) = oauth2.iter().find(|(_, set)| *set) {
                return Err(not_allowed(
                    &field(setting),
                    format!("catalog `{name}`: {setting} is for the OAuth2 client credentials of credentialEnv, which is unset"),
                ));
            }
        }
    }
    Ok(())
}

/// Spark properties the class sets elsewhere, or the operator does: the
/// image and the driver's ServiceAccount have their own fields (one place
/// each), and the pods' templates, namespace and security are the
/// operator's (docs/security.md).
pub const RESERVED_SPARK_CONF: &[&str] = &[
    "spark.kubernetes.container.image",
    "spark.kubernetes.driver.container.image",
    "spark.kubernetes.executor.container.image",
    "spark.kubernetes.authenticate.driver.serviceAccountName",
    "spark.kubernetes.authenticate.executor.serviceAccountName",
    "spark.kubernetes.driver.podTemplateFile",
    "spark.kubernetes.executor.podTemplateFile",
    "spark.kubernetes.driver.podTemplateContainerName",
    "spark.kubernetes.executor.podTemplateContainerName",
    "spark.kubernetes.namespace",
];

/// The class's Spark settings, as the operator will run them: no property
/// of [`RESERVED_SPARK_CONF`], none of the operator's environment.
pub fn check_spark_settings(spark: &SparkSettings) -> Result<(), Invalid> {
    if let Some(key) = spark.spark_conf.keys().find(|key| RESERVED_SPARK_CONF.contains(&key.as_str())) {
        return Err(not_allowed(
            "ComputeClass spec.spark.sparkConf",
            format!("{key} is set by the class's own fields or by the operator, not by sparkConf"),
        ));
    }
    if let Some(key) = spark.hadoop_conf.keys().find(|key| key.starts_with("spark.")) {
        return Err(not_allowed(
            "ComputeClass spec.spark.hadoopConf",
            format!("{key}: Hadoop properties are written without the spark.hadoop. prefix; Spark properties go in sparkConf"),
        ));
    }
    Ok(())
}

fn check_resources(resources: &WorkerResources, max: &CpuMemory) -> Result<(), Invalid> {
    let max = max.by_name();
    for (kind, asked) in [("requests", &resources.requests), ("limits", &resources.limits)] {
        for (name, quantity) in asked.iter().flat_map(CpuMemory::by_name) {
            let field = format!("spec.compute.resources.{kind}.{name}");
            let Some(most) = max.get(&name) else { continue };
            let (Some(value), Some(most_value)) = (quantity_value(&quantity.0), quantity_value(&most.0)) else {
                return Err(not_allowed(&field, format!("`{}` is not a quantity", quantity.0)));
            };
            if value > most_value {
                return Err(not_allowed(&field, format!("{} is more than the ComputeClass allows ({})", quantity.0, most.0)));
            }
        }
    }
    Ok(())
}

/// Whether `uri` may be read by a Segment of the tenant's namespace:
/// never a path with `.`, `..` or an empty segment in it; never another
/// namespace's results, whatever the class says; `file://` only where the
/// class allows local files; and under one of the class's prefixes, when
/// it names any. Every check is on the location as the engine reads it,
/// percent escapes decoded: `%66inance` is `finance`.
pub(crate) fn check_location(field: &str, uri: &str, class: &ComputeClassSpec, tenant: Tenant<'_>) -> Result<(), Invalid> {
    let Tenant { namespace, results_base } = tenant;
    let read = percent_decoded(uri).ok_or_else(|| not_allowed(field, format!("{uri}: a percent escape is not UTF-8 text")))?;
    let path = read.split_once("://").map(|(_, rest)| rest).unwrap_or(&read);
    if path.split('/').any(|segment| segment == ".." || segment == ".") || path.contains("//") {
        return Err(not_allowed(field, format!("{uri}: `.`, `..` and empty segments are not allowed in a location")));
    }
    let results = format!("{}/", decoded_or_as_is(results_base).trim_end_matches('/'));
    if read.starts_with(&results) && !read.starts_with(&format!("{results}{namespace}/")) {
        return Err(not_allowed(field, format!("{uri} holds another namespace's results")));
    }
    if read.starts_with("file://") && !class.allow_local_files {
        return Err(not_allowed(field, format!("{uri}: the ComputeClass does not allow local files")));
    }
    let Some(prefixes) = &class.allowed_source_prefixes else { return Ok(()) };
    let allowed: Vec<String> = prefixes.iter().map(|p| p.replace("{namespace}", namespace)).collect();
    if allowed.iter().any(|prefix| read.starts_with(decoded_or_as_is(prefix).as_ref())) {
        return Ok(());
    }
    Err(not_allowed(field, format!("{uri} is outside the locations the ComputeClass allows ({})", allowed.join(", "))))
}

/// `text` with its percent escapes decoded, as the engine decodes a
/// location's path; `None` when an escape is malformed or the result is
/// not UTF-8. Every check of a path the engine reads decodes it here.
pub fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = bytes.get(at + 1..at + 3).filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An admin's location (a prefix, the results base) as it reads.
fn decoded_or_as_is(text: &str) -> std::borrow::Cow<'_, str> {
    percent_decoded(text).map_or(std::borrow::Cow::Borrowed(text), std::borrow::Cow::Owned)
}

/// A quantity in its base unit (cores, bytes): `500m`, `2`, `1.5`, `1Gi`,
/// `512Mi`, `2G`, `1e3`. `None` for anything else.
pub fn quantity_value(text: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let text = text.trim();
    let (number, factor) =
        SUFFIXES.iter().find_map(|(suffix, factor)| text.strip_suffix(suffix).map(|n| (n, *factor))).unwrap_or((text, 1.0));
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value * factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SourceFormat;

    /// A Segment of `growth`, with results under `s3://results/`.
    const GROWTH: Tenant<'static> = Tenant { namespace: "growth", results_base: "s3://results" };

    fn spec(yaml: &str) -> SegmentSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn class(yaml: &str) -> ComputeClassSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn source(uri: &str) -> SegmentSourceSpec {
        SegmentSourceSpec {
            table: "orders".into(),
            uri: uri.into(),
            format: SourceFormat::Parquet,
            user_id_column: "user_id".into(),
            timestamp_column: None,
        }
    }

    const SQL: &str = "definition: {sql: SELECT user_id FROM orders}\n";

    #[test]
    fn quantities_compare_in_their_base_unit() {
        assert_eq!(quantity_value("500m"), Some(0.5));
        assert_eq!(quantity_value("2"), Some(2.0));
        assert_eq!(quantity_value("1Gi"), Some(1073741824.0));
        assert_eq!(quantity_value("512Mi"), Some(536870912.0));
        assert_eq!(quantity_value("1G"), Some(1e9));
        assert_eq!(quantity_value("1e3"), Some(1000.0));
        assert!(quantity_value("1Gi").unwrap() > quantity_value("1G").unwrap());
        assert_eq!(quantity_value("lots"), None);
        assert_eq!(quantity_value("-1"), None);
    }

    #[test]
    fn resources_above_the_class_maximum_are_not_allowed() {
        let class = class("maxResources: {cpu: '2', memory: 4Gi}");
        let within = spec(&format!("{SQL}compute: {{resources: {{requests: {{cpu: 1500m}}, limits: {{memory: 4Gi}}}}}}"));
        assert_eq!(check_allowed(&within, &[], &class, GROWTH), Ok(()));
        let over = spec(&format!("{SQL}compute: {{resources: {{limits: {{memory: 5Gi}}}}}}"));
        let error = check_allowed(&over, &[], &class, GROWTH).unwrap_err();
        assert_eq!((error.reason, error.field.as_str()), (SpecProblem::NotAllowed, "spec.compute.resources.limits.memory"));
        assert!(error.message.contains("5Gi") && error.message.contains("4Gi"), "{error}");
        // No maximum: anything goes.
        assert_eq!(check_allowed(&over, &[], &ComputeClassSpec::default(), GROWTH), Ok(()));
    }

    #[test]
    fn sources_must_be_under_the_namespace_prefix_and_not_local() {
        let class = class("allowedSourcePrefixes: ['s3://lake/tenants/{namespace}/', 's3://shared/']");
        let sql = spec(SQL);
        let own = source("s3://lake/tenants/growth/orders/");
        assert_eq!(check_allowed(&sql, &[&own, &source("s3://shared/calendar/")], &class, GROWTH), Ok(()));

        for uri in [
            "s3://lake/tenants/finance/orders/",
            // A name that extends the namespace's is another namespace.
            "s3://lake/tenants/growth-eu/orders/",
            "s3://lake/tenants/growth/../finance/orders/",
            // The class's prefix, spelled with an escape, is still finance's.
            "s3://lake/tenants/%66inance/orders/",
            "s3://results/growth/vip/",
            "file:///var/run/secrets/kubernetes.io/serviceaccount/token",
        ] {
            let error = check_allowed(&sql, &[&own, &source(uri)], &class, GROWTH).unwrap_err();
            assert_eq!(error.reason, SpecProblem::NotAllowed, "{uri}");
            assert_eq!(error.field, "SegmentSource of table `orders`: spec.uri", "{uri}");
        }

        let list = spec("definition: {static: {uri: 's3://lake/tenants/finance/vip.csv'}}");
        let error = check_allowed(&list, &[], &class, GROWTH).unwrap_err();
        assert_eq!(error.field, "spec.definition.static.uri");
    }

    #[test]
    fn a_class_that_sets_the_operators_environment_or_a_bad_prefix_is_not_run() {
        let sets_task = class("env: [{name: TASK, value: '{}'}]");
        let error = check_allowed(&spec(SQL), &[], &sets_task, GROWTH).unwrap_err();
        assert_eq!((error.field.as_str(), error.message.as_str()), ("ComputeClass spec.env", "TASK is set by the operator"));
        let no_slash = class("allowedSourcePrefixes: ['s3://lake/tenants/{namespace}']");
        let error = check_allowed(&spec(SQL), &[], &no_slash, GROWTH).unwrap_err();
        assert_eq!(error.field, "ComputeClass spec.allowedSourcePrefixes");
    }

    #[test]
    fn an_iceberg_catalog_authenticates_one_way_and_only_a_rest_one() {
        let catalogs =
            |entries: &str| class(&format!("icebergCatalogs:\n- {{name: sqlite, type: sql, uri: 'sqlite:///c.db'}}\n{entries}"));
        for ok in [
            "- {name: lake, type: rest, uri: 'https://c/', tokenEnv: LAKE_TOKEN}",
            "- {name: lake, type: rest, uri: 'https://c/', credentialEnv: LAKE_CREDENTIAL}",
            "- {name: lake, type: rest, uri: 'https://c/', credentialEnv: LAKE_CREDENTIAL, scope: 'PRINCIPAL_ROLE:ALL', \
               oauth2ServerUri: 'https://idp/token'}",
            "- {name: lake, type: rest, uri: 'https://c/'}",
        ] {
            assert_eq!(check_allowed(&spec(SQL), &[], &catalogs(ok), GROWTH), Ok(()), "{ok}");
        }
        for (entry, field, why) in [
            (
                "- {name: lake, type: rest, uri: 'https://c/', tokenEnv: LAKE_TOKEN, credentialEnv: LAKE_CREDENTIAL}",
                "ComputeClass spec.icebergCatalogs[1].credentialEnv",
                "catalog `lake`: tokenEnv and credentialEnv are two ways to authenticate; set one of them",
            ),
            (
                "- {name: lake, type: sql, uri: 'sqlite:///l.db', credentialEnv: LAKE_CREDENTIAL}",
                "ComputeClass spec.icebergCatalogs[1].credentialEnv",
                "catalog `lake` is a sql catalog, a file the worker opens: credentialEnv is for rest catalogs only",
            ),
            (
                "- {name: lake, type: sql, uri: 'sqlite:///l.db', tokenEnv: LAKE_TOKEN}",
                "ComputeClass spec.icebergCatalogs[1].tokenEnv",
                "catalog `lake` is a sql catalog, a file the worker opens: tokenEnv is for rest catalogs only",
            ),
            (
                "- {name: lake, type: rest, uri: 'https://c/', tokenEnv: LAKE_TOKEN, oauth2ServerUri: 'https://idp/token'}",
                "ComputeClass spec.icebergCatalogs[1].oauth2ServerUri",
                "catalog `lake`: oauth2ServerUri is for the OAuth2 client credentials of credentialEnv, which is unset",
            ),
            (
                "- {name: lake, type: rest, uri: 'https://c/', scope: catalog}",
                "ComputeClass spec.icebergCatalogs[1].scope",
                "catalog `lake`: scope is for the OAuth2 client credentials of credentialEnv, which is unset",
            ),
        ] {
            let error = check_allowed(&spec(SQL), &[], &catalogs(entry), GROWTH).unwrap_err();
            assert_eq!(
                (error.reason, error.field.as_str(), error.message.as_str()),
                (SpecProblem::NotAllowed, field, why),
                "{entry}"
            );
        }
    }

    #[test]
    fn spark_runs_only_where_the_class_enables_it() {
        let spark = spec(&format!("{SQL}compute: {{engine: spark}}"));
        for class in [ComputeClassSpec::default(), class("image: worker:class\nmaxResources: {cpu: '2'}")] {
            let error = check_allowed(&spark, &[], &class, GROWTH).unwrap_err();
            assert_eq!((error.reason, error.field.as_str()), (SpecProblem::NotAllowed, "spec.compute.engine"));
            assert!(error.message.contains("does not enable Spark"), "{error}");
        }
        let enabled = class("spark: {image: 'spark:class', sparkVersion: 4.0.1, serviceAccountName: spark}");
        assert_eq!(check_allowed(&spark, &[], &enabled, GROWTH), Ok(()));
        // DataFusion runs with or without Spark settings.
        assert_eq!(check_allowed(&spec(SQL), &[], &enabled, GROWTH), Ok(()));
        assert_eq!(check_allowed(&spec(SQL), &[], &ComputeClassSpec::default(), GROWTH), Ok(()));
        // The sources are checked as for DataFusion.
        let prefixes = class(
            "allowedSourcePrefixes: ['s3://lake/tenants/{namespace}/']\nspark: {image: 'spark:class', sparkVersion: 4.0.1, serviceAccountName: spark}",
        );
        let error = check_allowed(&spark, &[&source("s3://lake/tenants/finance/orders/")], &prefixes, GROWTH).unwrap_err();
        assert_eq!(error.field, "SegmentSource of table `orders`: spec.uri");
    }

    #[test]
    fn a_class_whose_spark_conf_sets_what_its_fields_or_the_operator_set_is_not_run() {
        let spark = spec(&format!("{SQL}compute: {{engine: spark}}"));
        for key in ["spark.kubernetes.container.image", "spark.kubernetes.authenticate.driver.serviceAccountName"] {
            let class = class(&format!(
                "spark: {{image: 'spark:class', sparkVersion: 4.0.1, serviceAccountName: spark, sparkConf: {{'{key}': x}}}}"
            ));
            let error = check_allowed(&spark, &[], &class, GROWTH).unwrap_err();
            assert_eq!(error.field, "ComputeClass spec.spark.sparkConf", "{key}");
            assert!(error.message.starts_with(key), "{error}");
            // A DataFusion Segment of the same class is not held up by it.
            assert_eq!(check_allowed(&spec(SQL), &[], &class, GROWTH), Ok(()));
        }
        let prefixed = class(
            "spark: {image: 'spark:class', sparkVersion: 4.0.1, serviceAccountName: spark, hadoopConf: {'spark.hadoop.fs.s3a.endpoint': x}}",
        );
        assert_eq!(check_allowed(&spark, &[], &prefixed, GROWTH).unwrap_err().field, "ComputeClass spec.spark.hadoopConf");
    }

    #[test]
    fn another_namespaces_results_are_never_read_whatever_the_class() {
        let anywhere = ComputeClassSpec { allow_local_files: true, ..Default::default() };
        let own = source("s3://results/growth/vip/v3/");
        assert_eq!(check_allowed(&spec(SQL), &[&own], &anywhere, GROWTH), Ok(()));
        // Spelled otherwise, read the same: percent escapes and empty
        // segments do not hide another namespace's results.
        for (uri, why) in [
            ("s3://results/finance/payers/v1/", "another namespace's results"),
            ("s3://results/growth-eu/vip/v1/", "another namespace's results"),
            ("s3://results/%66inance/payers/v1/", "another namespace's results"),
            ("s3://results/%66%69nance/payers/v1/", "another namespace's results"),
            ("s3://results//finance/payers/v1/", "empty segments"),
            ("s3://results/growth/%2e%2e/finance/payers/v1/", "`..`"),
            ("s3://results/growth%2f..%2ffinance/payers/v1/", "`..`"),
            ("s3://results/%zz/", "percent escape"),
        ] {
            let error = check_allowed(&spec(SQL), &[&source(uri)], &anywhere, GROWTH).unwrap_err();
            assert_eq!(error.reason, SpecProblem::NotAllowed, "{uri}");
            assert!(error.message.contains(why), "{uri}: {error}");
        }
        let list = spec("definition: {static: {uri: 's3://results/finance/payers/v1/part-0.csv'}}");
        assert_eq!(check_allowed(&list, &[], &anywhere, GROWTH).unwrap_err().field, "spec.definition.static.uri");
        // A bucket whose name merely starts like the results base is not it.
        assert_eq!(check_allowed(&spec(SQL), &[&source("s3://results-archive/finance/")], &anywhere, GROWTH), Ok(()));
    }

    #[test]
    fn local_files_only_where_the_class_allows_them() {
        let token = source("file:///var/run/secrets/kubernetes.io/serviceaccount/token");
        let error = check_allowed(&spec(SQL), &[&token], &ComputeClassSpec::default(), GROWTH).unwrap_err();
        assert!(error.message.contains("local files"), "{error}");
        let local = ComputeClassSpec { allow_local_files: true, ..Default::default() };
        assert_eq!(check_allowed(&spec(SQL), &[&token], &local, GROWTH), Ok(()));
        // Any s3:// location without prefixes.
        assert_eq!(check_allowed(&spec(SQL), &[&source("s3://anywhere/x/")], &ComputeClassSpec::default(), GROWTH), Ok(()));
    }
}
