//! The nonce stores: memory per stored nonce, and reserve latency in memory vs Redis.
//!
//! ```sh
//! cargo bench --all-features --bench store               # 1M keys, 200k/20k reserves
//! cargo test --all-features --bench store -- --smoke      # a second or two, in debug
//! ```
//!
//! * Bytes per entry of `MemoryNonceStore`: a counting global allocator measures the heap
//!   growth while 1 million distinct keys are reserved (target ≤ 200 bytes per entry).
//! * `reserve` latency, one call at a time: the memory store, then `RedisNonceStore` on a
//!   local `redis-server` (loopback, started here), timed call by call: p50 and mean.
//!
//! Without `redis-server` the Redis half prints SKIPPED (an error under `CI=true`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use tower_x402::clock::FixedClock;
use tower_x402::nonce::{
    MemoryNonceStore, NonceKey, NonceStore, RedisNonceStore, Reservation, StoreError,
};
use tower_x402::primitives::{Address, B256, U256};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call forwards to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NOW: u64 = 1_760_000_000;

fn key(i: u64) -> NonceKey {
    NonceKey {
        chain_id: 84532,
        asset: Address::repeat_byte(0x03),
        from: Address::repeat_byte(0x70),
        nonce: B256::from(U256::from(i)),
    }
}

/// Heap bytes per entry after reserving `n` distinct keys (capacity is not the limit).
async fn bytes_per_entry(n: u64) -> f64 {
    let before = LIVE.load(Ordering::Relaxed);
    let store = MemoryNonceStore::with_capacity_and_clock(2 * n as usize, FixedClock::new(NOW));
    for i in 0..n {
        let r = store.reserve(&key(i), NOW + 300).await;
        assert!(matches!(r, Ok(Reservation::Reserved(_))), "{r:?}");
    }
    assert_eq!(store.len() as u64, n);
    let grown = LIVE.load(Ordering::Relaxed) - before;
    drop(store);
    grown as f64 / n as f64
}

struct Latency {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
}

/// Times `n` reserves of fresh keys one at a time (after `warm` untimed ones).
async fn reserve_latency(store: &dyn NonceStore, base: u64, warm: u64, n: u64) -> Latency {
    for i in 0..warm {
        let _ = store.reserve(&key(base + i), NOW + 300).await;
    }
    let mut lat = Vec::with_capacity(n as usize);
    let t_all = Instant::now();
    for i in 0..n {
        let k = key(base + warm + i);
        let t0 = Instant::now();
        let r = store.reserve(&k, u64::MAX / 2).await;
        lat.push(t0.elapsed().as_nanos() as u64);
        assert!(matches!(r, Ok(Reservation::Reserved(_))), "{r:?}");
    }
    let total = t_all.elapsed();
    lat.sort_unstable();
    let at = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Latency {
        p50_us: at(0.5),
        p99_us: at(0.99),
        mean_us: total.as_secs_f64() * 1e6 / n as f64,
    }
}

/// A `redis-server` on a free loopback port, killed on drop.
struct Redis(Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Result<Option<Redis>, String> {
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            return Err("redis-server not installed (CI=true)".into());
        }
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let redis = Redis(child, port);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.write_all(b"PING\r\n")?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf)?;
            Ok(&buf == b"+PONG\r\n")
        });
        if pong.is_ok_and(|p| p) {
            return Ok(Some(redis));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("redis-server did not answer on port {port}"))
}

async fn run(smoke: bool) -> Result<(), Box<dyn std::error::Error>> {
    let sizes: &[u64] = if smoke {
        &[20_000]
    } else {
        &[250_000, 500_000, 750_000, 1_000_000]
    };
    println!("MemoryNonceStore heap bytes per stored nonce (counting allocator):");
    for &n in sizes {
        let b = bytes_per_entry(n).await;
        let target = if n == 1_000_000 {
            if b <= 200.0 {
                "  (target ≤ 200: MET)"
            } else {
                "  (target ≤ 200: MISSED)"
            }
        } else {
            ""
        };
        println!("  {n:>9} keys: {b:6.1} bytes/entry{target}");
    }

    let (mem_n, redis_n) = if smoke {
        (2_000, 300)
    } else {
        (200_000, 20_000)
    };
    println!("\nreserve latency, one call at a time (fresh key each call):");
    let mem = MemoryNonceStore::with_capacity_and_clock(1_000_000, FixedClock::new(NOW));
    let m = reserve_latency(&mem, 0, mem_n / 10, mem_n).await;
    println!(
        "  memory          p50 {:7.2} µs   p99 {:7.2} µs   mean {:7.2} µs   ({mem_n} calls)",
        m.p50_us, m.p99_us, m.mean_us
    );
    match start_redis()? {
        None => println!("  redis           SKIPPED: redis-server not installed"),
        Some(redis) => {
            let store = RedisNonceStore::connect(&format!("redis://127.0.0.1:{}/", redis.1))
                .await
                .map_err(|e: StoreError| e.to_string())?;
            let r = reserve_latency(&store, 0, redis_n / 10, redis_n).await;
            println!(
                "  redis loopback  p50 {:7.2} µs   p99 {:7.2} µs   mean {:7.2} µs   ({redis_n} calls)",
                r.p50_us, r.p99_us, r.mean_us
            );
            println!(
                "  redis / memory  p50 {:.0}×, mean {:.0}×",
                r.p50_us / m.p50_us,
                r.mean_us / m.mean_us
            );
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(smoke))
}
