//! The Redis stores on a Redis Cluster (three masters on loopback, made by the test with
//! `redis-cli --cluster create`) and over TLS (`rediss://`, a private CA made with `openssl`).
//! Two layers ("instances") share the cluster: one proof runs one handler; a master killed
//! means 503, never a second run.
#![cfg(all(
    feature = "redis-cluster",
    feature = "redis-tls",
    feature = "test-util",
    feature = "axum"
))]

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use common::*;
use http::StatusCode;
use tower::ServiceExt;
use tower_x402::nonce::RedisNonceStore;
use tower_x402::proto::X402Version;
use tower_x402::store::RedisConnection;
use tower_x402::test_util::pay;
use tower_x402::{ChallengeKeys, PaymentLayer};

use redis_server::{free_port, redis_installed};

/// `redis-server` children killed (and their directory removed) on drop.
struct Nodes {
    children: Vec<(u16, Child)>,
    dir: PathBuf,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Nodes {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("x402-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self {
            children: Vec::new(),
            dir,
        }
    }

    fn spawn(&mut self, port: u16, args: &[&str]) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.children.push((port, child));
    }

    fn kill(&mut self, port: u16) {
        if let Some((_, c)) = self.children.iter_mut().find(|(p, _)| *p == port) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within 15 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three masters (no replicas) on free ports, every slot assigned; `None` when redis-server is
/// missing outside CI.
fn cluster(test: &str) -> Option<(Nodes, Vec<u16>)> {
    if !redis_installed(test) {
        return None;
    }
    let mut nodes = Nodes::new(test);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for &p in &ports {
        let conf = format!("nodes-{p}.conf");
        nodes.spawn(
            p,
            &[
                "--port",
                &p.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "1000",
            ],
        );
    }
    for &p in &ports {
        wait_until("PONG", || {
            cli(&["-p", &p.to_string(), "ping"]).contains("PONG")
        });
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut args = vec!["--cluster", "create"];
    args.extend(addrs.iter().map(String::as_str));
    args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    let out = cli(&args);
    assert!(out.contains("All 16384 slots covered"), "{out}");
    for &p in &ports {
        wait_until("cluster_state:ok", || {
            cli(&["-p", &p.to_string(), "cluster", "info"]).contains("cluster_state:ok")
        });
    }
    Some((nodes, ports))
}

/// A layer on `store`, bound with the deployment's shared key and public origin.
fn instance(store: RedisNonceStore, hits: &Hits) -> Router {
    let layer = PaymentLayer::builder()
        .pay_to(PAY_TO)
        .price(PRICE)
        .network(tower_x402::Network::BASE_SEPOLIA)
        .resource_base(BASE)
        .bind_challenges(ChallengeKeys::new([0x42; 32]))
        .nonce_store(store)
        .build()
        .expect("layer");
    app(hits).route_layer(layer)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A fresh proof for `/paid`, signed against the 402 of `svc` (bound id echoed).
async fn fresh_proof(svc: &Router) -> (http::HeaderName, http::HeaderValue) {
    let r = get_with(svc, "/paid", []).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    pay(&payer(), &r.challenge().accepts[0], now(), X402Version::V2)
}

async fn cluster_store(ports: &[u16]) -> RedisNonceStore {
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    RedisNonceStore::new(RedisConnection::cluster(&urls).await.expect("cluster"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_a_cluster_run_one_handler_per_proof() {
    let Some((_nodes, ports)) = cluster("two_instances_on_a_cluster_run_one_handler_per_proof")
    else {
        return;
    };
    let hits = Hits::new();
    let a = instance(cluster_store(&ports).await, &hits);
    let b = instance(cluster_store(&ports).await, &hits);

    // 64 concurrent copies of one proof over both instances: one run.
    let proof = fresh_proof(&a).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (proof, barrier) = (proof.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let r = svc.oneshot(request("/paid", [proof])).await.unwrap();
                Reply::read(r).await.outcome()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::OK, _) => ok += 1,
            (StatusCode::PAYMENT_REQUIRED, Some(r)) if r == NONCE_USED => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, hits.get()), (1, 1));

    // Keys spread over the masters: the cluster, not one node, holds them.
    for _ in 0..30 {
        let p = fresh_proof(&b).await;
        assert_eq!(get_with(&a, "/paid", [p]).await.status, StatusCode::OK);
    }
    assert_eq!(hits.get(), 31);
    for p in &ports {
        let keys: u64 = cli(&["-p", &p.to_string(), "dbsize"])
            .trim()
            .parse()
            .expect("dbsize");
        assert!(keys > 0, "master {p} holds no key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_master_is_503_never_a_second_run() {
    let Some((mut nodes, ports)) = cluster("a_killed_master_is_503_never_a_second_run") else {
        return;
    };
    let hits = Hits::new();
    let svc = instance(cluster_store(&ports).await, &hits);
    // 16 keys: the chance that none lives on the killed master is (2/3)^16, 0.15 %; and once
    // the cluster marks it failed (1 s), every slot answers CLUSTERDOWN.
    let mut spent = Vec::new();
    for _ in 0..16 {
        let p = fresh_proof(&svc).await;
        assert_eq!(
            get_with(&svc, "/paid", [p.clone()]).await.status,
            StatusCode::OK
        );
        spent.push(p);
    }
    assert_eq!(hits.get(), 16);
    nodes.kill(ports[1]);

    // Every replay is refused: 402 where its key's master lives, 503 + Retry-After where it
    // died. Never a run.
    let mut unavailable = 0;
    for p in spent {
        let r = get_with(&svc, "/paid", [p]).await;
        match r.outcome() {
            (StatusCode::PAYMENT_REQUIRED, Some(reason)) if reason == NONCE_USED => {}
            (StatusCode::SERVICE_UNAVAILABLE, _) => {
                assert!(r.header("retry-after").is_some());
                unavailable += 1;
            }
            other => panic!("replay answered {other:?}"),
        }
    }
    assert_eq!(hits.get(), 16);
    assert!(unavailable > 0, "no key lived on the killed master");
}

// ------------------------------------------------------------------------------------------------
// TLS

/// A CA and a server certificate for 127.0.0.1, made with the `openssl` command in `dir`.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (scripts/install-test-deps.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=x402 test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    run(&ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    run(&csr);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_serves_and_refuses_an_untrusted_server() {
    let test = "rediss_with_a_private_ca_serves_and_refuses_an_untrusted_server";
    if !redis_installed(test) {
        return;
    }
    let mut nodes = Nodes::new(test);
    certificates(&nodes.dir);
    let port = free_port();
    let file = |f: &str| nodes.dir.join(f).to_string_lossy().into_owned();
    let (cert, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
    nodes.spawn(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    );
    let ca_pem = std::fs::read(&ca).unwrap();
    let url = format!("rediss://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(15);
    let conn = loop {
        match RedisConnection::connect_tls(&url, &ca_pem).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("TLS connection: {e}"),
        }
    };
    let hits = Hits::new();
    let svc = instance(RedisNonceStore::new(conn), &hits);
    let proof = fresh_proof(&svc).await;
    assert_eq!(
        get_with(&svc, "/paid", [proof.clone()]).await.status,
        StatusCode::OK
    );
    let r = get_with(&svc, "/paid", [proof]).await;
    assert_eq!(r.reason().as_deref(), Some(NONCE_USED));
    assert_eq!(hits.get(), 1);

    // The server's certificate is checked: not signed by a root the system trusts, it is
    // refused, and plain text is not spoken to a TLS port.
    assert!(RedisConnection::connect(&url).await.is_err());
    let plain = format!("redis://127.0.0.1:{port}/");
    assert!(RedisConnection::connect(&plain).await.is_err());
}

/// The channel store on a cluster: its contract holds, and `list` sees channels in every slot
/// (a `SCAN` would see one node's), so the claim manager misses no voucher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_store_on_a_cluster_keeps_its_contract_and_lists_every_channel() {
    use tower_x402::channel::redis::RedisChannelStore;
    use tower_x402::channel::store::{ChannelStore, conformance};
    let Some((_nodes, ports)) = cluster("the_channel_store_on_a_cluster") else {
        return;
    };
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let store = RedisChannelStore::new(RedisConnection::cluster(&urls).await.expect("cluster"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    conformance(&store, now, 1, |s| {
        tokio::time::sleep(Duration::from_secs(s))
    })
    .await;

    // 32 channels land on keys spread over the three masters; all 32 are listed.
    let Some(template) = ({
        let id = tower_x402::primitives::B256::repeat_byte(0xd0);
        conformance_state(&store, id).await
    }) else {
        panic!("a committed channel loads back")
    };
    let mut ids = Vec::new();
    for i in 0..32u8 {
        let id = tower_x402::primitives::B256::repeat_byte(i);
        assert!(
            store
                .commit(id, None, template.clone())
                .await
                .expect("commit")
        );
        ids.push(id);
    }
    ids.push(tower_x402::primitives::B256::repeat_byte(0xd0));
    let mut listed = store.list().await.expect("list");
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids, "every channel listed, whichever node holds it");
    let masters_holding = ports
        .iter()
        .filter(|p| {
            cli(&[
                "-p",
                &p.to_string(),
                "--scan",
                "--pattern",
                "x402:channel:s:*",
            ])
            .lines()
            .count()
                > 0
        })
        .count();
    assert!(
        masters_holding >= 2,
        "the states are spread over the masters"
    );
}

/// Commits one channel record (any content that loads back) and returns it.
async fn conformance_state(
    store: &tower_x402::channel::redis::RedisChannelStore,
    id: tower_x402::primitives::B256,
) -> Option<tower_x402::channel::store::ChannelState> {
    use tower_x402::channel::store::{ChannelState, ChannelStore};
    use tower_x402::primitives::{Address, Bytes, U256};
    let state = ChannelState {
        config: tower_x402::proto::batch::ChannelConfig {
            payer: Address::repeat_byte(1),
            payer_authorizer: Address::repeat_byte(1),
            receiver: Address::repeat_byte(2),
            receiver_authorizer: Address::repeat_byte(3),
            token: Address::repeat_byte(4),
            withdraw_delay: 900,
            salt: tower_x402::primitives::B256::ZERO,
        },
        charged_cumulative: 1000,
        signed_max_claimable: 1000,
        signature: Bytes::from(vec![7u8; 65]),
        balance: 1_000_000,
        total_claimed: 0,
        withdraw_requested_at: 0,
        refund_nonce: U256::ZERO,
        onchain_synced_at: 0,
        last_request_at: 0,
    };
    assert!(store.commit(id, None, state).await.expect("commit"));
    store.load(id).await.expect("load")
}
