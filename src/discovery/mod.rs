//! Discovery: how agents find a paid API before they pay it.
//!
//! Two pieces, both generated from the [`PaymentLayer`](crate::PaymentLayer) configuration
//! that builds the challenges, so what is advertised is what is charged:
//!
//! - **The `bazaar` extension in the 402.** [`PaymentLayerBuilder::bazaar`] declares how a
//!   route is called (HTTP method, query parameters or body, as examples and JSON Schemas)
//!   and what it returns; the v2 challenge then carries `extensions.bazaar` exactly as
//!   `@x402/extensions` 2.27 builds it (`declareDiscoveryExtension`, then
//!   `bazaarResourceServerExtension.enrichDeclaration` with the method), and facilitators
//!   that catalogue resources read it from the paying client's echo (x402-foundation/x402
//!   `specs/extensions/bazaar.md`). [`service_name`](crate::PaymentLayerBuilder::service_name),
//!   [`tags`](crate::PaymentLayerBuilder::tags) and [`icon_url`](crate::PaymentLayerBuilder::icon_url) go
//!   on the challenge's `resource` object, where that spec puts service metadata ("Service
//!   Metadata on `resource`"); the builder refuses values the spec's validation rules would
//!   make a catalogue drop. There is no `category` field in the reference: use tags.
//! - **A `/.well-known/x402` manifest.** [`Manifest`] is a tower service (mount it with
//!   axum's `route_service`) that lists every route you register with the `accepts` of its
//!   402, its resource URL, description, MIME type and bazaar contract. See its docs for the
//!   document's shape and the sources it follows.
//!
//! The wire is unchanged when nothing of this is configured: no `extensions` field, no
//! service metadata.
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::{Method, Request, StatusCode};
//! use serde_json::json;
//! use tower::ServiceExt;
//! use tower_x402::discovery::{Bazaar, Manifest};
//! use tower_x402::primitives::address;
//! use tower_x402::{Network, PaymentLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let weather = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .resource_base("https://api.example.com")
//!     .description("Current weather for a city")
//!     .mime_type("application/json")
//!     .tags(["weather"])
//!     .bazaar(
//!         Bazaar::get()
//!             .input_example(json!({ "city": "Paris" }))
//!             .input_schema(json!({
//!                 "properties": { "city": { "type": "string" } },
//!                 "required": ["city"]
//!             }))
//!             .output_example(json!({ "city": "Paris", "weather": "sunny" })),
//!     )
//!     .build()
//!     .unwrap();
//! // The manifest lists the routes it is told about, priced by the same layers.
//! let manifest = Manifest::builder()
//!     .route(Method::GET, "/weather", &weather)
//!     .build()
//!     .unwrap();
//! let app = Router::new()
//!     .route("/weather", get(|| async { r#"{"city":"Paris","weather":"sunny"}"# }))
//!     .route_layer(weather)
//!     .route_service(Manifest::PATH, manifest.clone())
//!     .route_service(Manifest::PATH_JSON, manifest);
//!
//! let res = app
//!     .oneshot(Request::get("/.well-known/x402").body(Body::empty()).unwrap())
//!     .await
//!     .unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
//! let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(doc["items"][0]["resource"]["url"], "https://api.example.com/weather");
//! assert_eq!(doc["items"][0]["accepts"][0]["amount"], "1000");
//! assert_eq!(doc["items"][0]["input"]["method"], "GET");
//! # }
//! ```
//!
//! [`PaymentLayerBuilder::bazaar`]: crate::PaymentLayerBuilder::bazaar

mod manifest;

pub use manifest::{Manifest, ManifestBuilder};

use http::{Method, Uri};
use serde_json::{Map, Value, json};

use crate::config::ServiceMeta;
use crate::error::ConfigError;

/// The extension's key in the challenge's `extensions`.
pub const BAZAAR: &str = "bazaar";

const JSON_SCHEMA_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// Why discovery metadata or a manifest cannot be built.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// [`Bazaar::query`] with a method that carries a body (or none of the reference's).
    #[error("bazaar: {0} is not a query method (GET, HEAD, DELETE)")]
    QueryMethod(Method),
    /// [`Bazaar::body`] with a method that carries no body.
    #[error("bazaar: {0} is not a body method (POST, PUT, PATCH)")]
    BodyMethod(Method),
    /// A value that the reference's types require to be a JSON object.
    #[error("bazaar: {0} must be a JSON object")]
    NotAnObject(&'static str),
    /// An output example the reference would drop (`null`, `false`, `0`, `""`).
    #[error("bazaar: the output example is empty (null, false, 0 or \"\"), the reference drops it")]
    EmptyOutputExample,
    /// An output schema without an example: the reference only sends `output` with one.
    #[error("bazaar: an output schema needs an output example (the reference drops it alone)")]
    OutputSchemaWithoutExample,
    /// A route template the reference would discard, or one this crate cannot match in linear
    /// time (a parameter that is not a whole segment).
    #[error("bazaar: route template {0}")]
    RouteTemplate(String),
    /// An output example that is not an object while the schema says `"type": "object"`.
    #[error(
        "bazaar: a non-object output example needs an output schema with its own \"type\" \
         (the default is \"object\", and validators would refuse the extension)"
    )]
    OutputExampleType,
    /// A service name outside printable ASCII or 1 to 32 characters.
    #[error("service name must be 1 to 32 printable ASCII characters")]
    ServiceName,
    /// A tag outside printable ASCII or 1 to 32 characters, a duplicate, or more than 5.
    #[error("tags: {0}")]
    Tags(String),
    /// An icon URL that catalogues drop.
    #[error("icon URL: {0}")]
    IconUrl(&'static str),
    /// A declaration so large that the payments echoing it would exceed the layer's
    /// `max_header_bytes`.
    #[error(
        "bazaar: paying clients echo the declaration, making their payment header about \
         {header} bytes, over max_header_bytes ({max}): shrink the schemas and examples, or \
         raise max_header_bytes (and mind proxies' header limits)"
    )]
    TooLarge {
        /// The estimated payment header, in bytes.
        header: usize,
        /// The layer's limit.
        max: usize,
    },
    /// A manifest without any route.
    #[error("manifest: no route registered")]
    NoRoutes,
    /// A route path that is not an absolute path.
    #[error("manifest: route path {0:?} must start with '/' and be a valid URI path")]
    Path(String),
    /// A manifest origin that is not `http(s)://host[:port]`.
    #[error("manifest: origin {0:?} must be http(s)://host[:port], without path")]
    Origin(String),
    /// A route whose layer has no `resource_base` in a manifest without an origin.
    #[error(
        "manifest: {0} has no resource_base; set ManifestBuilder::origin (never taken from \
         the request's Host)"
    )]
    NoOrigin(String),
    /// A route that its layer's pricing function lets through for free.
    #[error("manifest: {0} is free under its layer's pricing function")]
    Free(String),
    /// A route registered with another method than its bazaar declares.
    #[error("manifest: {route} is registered as {registered} but its bazaar declares {declared}")]
    MethodMismatch {
        /// The route's path.
        route: String,
        /// The method it was registered with.
        registered: String,
        /// The method its bazaar declares.
        declared: String,
    },
}

/// How a body route's body is encoded (`bodyType` of the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyType {
    /// `json`.
    Json,
    /// `form-data`.
    FormData,
    /// `text`.
    Text,
}

impl BodyType {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::FormData => "form-data",
            Self::Text => "text",
        }
    }
}

/// The `bazaar` discovery declaration of one route: how it is called and what it returns.
/// Set it with [`PaymentLayerBuilder::bazaar`](crate::PaymentLayerBuilder::bazaar); see the
/// [module docs](self).
///
/// Keep it small: the challenge travels in the `PAYMENT-REQUIRED` header (proxies often cap
/// headers at 8 KiB), and paying clients echo it in theirs; the layer refuses, at build, a
/// declaration that would push a payment over its own
/// [`max_header_bytes`](crate::PaymentLayerBuilder::max_header_bytes).
///
/// The declaration names its HTTP method (the reference fills it in from the request at
/// challenge time; declaring it keeps the challenge the same for every request, and lets the
/// [`Manifest`] check it against the route).
///
/// ```
/// use serde_json::json;
/// use tower_x402::discovery::{Bazaar, BodyType};
/// let search = Bazaar::post(BodyType::Json)
///     .input_example(json!({ "query": "rust" }))
///     .input_schema(json!({
///         "type": "object",
///         "properties": { "query": { "type": "string" } },
///         "required": ["query"]
///     }))
///     .output_example(json!({ "results": [] }));
/// assert_eq!(search.method(), http::Method::POST);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct Bazaar {
    method: Method,
    body_type: Option<BodyType>,
    input: Option<Value>,
    input_schema: Option<Value>,
    output_example: Option<Value>,
    output_schema: Option<Value>,
    route_template: Option<String>,
    path_params_schema: Option<Value>,
}

impl Bazaar {
    /// A `GET` route: its input is query parameters.
    pub fn get() -> Self {
        Self::new(Method::GET, None)
    }

    /// A `POST` route whose body is encoded as `body_type`.
    pub fn post(body_type: BodyType) -> Self {
        Self::new(Method::POST, Some(body_type))
    }

    /// A route whose input is query parameters: `GET`, `HEAD` or `DELETE`.
    ///
    /// # Errors
    /// Any other method.
    pub fn query(method: Method) -> Result<Self, ConfigError> {
        if ![Method::GET, Method::HEAD, Method::DELETE].contains(&method) {
            return Err(DiscoveryError::QueryMethod(method).into());
        }
        Ok(Self::new(method, None))
    }

    /// A route whose input is a body encoded as `body_type`: `POST`, `PUT` or `PATCH`.
    ///
    /// # Errors
    /// Any other method.
    pub fn body(method: Method, body_type: BodyType) -> Result<Self, ConfigError> {
        if ![Method::POST, Method::PUT, Method::PATCH].contains(&method) {
            return Err(DiscoveryError::BodyMethod(method).into());
        }
        Ok(Self::new(method, Some(body_type)))
    }

    fn new(method: Method, body_type: Option<BodyType>) -> Self {
        Self {
            method,
            body_type,
            input: None,
            input_schema: None,
            output_example: None,
            output_schema: None,
            route_template: None,
            path_params_schema: None,
        }
    }

    setters! {
        /// Example input: the query parameters (an object) or the body (default `{}`).
        pub fn input_example(example: Value) => input = Some(example);

        /// JSON Schema of the input: of the query parameters' object (its `properties`,
        /// `required`, ...) or of the body (default `{"properties": {}}`, anything).
        pub fn input_schema(schema: Value) => input_schema = Some(schema);

        /// Example response (default none: no `output` is declared).
        pub fn output_example(example: Value) => output_example = Some(example);

        /// JSON Schema of the example response, merged into `{"type": "object"}` as the
        /// reference does (needs [`Self::output_example`]).
        pub fn output_schema(schema: Value) => output_schema = Some(schema);

        /// The route's template, e.g. `/weather/:city`, for a route with path parameters (default
        /// none): the challenge carries it as `routeTemplate`, and `info.input.pathParams` with
        /// the values of the request's path (`{"city": "paris"}` for `/weather/paris`), as the
        /// reference's server extension does, so that catalogues list the route once. Each
        /// parameter is a whole path segment, `:name`; the template matches the request's path
        /// (not `resource_base`'s).
        pub fn route_template(template: impl Into<String>)
            => route_template = Some(template.into());

        /// JSON Schema of the path parameters' object (its `properties`, `required`, ...),
        /// merged into `{"type": "object"}` (default: `{"type": "object"}` with a template).
        pub fn path_params_schema(schema: Value) => path_params_schema = Some(schema);
    }

    /// The declared HTTP method.
    pub fn method(&self) -> Method {
        self.method.clone()
    }

    /// The `extensions.bazaar` value of the challenge: `@x402/extensions` 2.27
    /// `createQueryDiscoveryExtension` / `createBodyDiscoveryExtension`, enriched with the
    /// method as `bazaarResourceServerExtension.enrichDeclaration` does (`info.input.method`,
    /// and the schema's method `enum` narrowed to it).
    ///
    /// # Errors
    /// See [`DiscoveryError`]: a query example or a schema that is not an object, an output
    /// that the reference would drop or that its schema would refuse.
    pub fn declaration(&self) -> Result<Value, ConfigError> {
        let object = |v: &Option<Value>, what, default: Value| match v {
            None => Ok(default),
            Some(v @ Value::Object(_)) => Ok(v.clone()),
            Some(_) => Err(DiscoveryError::NotAnObject(what)),
        };
        let method = self.method.as_str();
        let input_schema = object(
            &self.input_schema,
            "the input schema",
            json!({ "properties": {} }),
        )?;
        let (info_input, schema_input) = match self.body_type {
            None => {
                let example = object(&self.input, "a query example", json!({}))?;
                // `{"type": "object", ...inputSchema}`: the user's keys win, as in a spread.
                let mut query = Map::new();
                query.insert("type".into(), json!("object"));
                if let Value::Object(s) = input_schema {
                    query.extend(s);
                }
                (
                    json!({ "type": "http", "method": method, "queryParams": example }),
                    json!({
                        "type": "object",
                        "properties": {
                            "type": { "type": "string", "const": "http" },
                            "method": { "type": "string", "enum": [method] },
                            "queryParams": Value::Object(query),
                        },
                        "required": ["type", "method"],
                        "additionalProperties": false,
                    }),
                )
            }
            Some(body_type) => {
                let example = self.input.clone().unwrap_or_else(|| json!({}));
                (
                    json!({
                        "type": "http",
                        "method": method,
                        "bodyType": body_type.as_str(),
                        "body": example,
                    }),
                    json!({
                        "type": "object",
                        "properties": {
                            "type": { "type": "string", "const": "http" },
                            "method": { "type": "string", "enum": [method] },
                            "bodyType": { "type": "string", "enum": ["json", "form-data", "text"] },
                            "body": input_schema,
                        },
                        "required": ["type", "method", "bodyType", "body"],
                        "additionalProperties": false,
                    }),
                )
            }
        };
        let mut schema_input = schema_input;
        if self.route_template.is_some() || self.path_params_schema.is_some() {
            let mut path_params = Map::new();
            path_params.insert("type".into(), json!("object"));
            match &self.path_params_schema {
                None => {}
                Some(Value::Object(s)) => path_params.extend(s.clone()),
                Some(_) => {
                    return Err(DiscoveryError::NotAnObject("the path parameters' schema").into());
                }
            }
            if let Some(props) = schema_input
                .get_mut("properties")
                .and_then(Value::as_object_mut)
            {
                props.insert("pathParams".into(), Value::Object(path_params));
            }
        }
        let mut info = Map::new();
        info.insert("input".into(), info_input);
        let mut properties = Map::new();
        properties.insert("input".into(), schema_input);
        match (&self.output_example, &self.output_schema) {
            (None, None) => {}
            (None, Some(_)) => return Err(DiscoveryError::OutputSchemaWithoutExample.into()),
            (Some(example), schema) => {
                if !truthy(example) {
                    return Err(DiscoveryError::EmptyOutputExample.into());
                }
                let mut example_schema = Map::new();
                example_schema.insert("type".into(), json!("object"));
                if let Some(s) = schema {
                    let Value::Object(s) = s else {
                        return Err(DiscoveryError::NotAnObject("the output schema").into());
                    };
                    example_schema.extend(s.clone());
                }
                if !example.is_object() && example_schema.get("type") == Some(&json!("object")) {
                    return Err(DiscoveryError::OutputExampleType.into());
                }
                info.insert(
                    "output".into(),
                    json!({ "type": "json", "example": example }),
                );
                properties.insert(
                    "output".into(),
                    json!({
                        "type": "object",
                        "properties": {
                            "type": { "type": "string" },
                            "example": Value::Object(example_schema),
                        },
                        "required": ["type"],
                    }),
                );
            }
        }
        let mut declaration = json!({
            "info": Value::Object(info),
            "schema": {
                "$schema": JSON_SCHEMA_2020_12,
                "type": "object",
                "properties": Value::Object(properties),
                "required": ["input"],
            },
        });
        if let (Some(template), Value::Object(d)) = (&self.route_template, &mut declaration) {
            check_template(template)?;
            d.insert("routeTemplate".into(), json!(template));
        }
        Ok(declaration)
    }
}

/// The reference's `isValidRouteTemplate` (`^/[a-zA-Z0-9_/:.\-~%]+$`, no `..`, no `://`),
/// without percent escapes, and with each `:name` a whole segment, so that a request's path
/// is matched segment by segment, in linear time, whatever it is.
fn check_template(template: &str) -> Result<(), DiscoveryError> {
    let bad = |why: &str| {
        Err(DiscoveryError::RouteTemplate(format!(
            "{template:?}: {why}"
        )))
    };
    if !template.starts_with('/') || template.len() < 2 {
        return bad("must start with '/'");
    }
    if !template
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_/:.-~".contains(&b))
    {
        return bad("only letters, digits and _ / : . - ~ are allowed");
    }
    if template.contains("..") || template.contains("://") {
        return bad("must not contain '..' or '://'");
    }
    let mut params = 0;
    for segment in template.split('/').skip(1) {
        if let Some(name) = segment.strip_prefix(':') {
            let mut chars = name.chars();
            let head = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if !head || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return bad("a parameter is a whole segment, ':name'");
            }
            params += 1;
        } else if segment.contains(':') {
            return bad("a parameter is a whole segment, ':name'");
        }
    }
    if params == 0 {
        return bad("has no ':name' parameter (a static route needs no template)");
    }
    Ok(())
}

/// The values of `template`'s parameters in `path` (raw, as the reference reads them), or
/// none when the path does not match (the reference then sends `{}`).
fn path_params(template: &str, path: &str) -> Map<String, Value> {
    let mut params = Map::new();
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return params,
            (Some(ts), Some(ps)) => match ts.strip_prefix(':') {
                Some(name) if !ps.is_empty() => {
                    params.insert(name.to_owned(), Value::String(ps.to_owned()));
                }
                None if ts == ps => {}
                _ => return Map::new(),
            },
            _ => return Map::new(),
        }
    }
}

/// Adds `info.input.pathParams` of this request to a challenge whose bazaar has a
/// `routeTemplate` (the per-request half of the reference's `enrichDeclaration`). Nothing to
/// do, and nothing allocated, for any other challenge.
pub(crate) fn enrich(challenge: &mut crate::proto::v2::PaymentRequired, path: &str) {
    let Some(bazaar) = challenge
        .extensions
        .as_mut()
        .and_then(|e| e.get_mut(BAZAAR))
    else {
        return;
    };
    let Some(template) = bazaar.get("routeTemplate").and_then(Value::as_str) else {
        return;
    };
    let params = path_params(template, path);
    if let Some(input) = bazaar
        .pointer_mut("/info/input")
        .and_then(Value::as_object_mut)
    {
        input.insert("pathParams".into(), Value::Object(params));
    }
}

/// JSON bytes of a payment besides what it echoes (payload, `accepted`, the resource URL),
/// with room to spare: 1,085 base64 bytes measured for an official `exact` client.
const PAYMENT_BASE_JSON: usize = 1_500;

/// Refuses a declaration that would push the official client's payment header, which echoes
/// the challenge's extensions and resource, over the layer's own `max_header_bytes` (every
/// payment would get 431).
pub(crate) fn check_echo(
    echoed_json: usize,
    max_header_bytes: usize,
) -> Result<(), DiscoveryError> {
    let header = (echoed_json + PAYMENT_BASE_JSON).div_ceil(3) * 4;
    if header > max_header_bytes {
        return Err(DiscoveryError::TooLarge {
            header,
            max: max_header_bytes,
        });
    }
    Ok(())
}

/// JavaScript truthiness, which decides whether the reference sends `output`.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// 1 to 32 printable ASCII characters (the spec's rule for `serviceName` and each tag).
fn printable(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Validates the service metadata of `resource` by the rules of `specs/extensions/bazaar.md`
/// ("Validation Rules"). Catalogues drop what fails them; the builder refuses it instead, so
/// what is configured is what is listed.
pub(crate) fn service_meta(
    name: Option<String>,
    tags: Option<Vec<String>>,
    icon_url: Option<String>,
) -> Result<ServiceMeta, DiscoveryError> {
    if name.as_deref().is_some_and(|n| !printable(n)) {
        return Err(DiscoveryError::ServiceName);
    }
    if let Some(tags) = &tags {
        if tags.len() > 5 {
            return Err(DiscoveryError::Tags(format!(
                "{} given, at most 5",
                tags.len()
            )));
        }
        for (i, tag) in tags.iter().enumerate() {
            if !printable(tag) {
                return Err(DiscoveryError::Tags(format!(
                    "{tag:?} is not 1 to 32 printable ASCII characters"
                )));
            }
            if tags[..i].iter().any(|t| t.eq_ignore_ascii_case(tag)) {
                return Err(DiscoveryError::Tags(format!(
                    "{tag:?} is given twice (ignoring case)"
                )));
            }
        }
    }
    if let Some(url) = &icon_url {
        icon_url_ok(url).map_err(DiscoveryError::IconUrl)?;
    }
    Ok(ServiceMeta {
        name,
        tags,
        icon_url,
    })
}

/// The spec's `iconUrl` rule, on ASCII hosts (a non-ASCII or percent-encoded host is
/// refused: the spec IDN-normalises and decodes it before its checks, and we do not carry an
/// IDN table to do the same).
fn icon_url_ok(url: &str) -> Result<(), &'static str> {
    if url.len() > 2048 {
        return Err("longer than 2048 bytes");
    }
    if url.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("contains control characters");
    }
    let uri: Uri = url.parse().map_err(|_| "not a URL")?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must be an absolute http:// or https:// URL");
    }
    let authority = uri.authority().ok_or("must have a host")?;
    if authority.as_str().contains('@') {
        return Err("must not carry user info");
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() || host.contains('%') {
        return Err("must have a plain host name");
    }
    if host.starts_with('[')
        || host.parse::<std::net::Ipv4Addr>().is_ok()
        || host.bytes().all(|b| b.is_ascii_digit())
        || (host.starts_with("0x") && host[2..].bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err("must not be an IP address");
    }
    if [
        "localhost",
        "localhost.localdomain",
        "ip6-localhost",
        "ip6-loopback",
    ]
    .contains(&host.as_str())
    {
        return Err("must not be a loopback name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_metadata_follows_the_specs_rules() {
        let ok = |n: Option<&str>, t: Option<&[&str]>, i: Option<&str>| {
            service_meta(
                n.map(Into::into),
                t.map(|t| t.iter().map(|s| (*s).to_owned()).collect()),
                i.map(Into::into),
            )
        };
        assert!(ok(Some("Weather API"), Some(&["weather", "forecast"]), None).is_ok());
        assert_eq!(ok(Some(""), None, None), Err(DiscoveryError::ServiceName));
        assert_eq!(
            ok(Some(&"x".repeat(33)), None, None),
            Err(DiscoveryError::ServiceName)
        );
        assert_eq!(
            ok(Some("météo"), None, None),
            Err(DiscoveryError::ServiceName)
        );
        assert!(ok(None, Some(&["a", "b", "c", "d", "e", "f"]), None).is_err());
        assert!(ok(None, Some(&["Weather", "weather"]), None).is_err());
        assert!(ok(None, Some(&["tab\there"]), None).is_err());
        for good in [
            "https://api.example.com/icon.png",
            "http://cdn.example.org/a.svg",
        ] {
            assert!(ok(None, None, Some(good)).is_ok(), "{good}");
        }
        for bad in [
            "ftp://example.com/icon.png",
            "data:image/png;base64,AAAA",
            "/icon.png",
            "https://user@example.com/icon.png",
            "https://127.0.0.1/icon.png",
            "https://[::1]/icon.png",
            "https://2130706433/icon.png",
            "https://0x7f000001/icon.png",
            "https://localhost/icon.png",
            "https://LOCALHOST:8080/icon.png",
            "https://%6cocalhost/icon.png",
        ] {
            assert!(ok(None, None, Some(bad)).is_err(), "{bad}");
        }
        assert!(
            ok(
                None,
                None,
                Some(&format!("https://a.example/{}", "x".repeat(2048)))
            )
            .is_err()
        );
    }

    #[test]
    fn route_templates_match_whole_segments() {
        for good in [
            "/weather/:city",
            "/w/:country/:city",
            "/users/:user_id/x.json",
            "/:a",
        ] {
            assert_eq!(check_template(good), Ok(()), "{good}");
        }
        for bad in [
            "weather/:city",
            "/weather",
            "/weather/:",
            "/weather/:1city",
            "/file/:name.json",
            "/w/:a:b",
            "/w/../:a",
            "/w/%2e%2e/:a",
            "/w/:a?x=1",
            "/w/\u{e9}/:a",
        ] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
        let p = |t, path| Value::Object(path_params(t, path));
        assert_eq!(p("/w/:city", "/w/paris"), json!({ "city": "paris" }));
        assert_eq!(
            p("/w/:c/:city", "/w/fr/paris"),
            json!({ "c": "fr", "city": "paris" })
        );
        assert_eq!(p("/w/:city", "/w/par%20is"), json!({ "city": "par%20is" }));
        for miss in ["/w/", "/w", "/w/paris/", "/x/paris", "/w/paris/x", ""] {
            assert_eq!(p("/w/:city", miss), json!({}), "{miss}");
        }
    }

    #[test]
    fn methods_match_the_input_kind() {
        assert!(Bazaar::query(Method::DELETE).is_ok());
        assert!(Bazaar::query(Method::POST).is_err());
        assert!(Bazaar::body(Method::PUT, BodyType::Text).is_ok());
        assert!(Bazaar::body(Method::GET, BodyType::Json).is_err());
    }

    #[test]
    fn outputs_the_reference_would_drop_are_refused() {
        for empty in [json!(null), json!(false), json!(0), json!("")] {
            assert!(Bazaar::get().output_example(empty).declaration().is_err());
        }
        assert!(
            Bazaar::get()
                .output_schema(json!({}))
                .declaration()
                .is_err()
        );
        assert!(
            Bazaar::get()
                .output_example(json!([1]))
                .declaration()
                .is_err()
        );
        assert!(
            Bazaar::get()
                .output_example(json!([1]))
                .output_schema(json!({ "type": "array" }))
                .declaration()
                .is_ok()
        );
        assert!(
            Bazaar::get()
                .input_example(json!([1]))
                .declaration()
                .is_err()
        );
    }
}
