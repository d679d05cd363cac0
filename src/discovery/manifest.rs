//! [`Manifest`]: the `/.well-known/x402` document, built from the layers' own challenges.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ACCESS_CONTROL_ALLOW_ORIGIN, ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{Map, Value};
use tower_service::Service;

use super::{BAZAAR, DiscoveryError};
use crate::PaymentLayer;
use crate::config::{Pricing, Shared};
use crate::error::ConfigError;
use crate::proto::v2::{PaymentRequirements, ResourceInfo};
use crate::response::Resource;

/// The `/.well-known/x402` discovery manifest of an app: every paid route registered with
/// [`ManifestBuilder::route`], described by the challenge its layer sends.
///
/// A tower service: `GET` answers the document (`application/json`, `Access-Control-Allow-
/// Origin: *`, cacheable for 5 minutes); every other method gets 405 with `Allow: GET`. It
/// reads nothing of the request but its method (no query, no body, no `Host`), and the
/// document is rendered once, at [`build`](ManifestBuilder::build).
///
/// # Shape
///
/// The drafts disagree, so the document serves each reader its fields (readers ignore unknown
/// fields, as every draft requires):
///
/// ```json
/// {
///   "x402Version": 2,
///   "lastUpdated": 1781555511,
///   "items": [{
///     "resource": { "url": "https://api.example.com/weather", "description": "…",
///                   "mimeType": "application/json", "serviceName": "…", "tags": ["…"] },
///     "type": "http",
///     "accepts": [ { "scheme": "exact", "network": "eip155:8453", "amount": "1000", "…": "…" } ],
///     "input": { "method": "GET", "queryParams": { "…JSON Schema…": "" },
///                "routeTemplate": "/weather/:city", "pathParams": { "…JSON Schema…": "" } },
///     "output": { "mimeType": "application/json", "example": { "…": "…" } },
///     "requires": ["payment-identifier"],
///     "extensions": { "bazaar": { "info": { "…": "…" }, "schema": { "…": "…" } } }
///   }],
///   "version": 1,
///   "resources": ["https://api.example.com/weather", "DELETE https://api.example.com/cache"]
/// }
/// ```
///
/// - `x402Version`, `lastUpdated`, `items` (with `resource`, `type`, `accepts`, `input`,
///   `output`, `requires`): the per-origin manifest of x402-foundation/x402
///   `specs/extensions/well-known-discovery.md` and its generator
///   (`x402HTTPResourceServer.buildDiscoveryManifest` in `typescript/packages/core`), whose
///   lifting of the bazaar contract into `input`/`output` is followed field by field. That
///   draft serves the same document at `/.well-known/x402.json`: mount it at both paths
///   ([`Manifest::PATH`], [`Manifest::PATH_JSON`]).
/// - `extensions.bazaar` per item: the 402's declaration, byte for byte the same value, as
///   the facilitators' `GET /discovery/resources` items echo it (`DiscoveryResource.extensions`
///   of `@x402/extensions`): a catalogue that speaks bazaar ingests it without a payment.
/// - `version: 1` and `resources` (URLs; `METHOD URL` for methods other than GET and POST):
///   the discovery document that x402scan's crawler (`@agentcash/discovery`) reads at
///   `/.well-known/x402`, then probes each URL for its 402. `specs/extensions/discovery.md`
///   wants `resources` as objects instead; where the two disagree the manifest serves what
///   the deployed crawler reads.
///
/// `accepts` are the route's 402 `accepts` without the per-challenge id of
/// [bound challenges](crate::challenge) (it names one request and expires); other extensions
/// (a sign-in nonce, payment identifiers) are runtime and only named in `requires`, as the
/// draft says. The live 402 stays authoritative.
///
/// # Routes priced by a function
///
/// A layer with [`pricing`](crate::PaymentLayerBuilder::pricing) is asked at build time, with
/// a request of the registered method and path (origin from the layer's `resource_base` or
/// [`ManifestBuilder::origin`], no other header): the manifest lists what a request to that
/// path is charged. A function that reads more than method and path (headers, query) may
/// charge a live request otherwise; a route it lets through for free cannot be registered.
/// Rebuild the manifest when prices change.
///
/// Resource URLs are never taken from a request's `Host` (`discovery.md`: a manifest that
/// does would advertise any caller's host): each layer's `resource_base`, else the
/// manifest's [`origin`](ManifestBuilder::origin).
#[derive(Clone, Debug)]
pub struct Manifest {
    body: Bytes,
}

impl Manifest {
    /// Where discovery crawlers look: `/.well-known/x402`.
    pub const PATH: &'static str = "/.well-known/x402";
    /// Where the x402-foundation draft puts it: `/.well-known/x402.json`.
    pub const PATH_JSON: &'static str = "/.well-known/x402.json";

    /// Starts a manifest; register routes, then [`build`](ManifestBuilder::build).
    pub fn builder() -> ManifestBuilder {
        ManifestBuilder::default()
    }

    /// The document as served.
    pub fn json(&self) -> &Bytes {
        &self.body
    }
}

/// Builder of a [`Manifest`].
#[derive(Default)]
#[must_use]
pub struct ManifestBuilder {
    origin: Option<String>,
    routes: Vec<(Method, String, Arc<Shared>)>,
    description: Option<String>,
    instructions: Option<String>,
    ownership_proofs: Vec<String>,
}

impl std::fmt::Debug for ManifestBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestBuilder")
            .field("origin", &self.origin)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl ManifestBuilder {
    /// The public origin, `https://api.example.com` (no path), for the resource URLs of routes
    /// whose layer has no `resource_base` (default none: every layer must have one).
    pub fn origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into().trim_end_matches('/').to_owned());
        self
    }

    /// Lists the route `method path`, paid through `layer` (the layer that guards it, so the
    /// manifest and the 402 come from one configuration). `path` is the path a request uses,
    /// e.g. `/weather`.
    pub fn route(mut self, method: Method, path: impl Into<String>, layer: &PaymentLayer) -> Self {
        self.routes
            .push((method, path.into(), Arc::clone(layer.shared())));
        self
    }

    setters! {
        /// A one-line description of the service (`description`, default none).
        pub fn description(text: impl Into<String>) => description = Some(text.into());

        /// Free-text guidance for agents (`instructions` of x402scan's document, default none).
        pub fn instructions(text: impl Into<String>) => instructions = Some(text.into());
    }

    /// Adds an ownership proof (`ownershipProofs` of x402scan's document: a signature over
    /// the origin by the `payTo` key, which x402scan verifies; none by default).
    pub fn ownership_proof(mut self, proof: impl Into<String>) -> Self {
        self.ownership_proofs.push(proof.into());
        self
    }

    /// Renders the document.
    ///
    /// # Errors
    /// [`DiscoveryError`]: no route, a path or origin that does not parse, a route without a
    /// resource origin, a route its pricing function makes free, a route registered with
    /// another method than its bazaar declares.
    pub fn build(self) -> Result<Manifest, ConfigError> {
        if self.routes.is_empty() {
            return Err(DiscoveryError::NoRoutes.into());
        }
        if let Some(origin) = &self.origin {
            let ok = origin.parse::<Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && u.path_and_query().is_none_or(|p| p.as_str() == "/")
            });
            if !ok {
                return Err(DiscoveryError::Origin(origin.clone()).into());
            }
        }
        let mut items = Vec::with_capacity(self.routes.len());
        let mut resources = Vec::with_capacity(self.routes.len());
        for (method, path, shared) in &self.routes {
            let item = item(self.origin.as_deref(), method, path, shared)?;
            resources.push(if *method == Method::GET || *method == Method::POST {
                item.resource.url.clone()
            } else {
                format!("{method} {}", item.resource.url)
            });
            items.push(item);
        }
        let last_updated = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let doc = Document {
            x402_version: 2,
            last_updated,
            items,
            version: 1,
            resources,
            description: self.description,
            ownership_proofs: self.ownership_proofs,
            instructions: self.instructions,
        };
        // Serializing plain data into a Vec cannot fail.
        let body = serde_json::to_vec(&doc).unwrap_or_default();
        Ok(Manifest { body: body.into() })
    }
}

/// One route's entry: its challenge, built by the function that builds its 402, projected.
fn item(
    origin: Option<&str>,
    method: &Method,
    path: &str,
    shared: &Shared,
) -> Result<Item, DiscoveryError> {
    let route = || format!("{method} {path}");
    if !path.starts_with('/') || path.parse::<Uri>().is_err() {
        return Err(DiscoveryError::Path(path.to_owned()));
    }
    if shared.resource_base.is_none() && origin.is_none() {
        return Err(DiscoveryError::NoOrigin(route()));
    }
    // The request a client would send: the method and path, on the configured origin.
    let mut request = Request::builder().method(method.clone());
    request = match origin {
        Some(origin) => request.uri(format!("{origin}{path}")),
        None => request.uri(path),
    };
    let (parts, ()) = request
        .body(())
        .map_err(|_| DiscoveryError::Path(path.to_owned()))?
        .into_parts();
    let options = match &shared.pricing {
        Pricing::Static(options) => options.clone(),
        Pricing::Dynamic(price) => price(&parts).ok_or_else(|| DiscoveryError::Free(route()))?,
    };
    let url = Resource::of(&parts).url(shared);
    let (mut challenge, _) = crate::response::challenge(shared, &options, &url, method, None);
    super::enrich(&mut challenge, parts.uri.path());
    let extensions = challenge.extensions.unwrap_or_default();
    let bazaar = extensions.get(BAZAAR).cloned();
    if let Some(declared) = bazaar
        .as_ref()
        .and_then(|b| b.pointer("/info/input/method"))
        .and_then(Value::as_str)
        && declared != method.as_str()
    {
        return Err(DiscoveryError::MethodMismatch {
            route: path.to_owned(),
            registered: method.to_string(),
            declared: declared.to_owned(),
        });
    }
    let accepts = challenge.accepts.into_iter().map(unbound).collect();
    let resource = ResourceInfo {
        description: challenge.resource.description.filter(|d| !d.is_empty()),
        mime_type: challenge.resource.mime_type.filter(|m| !m.is_empty()),
        ..challenge.resource
    };
    let (input, output) = lift(method, bazaar.as_ref(), resource.mime_type.as_deref());
    let requires: Vec<String> = extensions
        .keys()
        .filter(|k| *k != BAZAAR)
        .cloned()
        .collect();
    Ok(Item {
        resource,
        kind: bazaar
            .as_ref()
            .and_then(|b| b.pointer("/info/input/type"))
            .and_then(Value::as_str)
            .unwrap_or("http")
            .to_owned(),
        accepts,
        input,
        output,
        requires: (!requires.is_empty()).then_some(requires),
        extensions: bazaar.map(|b| {
            let mut m = Map::new();
            m.insert(BAZAAR.to_owned(), b);
            m
        }),
    })
}

/// A requirement as advertised: without the challenge id of one 402.
fn unbound(mut req: PaymentRequirements) -> PaymentRequirements {
    if let Some(extra) = req.extra.as_mut() {
        extra.remove(crate::challenge::EXTRA_FIELD);
        if extra.is_empty() {
            req.extra = None;
        }
    }
    req
}

/// The bazaar contract lifted into `input`/`output`, as the reference's
/// `liftDiscoveryContract` does: the declared JSON Schemas rather than the examples, the
/// envelope dropped.
fn lift(
    method: &Method,
    bazaar: Option<&Value>,
    mime_type: Option<&str>,
) -> (Input, Option<Output>) {
    let mut input = Input {
        method: method.to_string(),
        ..Input::default()
    };
    let Some(bazaar) = bazaar else {
        return (input, None);
    };
    let info = bazaar.pointer("/info/input");
    let schema = bazaar.pointer("/schema/properties/input/properties");
    let str_of = |v: Option<&Value>, key: &str| {
        v.and_then(|v| v.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let object_of = |v: Option<&Value>, key: &str| {
        v.and_then(|v| v.get(key))
            .filter(|v| v.is_object())
            .cloned()
    };
    if let Some(m) = str_of(info, "method") {
        input.method = m;
    }
    input.body_type = str_of(info, "bodyType");
    input.body = object_of(schema, "body").or_else(|| object_of(info, "body"));
    input.path_params = object_of(schema, "pathParams");
    input.route_template = bazaar
        .get("routeTemplate")
        .and_then(Value::as_str)
        .map(str::to_owned);
    input.query_params = object_of(schema, "queryParams").filter(|q| {
        q.get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| !p.is_empty())
    });
    let output = bazaar.pointer("/info/output").and_then(|out| {
        let example = out.get("example").cloned();
        (mime_type.is_some() || example.is_some()).then(|| Output {
            mime_type: mime_type.map(str::to_owned),
            example,
        })
    });
    (input, output)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    x402_version: u8,
    last_updated: u64,
    items: Vec<Item>,
    version: u8,
    resources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ownership_proofs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instructions: Option<String>,
}

#[derive(Serialize)]
struct Item {
    resource: ResourceInfo,
    #[serde(rename = "type")]
    kind: String,
    accepts: Vec<PaymentRequirements>,
    input: Input,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<Output>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requires: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extensions: Option<Map<String, Value>>,
}

#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Input {
    method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_params: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query_params: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route_template: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Output {
    #[serde(skip_serializing_if = "Option::is_none")]
    mime_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    example: Option<Value>,
}

impl<B> Service<Request<B>> for Manifest {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Only the method is read: the body is dropped unread, the query ignored.
        let res = if req.method() == Method::GET {
            let mut res = Response::new(Full::new(self.body.clone()));
            let headers = res.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            // Public data (discovery.md: CORS SHOULD allow GET from any origin).
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            headers.insert(
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            res
        } else {
            let mut res = Response::new(Full::new(Bytes::new()));
            *res.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            res
        };
        ready(Ok(res))
    }
}
