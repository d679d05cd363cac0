//! Discovery: the `bazaar` extension in the 402 and the `/.well-known/x402` manifest. The
//! manifest and the 402 of every route must agree, and the official packages must read both.
#![cfg(feature = "test-util")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{BASE, PAY_TO, Reply, clock, process, send, unpriced_builder};
use http::{HeaderValue, Method, Request, StatusCode};
use serde_json::{Value, json};
use tower_x402::discovery::{Bazaar, BodyType, DiscoveryError, Manifest};
use tower_x402::error::ConfigError;
use tower_x402::{Asset, ChallengeKeys, PaymentLayer, PaymentOption};

/// One paid route of the test app: how it is called, and the bazaar declaration it was given
/// in the `@x402/extensions` form (`declareDiscoveryExtension`'s input), if any.
struct Route {
    method: Method,
    /// As registered in the manifest (a template for a route with path parameters).
    path: &'static str,
    /// A request path of the route, for a templated one.
    concrete: Option<&'static str>,
    declare: Option<Value>,
}

fn weather_bazaar() -> (Bazaar, Value) {
    let example = json!({ "city": "Paris" });
    let schema = json!({ "properties": { "city": { "type": "string" } }, "required": ["city"] });
    let output = json!({ "city": "Paris", "weather": "sunny", "temperature": 21 });
    let bazaar = Bazaar::get()
        .input_example(example.clone())
        .input_schema(schema.clone())
        .output_example(output.clone());
    let declare =
        json!({ "input": example, "inputSchema": schema, "output": { "example": output } });
    (bazaar, declare)
}

fn search_bazaar() -> (Bazaar, Value) {
    let example = json!({ "query": "rust", "limit": 5 });
    let schema = json!({
        "type": "object",
        "properties": { "query": { "type": "string" }, "limit": { "type": "integer" } },
        "required": ["query"]
    });
    let output = json!({ "results": [{ "title": "The Book" }] });
    let output_schema =
        json!({ "properties": { "results": { "type": "array" } }, "required": ["results"] });
    let bazaar = Bazaar::post(BodyType::Json)
        .input_example(example.clone())
        .input_schema(schema.clone())
        .output_example(output.clone())
        .output_schema(output_schema.clone());
    let declare = json!({
        "bodyType": "json",
        "input": example,
        "inputSchema": schema,
        "output": { "example": output, "schema": output_schema }
    });
    (bazaar, declare)
}

fn city_bazaar() -> (Bazaar, Value) {
    let schema = json!({ "properties": { "city": { "type": "string" } }, "required": ["city"] });
    let output = json!({ "city": "paris", "weather": "rainy" });
    let bazaar = Bazaar::get()
        .route_template("/weather/:city")
        .path_params_schema(schema.clone())
        .output_example(output.clone());
    let declare = json!({ "pathParamsSchema": schema, "output": { "example": output } });
    (bazaar, declare)
}

/// Four paid routes with different prices and methods (one priced by a function, one bound),
/// the manifest of all three, and the routes as registered.
fn app(bind: bool) -> (Router, Manifest, Vec<Route>) {
    let clock = clock();
    let usdc = Asset::usdc_base_sepolia();
    let (weather_b, weather_d) = weather_bazaar();
    let mut weather = unpriced_builder(&clock)
        .pay_to(PAY_TO)
        .price("$0.001")
        .network(tower_x402::Network::BASE_SEPOLIA)
        .resource_base(BASE)
        .description("Current weather for a city")
        .mime_type("application/json")
        .service_name("Test Weather")
        .tags(["weather", "forecast"])
        .icon_url("https://api.example.com/icon.png")
        .bazaar(weather_b);
    // Bound with a key of ours, or not bound at all (the other routes are bound by default).
    weather = if bind {
        weather.bind_challenges(ChallengeKeys::new([7; 32]).with_clock(clock.clone()))
    } else {
        weather.no_challenge_binding()
    };
    let weather = weather.build().unwrap();
    let (search_b, search_d) = search_bazaar();
    // The crate's defaults (challenges bound with a key of this process).
    let search = PaymentLayer::builder()
        .accept(PaymentOption::exact(&usdc, "$0.01", PAY_TO).unwrap())
        .resource_base(BASE)
        .description("Search the catalogue")
        .mime_type("application/json")
        .bazaar(search_b)
        .build()
        .unwrap();
    // Priced per path by a function: the manifest asks it with the registered path.
    let dear: Arc<[PaymentOption]> =
        Arc::new([PaymentOption::exact(&usdc, "$0.05", PAY_TO).unwrap()]);
    let premium = unpriced_builder(&clock)
        .pricing(move |parts| (parts.uri.path() != "/premium/free").then(|| dear.clone()))
        .resource_base(BASE)
        .build()
        .unwrap();
    let (city_b, city_d) = city_bazaar();
    let city = unpriced_builder(&clock)
        .accept(PaymentOption::exact(&usdc, "$0.002", PAY_TO).unwrap())
        .resource_base(BASE)
        .mime_type("application/json")
        .bazaar(city_b)
        .build()
        .unwrap();
    let manifest = Manifest::builder()
        .route(Method::GET, "/weather", &weather)
        .route(Method::POST, "/search", &search)
        .route(Method::GET, "/premium/report", &premium)
        .route(Method::GET, "/weather/:city", &city)
        .description("tower-x402 discovery test")
        .build()
        .unwrap();
    let ok = || async { "{}" };
    let router = Router::new()
        .route("/weather", get(ok).route_layer(weather))
        .route("/search", post(ok).route_layer(search))
        .route("/premium/{name}", get(ok).route_layer(premium))
        .route("/weather/{city}", get(ok).route_layer(city))
        .route_service(Manifest::PATH, manifest.clone())
        .route_service(Manifest::PATH_JSON, manifest.clone());
    let routes = vec![
        Route {
            method: Method::GET,
            path: "/weather",
            concrete: None,
            declare: Some(weather_d),
        },
        Route {
            method: Method::POST,
            path: "/search",
            concrete: None,
            declare: Some(search_d),
        },
        Route {
            method: Method::GET,
            path: "/premium/report",
            concrete: None,
            declare: None,
        },
        Route {
            method: Method::GET,
            path: "/weather/:city",
            concrete: Some("/weather/paris"),
            declare: Some(city_d),
        },
    ];
    (router, manifest, routes)
}

fn req(method: Method, path: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("{BASE}{path}"))
        .body(Body::empty())
        .unwrap()
}

/// The unpaid 402 of `route`: its `PAYMENT-REQUIRED` header and that header decoded as JSON.
async fn challenge(app: &Router, route: &Route, path: &str) -> (String, Value) {
    let reply = send(app, req(route.method.clone(), path)).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED, "{}", route.path);
    let header = reply.header("payment-required").unwrap().to_owned();
    let doc = serde_json::from_slice(&STANDARD.decode(&header).unwrap()).unwrap();
    (header, doc)
}

async fn manifest_doc(app: &Router, path: &str) -> (Reply, Value) {
    let reply = send(app, req(Method::GET, path)).await;
    let doc = reply.json();
    (reply, doc)
}

/// A 402 requirement as the manifest advertises it: without the one-challenge id.
fn unbound(mut accept: Value) -> Value {
    if let Some(extra) = accept.get_mut("extra").and_then(Value::as_object_mut) {
        extra.remove("challenge");
    }
    accept
}

async fn manifest_agrees_with_402s(bind: bool) {
    let (app, _, routes) = app(bind);
    let (reply, doc) = manifest_doc(&app, Manifest::PATH).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    assert_eq!(doc["x402Version"], 2);
    assert_eq!(doc["version"], 1);
    assert!(doc["lastUpdated"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(doc["description"], "tower-x402 discovery test");
    let items = doc["items"].as_array().unwrap();
    assert_eq!(items.len(), routes.len());
    let mut urls = Vec::new();
    for (route, item) in routes.iter().zip(items) {
        // The path as registered: what a crawler of the manifest probes.
        let (_, ch) = challenge(&app, route, route.path).await;
        let what = route.path;
        // Resource: URL, description, MIME type and service metadata, as in the 402.
        assert_eq!(item["resource"], ch["resource"], "{what}");
        assert_eq!(
            item["resource"]["url"],
            format!("{BASE}{}", route.path),
            "{what}"
        );
        urls.push(item["resource"]["url"].as_str().unwrap().to_owned());
        // Accepts: the same requirements, field by field and whole.
        let live: Vec<Value> = ch["accepts"]
            .as_array()
            .unwrap()
            .iter()
            .cloned()
            .map(unbound)
            .collect();
        let listed = item["accepts"].as_array().unwrap();
        assert_eq!(listed.len(), live.len(), "{what}");
        for (l, c) in listed.iter().zip(&live) {
            for field in [
                "scheme",
                "network",
                "amount",
                "asset",
                "payTo",
                "maxTimeoutSeconds",
            ] {
                assert_eq!(l[field], c[field], "{what}: {field}");
            }
            assert!(
                l["extra"].get("challenge").is_none(),
                "{what}: no challenge id listed"
            );
        }
        assert_eq!(listed, &live, "{what}");
        if route.path == "/weather" {
            let id = &ch["accepts"][0]["extra"]["challenge"];
            assert_eq!(id.is_string(), bind, "the 402 is bound iff asked: {id}");
        } else if route.path == "/search" {
            // Bound by default.
            assert!(ch["accepts"][0]["extra"]["challenge"].is_string(), "{what}");
        }
        // Bazaar: the 402's declaration, the same value; its contract lifted into input/output.
        assert_eq!(item["input"]["method"], route.method.as_str(), "{what}");
        assert_eq!(item["type"], "http");
        match &route.declare {
            Some(_) => {
                let bazaar = &ch["extensions"]["bazaar"];
                assert_eq!(item["extensions"]["bazaar"], *bazaar, "{what}");
                assert_eq!(bazaar["info"]["input"]["method"], route.method.as_str());
                assert_eq!(
                    item["output"]["example"],
                    bazaar["info"]["output"]["example"]
                );
                assert_eq!(item["output"]["mimeType"], "application/json");
                let props = &bazaar["schema"]["properties"]["input"]["properties"];
                match route.path {
                    "/search" => {
                        assert_eq!(item["input"]["bodyType"], "json");
                        assert_eq!(item["input"]["body"], props["body"]);
                    }
                    "/weather" => {
                        assert_eq!(item["input"]["queryParams"], props["queryParams"]);
                    }
                    _ => {
                        assert_eq!(item["input"]["routeTemplate"], route.path);
                        assert_eq!(bazaar["routeTemplate"], route.path);
                        assert_eq!(item["input"]["pathParams"], props["pathParams"]);
                        assert_eq!(props["pathParams"]["required"], json!(["city"]));
                        assert!(item["input"].get("queryParams").is_none());
                    }
                }
            }
            None => {
                assert!(ch.get("extensions").is_none(), "{what}");
                assert!(item.get("extensions").is_none() && item.get("output").is_none());
            }
        }
        assert_eq!(
            item["accepts"][0]["amount"],
            match route.path {
                "/weather" => "1000",
                "/search" => "10000",
                "/weather/:city" => "2000",
                _ => "50000",
            }
        );
    }
    // x402scan's list: every URL (GET and POST need no method prefix).
    assert_eq!(doc["resources"], json!(urls));
    // The draft's path serves the same document.
    let (_, again) = manifest_doc(&app, Manifest::PATH_JSON).await;
    assert_eq!(again, doc);
}

#[tokio::test]
async fn manifest_lists_every_route_as_its_402_charges_it() {
    manifest_agrees_with_402s(false).await;
}

#[tokio::test]
async fn manifest_lists_bound_routes_without_their_challenge_id() {
    manifest_agrees_with_402s(true).await;
}

#[tokio::test]
async fn a_route_without_discovery_metadata_sends_the_same_challenge() {
    let clock = clock();
    let plain = unpriced_builder(&clock)
        .pay_to(PAY_TO)
        .price("$0.001")
        .network(tower_x402::Network::BASE_SEPOLIA)
        .description("Current weather for a city")
        .build()
        .unwrap();
    let app = Router::new().route("/weather", get(|| async { "{}" }).route_layer(plain));
    let reply = send(&app, req(Method::GET, "/weather")).await;
    let header = reply.header("payment-required").unwrap();
    let doc: Value = serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap();
    assert!(doc.get("extensions").is_none(), "{doc}");
    let keys: Vec<&str> = doc["resource"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["description", "url"]);
}

#[tokio::test]
async fn manifest_takes_nothing_but_get() {
    let (app, manifest, _) = app(false);
    for method in [
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
    ] {
        let mut r = req(method.clone(), Manifest::PATH);
        *r.body_mut() = Body::from(r#"{"items": []}"#);
        let reply = send(&app, r).await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(reply.header("allow"), Some("GET"), "{method}");
        assert!(reply.body.is_empty(), "{method}");
    }
    // Query, a hostile Host and a body change nothing: the document is the one built.
    let mut r = Request::get(format!("{}?limit=1&offset=9&x=%00", Manifest::PATH))
        .header("host", "evil.example")
        .header("x-forwarded-host", "evil.example")
        .body(Body::from(vec![0u8; 1 << 16]))
        .unwrap();
    r.headers_mut()
        .insert("accept", HeaderValue::from_static("text/html"));
    let reply = send(&app, r).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body, manifest.json());
    assert!(!String::from_utf8_lossy(&reply.body).contains("evil"));
}

#[test]
fn manifests_that_would_lie_are_not_built() {
    let clock = clock();
    let layer = |base: bool| {
        let b = unpriced_builder(&clock)
            .pay_to(PAY_TO)
            .price("$0.001")
            .network(tower_x402::Network::BASE_SEPOLIA)
            .bazaar(Bazaar::get());
        if base { b.resource_base(BASE) } else { b }
            .build()
            .unwrap()
    };
    let err = |b: tower_x402::discovery::ManifestBuilder| match b.build() {
        Err(ConfigError::Discovery(e)) => e,
        other => panic!("expected a discovery error, got {other:?}"),
    };
    assert_eq!(err(Manifest::builder()), DiscoveryError::NoRoutes);
    // No origin: never guessed from a request's Host.
    assert!(matches!(
        err(Manifest::builder().route(Method::GET, "/weather", &layer(false))),
        DiscoveryError::NoOrigin(_)
    ));
    let ok = Manifest::builder()
        .origin("https://api.example.com")
        .route(Method::GET, "/weather", &layer(false))
        .build()
        .unwrap();
    let doc: Value = serde_json::from_slice(ok.json()).unwrap();
    assert_eq!(
        doc["items"][0]["resource"]["url"],
        "https://api.example.com/weather"
    );
    for bad in [
        "api.example.com",
        "ftp://api.example.com",
        "https://api.example.com/v1",
    ] {
        assert!(
            matches!(
                err(Manifest::builder()
                    .origin(bad)
                    .route(Method::GET, "/weather", &layer(false))),
                DiscoveryError::Origin(_)
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        err(Manifest::builder().route(Method::GET, "weather", &layer(true))),
        DiscoveryError::Path(_)
    ));
    // Registered as POST, declared GET: one of the two is wrong.
    assert!(matches!(
        err(Manifest::builder().route(Method::POST, "/weather", &layer(true))),
        DiscoveryError::MethodMismatch { .. }
    ));
    // A path its pricing function lets through for free is not a paid route.
    let opts: Arc<[PaymentOption]> =
        Arc::new([PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.05", PAY_TO).unwrap()]);
    let priced = unpriced_builder(&clock)
        .pricing(move |p| (p.uri.path() != "/free").then(|| opts.clone()))
        .resource_base(BASE)
        .build()
        .unwrap();
    assert!(matches!(
        err(Manifest::builder().route(Method::GET, "/free", &priced)),
        DiscoveryError::Free(_)
    ));
    // Service metadata that catalogues would drop is refused when the layer is built.
    let meta =
        |b: tower_x402::PaymentLayerBuilder| matches!(b.build(), Err(ConfigError::Discovery(_)));
    let base = || {
        unpriced_builder(&clock)
            .pay_to(PAY_TO)
            .price("$0.001")
            .network(tower_x402::Network::BASE_SEPOLIA)
    };
    assert!(meta(base().service_name("x".repeat(40))));
    assert!(meta(base().tags(["a", "A"])));
    assert!(meta(base().icon_url("http://localhost/icon.png")));
    assert!(meta(
        base().bazaar(Bazaar::get().output_example(json!(null)))
    ));
    // A declaration that would push every payment echoing it over the layer's header limit.
    let big = || Bazaar::get().output_example(json!({ "text": "x".repeat(6000) }));
    assert!(matches!(
        base().bazaar(big()).build(),
        Err(ConfigError::Discovery(DiscoveryError::TooLarge {
            max: 8192,
            ..
        }))
    ));
    assert!(
        base()
            .bazaar(big())
            .max_header_bytes(16 * 1024)
            .build()
            .is_ok()
    );
}

/// The official packages (`tests/clients/bazaar.mjs`): our bazaar equals the reference's own
/// for the same declaration, validates, and is what a cataloguing facilitator extracts from
/// an official client's payment; the manifest's accepts and bazaar parse and validate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_packages_read_our_bazaar_and_manifest() {
    let Some(deps) = process::test_deps(
        "official_packages_read_our_bazaar_and_manifest",
        &["node/node_modules/@x402/extensions/package.json"],
    ) else {
        return;
    };
    let (app, manifest, routes) = app(false);
    let mut inputs = Vec::new();
    for route in routes.iter().filter(|r| r.declare.is_some()) {
        let path = route.concrete.unwrap_or(route.path);
        let (header, _) = challenge(&app, route, path).await;
        inputs.push(json!({
            "header": header,
            "method": route.method.as_str(),
            "path": path,
            "pattern": route.path,
            "declare": route.declare,
        }));
    }
    let manifest: Value = serde_json::from_slice(manifest.json()).unwrap();
    let file = std::env::temp_dir().join(format!("tower-x402-bazaar-{}.json", std::process::id()));
    std::fs::write(
        &file,
        json!({ "routes": inputs, "manifest": manifest }).to_string(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("node");
    cmd.arg(process::repo().join("tests/clients/bazaar.mjs"))
        .arg(&file)
        .env("X402_TEST_DEPS", &deps);
    let r = tokio::task::spawn_blocking(move || {
        process::run_json(&mut cmd, Duration::from_secs(60), String::new)
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&file);
    let checked = r["routes"].as_array().unwrap();
    assert_eq!(checked.len(), 3, "{r}");
    let declared = routes.iter().filter(|r| r.declare.is_some());
    for (c, route) in checked.iter().zip(declared) {
        let what = route.concrete.unwrap_or(route.path);
        assert_eq!(c["schemaOk"], true, "{what}: {c}");
        assert_eq!(
            c["sameAsReference"], true,
            "{what}: ours {} reference {}",
            c["ours"], c["reference"]
        );
        assert_eq!(c["valid"]["valid"], true, "{what}: {c}");
        assert_eq!(c["spec"]["valid"], true, "{what}: {c}");
        let d = &c["discovered"];
        // Catalogued under the template when there is one.
        assert_eq!(
            d["resourceUrl"],
            format!("{BASE}{}", route.path),
            "{what}: {c}"
        );
        assert_eq!(d["method"], route.method.as_str(), "{what}");
        assert_eq!(d["x402Version"], 2);
        assert_eq!(d["mimeType"], "application/json");
        assert_eq!(d["discoveryInfo"], c["ours"]["info"], "{what}");
    }
    let weather = &checked[0];
    assert_eq!(
        weather["service"],
        json!({ "serviceName": "Test Weather", "tags": ["weather", "forecast"],
                "iconUrl": "https://api.example.com/icon.png" })
    );
    assert_eq!(
        weather["discovered"]["description"],
        "Current weather for a city"
    );
    assert_eq!(
        weather["discovered"]["tags"],
        json!(["weather", "forecast"])
    );
    assert_eq!(weather["discovered"]["serviceName"], "Test Weather");
    assert_eq!(
        weather["discovered"]["discoveryInfo"]["input"]["queryParams"],
        json!({ "city": "Paris" })
    );
    assert_eq!(
        checked[1]["discovered"]["discoveryInfo"]["input"]["bodyType"],
        "json"
    );
    // A templated route: catalogued once, under its template, with this request's values.
    let city = &checked[2]["discovered"];
    assert_eq!(city["routeTemplate"], "/weather/:city");
    assert_eq!(city["resourceUrl"], format!("{BASE}/weather/:city"));
    assert_eq!(
        city["discoveryInfo"]["input"]["pathParams"],
        json!({ "city": "paris" })
    );
    let items = r["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{r}");
    for item in items {
        assert_eq!(item["acceptsOk"], true, "{item}");
    }
    assert_eq!(items[0]["bazaarValid"], true);
    assert_eq!(items[1]["bazaarValid"], true);
    assert_eq!(items[2]["bazaarValid"], Value::Null);
    assert_eq!(items[3]["bazaarValid"], true);
}

/// The per-thread challenge cache must tell apart layers that differ only in discovery
/// metadata (same URL, same price): each 402 carries its own layer's tags and bazaar.
#[tokio::test(flavor = "current_thread")]
async fn cached_challenges_keep_each_layers_metadata() {
    let clock = clock();
    let layer = |tag: &str, bazaar: Bazaar| {
        unpriced_builder(&clock)
            .pay_to(PAY_TO)
            .price("$0.001")
            .network(tower_x402::Network::BASE_SEPOLIA)
            .tags([tag])
            .bazaar(bazaar)
            .build()
            .unwrap()
    };
    let app = |tag: &str, bazaar: Bazaar| {
        Router::new().route(
            "/weather",
            get(|| async { "{}" }).route_layer(layer(tag, bazaar)),
        )
    };
    // Differ only in tags; only in the bazaar.
    let a = app("a", Bazaar::get());
    let b = app("b", Bazaar::get());
    let c = app("a", Bazaar::query(Method::DELETE).unwrap());
    for _ in 0..2 {
        for (app, tag, method) in [(&a, "a", "GET"), (&b, "b", "GET"), (&c, "a", "DELETE")] {
            let reply = send(app, req(Method::GET, "/weather")).await;
            let doc: Value = serde_json::from_slice(
                &STANDARD
                    .decode(reply.header("payment-required").unwrap())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(doc["resource"]["tags"], json!([tag]));
            assert_eq!(
                doc["extensions"]["bazaar"]["info"]["input"]["method"],
                method
            );
        }
    }
}

/// The official v2 client (`tests/clients/pay.mjs`) pays a route that declares bazaar and
/// service metadata: one handler run, its payment echoes them (what a cataloguing facilitator
/// reads), the echo does not break verification, and a replay is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_client_pays_a_discoverable_route_and_echoes_it() {
    let Some(deps) = process::test_deps(
        "official_client_pays_a_discoverable_route_and_echoes_it",
        &["node/node_modules/@x402/fetch/package.json"],
    ) else {
        return;
    };
    let hits = common::Hits::new();
    let (weather, _) = weather_bazaar();
    // Real clocks: the JS client signs with the wall clock.
    let layer = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price("$0.001")
        .network(tower_x402::Network::BASE_SEPOLIA)
        .mime_type("application/json")
        .service_name("Test Weather")
        .tags(["weather"])
        .bazaar(weather)
        .nonce_store(tower_x402::MemoryNonceStore::new())
        .build()
        .unwrap();
    let (addr, server) = common::serve(common::app(&hits).route_layer(layer)).await;
    let url = format!("http://{addr}/paid");
    let mut cmd = std::process::Command::new("node");
    cmd.arg(process::repo().join("tests/clients/pay.mjs"))
        .args(["--client", "v2", "--url", &url, "--replay"])
        .env("X402_TEST_DEPS", &deps);
    let r = tokio::task::spawn_blocking(move || {
        process::run_json(&mut cmd, Duration::from_secs(60), String::new)
    })
    .await
    .unwrap();
    server.abort();
    assert_eq!(r["status"], 200, "{r:#}");
    assert_eq!(hits.get(), 1);
    let sent: Value = serde_json::from_slice(
        &STANDARD
            .decode(r["paymentHeader"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        sent["extensions"]["bazaar"]["info"]["input"]["method"], "GET",
        "{sent:#}"
    );
    assert_eq!(sent["resource"]["serviceName"], "Test Weather", "{sent:#}");
    assert_eq!(r["replayStatus"], 402, "{r:#}");
    assert_eq!(hits.get(), 1);
}
