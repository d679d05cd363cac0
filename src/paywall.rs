//! A browser paywall: a person who opens a paid URL gets a page saying what it costs, with a
//! button that pays from their browser wallet, instead of the bare 402 JSON.
//!
//! Turned on with [`PaymentLayerBuilder::paywall`](crate::PaymentLayerBuilder::paywall)
//! (feature `paywall`, no extra dependency). A request without payment whose `Accept` names
//! `text/html` and whose `User-Agent` names `Mozilla` (every browser; the rule of the
//! reference's Express and Next middleware) gets the page, still with status 402 and the same
//! `PAYMENT-REQUIRED` header. Every other client (agents, `curl`, the official SDKs) gets
//! exactly the 402 it got before.
//!
//! # What the page does
//! It shows the price in human terms ("$0.001 USDC on Base Sepolia" for a USDC preset; atomic
//! units and the token address otherwise), the description, the resource and the network.
//! Its button asks an injected EIP-1193 wallet (`window.ethereum`) for the account, signs the
//! route's first `exact` EVM requirement as an EIP-3009 `TransferWithAuthorization`
//! (`eth_signTypedData_v4`; the domain is the requirement's `extra.name`/`version`, so the
//! wallet shows token, amount and recipient), and re-sends the request with that
//! `PAYMENT-SIGNATURE`, echoing the requirement exactly as received (a bound challenge id
//! included). The paid answer replaces the page: an HTML answer as a document, anything else
//! as text. `upto` options cannot be paid from the page.
//!
//! The requirements travel in the page as the `PAYMENT-REQUIRED` header's own base64, never as
//! markup; every configured text is HTML-escaped. The page carries a `Content-Security-Policy`
//! that runs only its own script (by hash) and connects only to its own origin.
//!
//! ```
//! use tower_x402::paywall::Paywall;
//! use tower_x402::{Network, PaymentLayer};
//! use tower_x402::primitives::address;
//! let layer = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .description("Today's weather")
//!     .paywall(
//!         Paywall::new()
//!             .app_name("Weather Inc.")
//!             .logo_url("https://weather.example/logo.png")
//!             .css("body { font-family: Georgia, serif; }"),
//!     )
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;
use http::header::{ACCEPT, USER_AGENT};
use sha2::{Digest, Sha256};

use crate::network::{Asset, Network};
use crate::option::PaymentOption;

/// Why a paywall cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaywallError {
    /// The logo URL is not `https://`, `http://`, a path on this origin or a `data:image/`
    /// URL (a `javascript:` URL would run in the page).
    #[error("paywall logo must be an https://, http://, /path or data:image/ URL")]
    LogoUrl,
    /// The CSS contains `<`, which could close its `<style>` element.
    #[error("paywall CSS must not contain '<'")]
    Css,
}

/// The paywall's look: see the [module docs](self).
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct Paywall {
    app_name: Option<String>,
    logo_url: Option<String>,
    css: Option<String>,
}

impl Paywall {
    /// The default page: no app name or logo, the built-in style.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// The name shown as the page's title and heading (default: "Payment required").
        pub fn app_name(name: impl Into<String>) => app_name = Some(name.into());

        /// A logo shown above the heading: an `https://`, `http://`, `/path` or `data:image/` URL.
        pub fn logo_url(url: impl Into<String>) => logo_url = Some(url.into());

        /// CSS added after the built-in style (it may override any of it; no `<`).
        pub fn css(css: impl Into<String>) => css = Some(css.into());
    }

    /// Checks the configuration and fixes what every page shares (style and policy).
    pub(crate) fn build(self) -> Result<Built, PaywallError> {
        if let Some(url) = &self.logo_url {
            let lower = url.trim().to_ascii_lowercase();
            let ok = lower.starts_with("https://")
                || lower.starts_with("http://")
                || (lower.starts_with('/') && !lower.starts_with("//"))
                || lower.starts_with("data:image/");
            if !ok {
                return Err(PaywallError::LogoUrl);
            }
        }
        if self.css.as_deref().is_some_and(|c| c.contains('<')) {
            return Err(PaywallError::Css);
        }
        let style = format!("{STYLE}{}", self.css.as_deref().unwrap_or(""));
        let csp = format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; img-src https: http: data: 'self'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            sha256_source(SCRIPT),
            sha256_source(&style),
        );
        Ok(Built {
            csp: http::HeaderValue::try_from(csp).map_err(|_| PaywallError::Css)?,
            style,
            title: self
                .app_name
                .unwrap_or_else(|| "Payment required".to_owned()),
            logo_url: self.logo_url,
        })
    }
}

/// A built paywall, in the layer's shared configuration.
#[derive(Debug)]
pub(crate) struct Built {
    title: String,
    logo_url: Option<String>,
    style: String,
    csp: http::HeaderValue,
}

/// True for a request a browser made for a page: `Accept` names `text/html` and the
/// `User-Agent` names `Mozilla` (as the reference middleware decides).
pub(crate) fn is_browser(headers: &HeaderMap) -> bool {
    let has = |name, needle: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.contains(needle)))
    };
    has(ACCEPT, "text/html") && has(USER_AGENT, "Mozilla")
}

impl Built {
    /// The page for a 402 whose `PAYMENT-REQUIRED` header is `required` (base64 of the v2
    /// document, so it needs no escaping in an attribute).
    pub(crate) fn page(
        &self,
        options: &[PaymentOption],
        description: Option<&str>,
        resource: &str,
        required: &str,
    ) -> String {
        let mut html = String::with_capacity(8 * 1024);
        let title = escape(&self.title);
        let _ = write!(
            html,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
             <title>{title}</title><style>{}</style></head><body><main>",
            self.style
        );
        if let Some(logo) = &self.logo_url {
            let _ = write!(
                html,
                "<img class=\"logo\" alt=\"\" src=\"{}\">",
                escape(logo)
            );
        }
        let _ = write!(html, "<h1>{title}</h1>");
        if let Some(d) = description.filter(|d| !d.is_empty()) {
            let _ = write!(html, "<p class=\"what\">{}</p>", escape(d));
        }
        let _ = write!(
            html,
            "<p class=\"resource\"><code>{}</code></p>",
            escape(resource)
        );
        html.push_str("<ul class=\"prices\">");
        for o in options {
            let _ = write!(html, "<li>{}</li>", escape(&human_price(o)));
        }
        html.push_str("</ul>");
        let _ = write!(
            html,
            "<button id=\"pay\" type=\"button\">Pay with browser wallet</button>\
             <p id=\"status\" role=\"status\"></p><pre id=\"content\" hidden></pre>\
             <div id=\"x402\" data-required=\"{}\" hidden></div>\
             <script>{SCRIPT}</script></main></body></html>",
            escape(required)
        );
        html
    }

    /// The page's `Content-Security-Policy`.
    pub(crate) fn csp(&self) -> http::HeaderValue {
        self.csp.clone()
    }
}

/// "0.001 USDC on Base Sepolia" for a known token (`$` first for USD coins), "1000 atomic units
/// of token 0x… on eip155:…" otherwise; `up to` for `upto` options.
pub fn human_price(option: &PaymentOption) -> String {
    let r = option.requirements();
    let network = network_name(r.network);
    let up_to = if option.is_upto() { "up to " } else { "" };
    match Asset::usdc(r.network).filter(|a| r.asset == a.address) {
        Some(asset) => format!(
            "{up_to}${} USDC on {network}",
            decimal(&r.amount.to_string(), asset.decimals)
        ),
        None => format!(
            "{up_to}{} atomic units of token {} on {network}",
            r.amount, r.asset
        ),
    }
}

/// "Base Sepolia" from the v1 name `base-sepolia`; the CAIP-2 id for a chain without one.
pub fn network_name(network: Network) -> String {
    match network.v1_name() {
        Some(name) => name
            .split('-')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect::<String>())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => network.to_string(),
    }
}

/// `atomic` (decimal digits) as a decimal number with `decimals` places, trailing zeros cut.
fn decimal(atomic: &str, decimals: u8) -> String {
    let d = usize::from(decimals);
    let padded = format!("{atomic:0>width$}", width = d + 1);
    let (int, frac) = padded.split_at(padded.len() - d);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        int.to_owned()
    } else {
        format!("{int}.{frac}")
    }
}

/// Escapes text for HTML element content and double-quoted attributes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A CSP source allowing exactly `text` as an inline element.
fn sha256_source(text: &str) -> String {
    format!(
        "sha256-{}",
        STANDARD.encode(Sha256::digest(text.as_bytes()))
    )
}

const STYLE: &str = "body{margin:0;font:16px/1.5 system-ui,sans-serif;background:#f6f7f9;color:#111}\
main{max-width:32rem;margin:4rem auto;padding:2rem;background:#fff;border-radius:12px;\
box-shadow:0 1px 4px #0002}h1{margin-top:0;font-size:1.5rem}.logo{max-height:48px}\
.resource code{word-break:break-all;color:#555}.prices{font-size:1.25rem;font-weight:600}\
button{font:inherit;padding:.6rem 1.2rem;border:0;border-radius:8px;background:#1652f0;color:#fff;\
cursor:pointer}button:disabled{opacity:.5}#status{color:#555}pre{white-space:pre-wrap;\
background:#f0f0f0;padding:1rem;border-radius:8px}";

/// The page's only script: pays the first `exact` EVM requirement with an injected wallet.
const SCRIPT: &str = r#"(() => {
const $ = (id) => document.getElementById(id);
const status = (t) => { $("status").textContent = t; };
const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const required = JSON.parse(new TextDecoder().decode(bytes($("x402").dataset.required)));
const req = (required.accepts || []).find((r) => r.scheme === "exact" && String(r.network).startsWith("eip155:"));
const pay = $("pay");
if (!req || !req.extra || !req.extra.name) { pay.disabled = true; status("This resource cannot be paid from a browser."); return; }
const hex = (a) => "0x" + Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
const b64 = (s) => { let out = ""; for (const b of new TextEncoder().encode(s)) out += String.fromCharCode(b); return btoa(out); };
pay.addEventListener("click", async () => {
  const eth = window.ethereum;
  if (!eth) { status("No browser wallet found: install one (MetaMask, Coinbase Wallet, ...) and reload."); return; }
  pay.disabled = true;
  try {
    status("Connecting to your wallet...");
    const [from] = await eth.request({ method: "eth_requestAccounts" });
    const chainId = Number(String(req.network).split(":")[1]);
    try { await eth.request({ method: "wallet_switchEthereumChain", params: [{ chainId: "0x" + chainId.toString(16) }] }); } catch (_) { /* the signature binds the chain anyway */ }
    const now = Math.floor(Date.now() / 1000);
    const authorization = { from, to: req.payTo, value: String(req.amount), validAfter: String(now - 600),
      validBefore: String(now + Number(req.maxTimeoutSeconds)), nonce: hex(crypto.getRandomValues(new Uint8Array(32))) };
    const typed = {
      types: {
        EIP712Domain: [{ name: "name", type: "string" }, { name: "version", type: "string" }, { name: "chainId", type: "uint256" }, { name: "verifyingContract", type: "address" }],
        TransferWithAuthorization: [{ name: "from", type: "address" }, { name: "to", type: "address" }, { name: "value", type: "uint256" }, { name: "validAfter", type: "uint256" }, { name: "validBefore", type: "uint256" }, { name: "nonce", type: "bytes32" }],
      },
      primaryType: "TransferWithAuthorization",
      domain: { name: req.extra.name, version: req.extra.version, chainId, verifyingContract: req.asset },
      message: authorization,
    };
    status("Sign the payment in your wallet...");
    const signature = await eth.request({ method: "eth_signTypedData_v4", params: [from, JSON.stringify(typed)] });
    const proof = { x402Version: 2, resource: required.resource, accepted: req, payload: { signature, authorization } };
    status("Paying...");
    const res = await fetch(location.href, { headers: { "PAYMENT-SIGNATURE": b64(JSON.stringify(proof)) } });
    const body = await res.text();
    if (!res.ok) {
      let reason = String(res.status);
      try { reason = JSON.parse(new TextDecoder().decode(bytes(res.headers.get("PAYMENT-REQUIRED")))).error || reason; } catch (_) { try { reason = JSON.parse(body).error || reason; } catch (_) {} }
      status("Payment refused: " + reason + ". Nothing was charged.");
      pay.disabled = false;
      return;
    }
    if ((res.headers.get("content-type") || "").includes("text/html")) { document.open(); document.write(body); document.close(); return; }
    status("Paid.");
    pay.hidden = true;
    const content = $("content");
    content.textContent = body;
    content.hidden = false;
  } catch (e) {
    status("Not paid: " + (e && e.message ? e.message : e));
    pay.disabled = false;
  }
});
})();"#;

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::address;

    #[test]
    fn prices_and_names_read_as_people_say_them() {
        let pay_to = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
        let o = PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.001", pay_to).unwrap();
        assert_eq!(human_price(&o), "$0.001 USDC on Base Sepolia");
        let o = PaymentOption::exact(&Asset::usdc_base(), "$12", pay_to).unwrap();
        assert_eq!(human_price(&o), "$12 USDC on Base");
        assert_eq!(decimal("1", 6), "0.000001");
        assert_eq!(decimal("1500000", 6), "1.5");
        assert_eq!(decimal("0", 6), "0");
        assert_eq!(network_name(Network::eip155(80002)), "Polygon Amoy");
        assert_eq!(network_name(Network::eip155(31337)), "eip155:31337");
    }

    #[test]
    fn configuration_that_could_run_script_is_refused() {
        for bad in [
            "javascript:alert(1)",
            " JavaScript:x",
            "//evil.example/x.png",
            "data:text/html,x",
        ] {
            assert_eq!(
                Paywall::new().logo_url(bad).build().unwrap_err(),
                PaywallError::LogoUrl,
                "{bad}"
            );
        }
        assert_eq!(
            Paywall::new().css("</style><script>").build().unwrap_err(),
            PaywallError::Css
        );
        assert!(
            Paywall::new()
                .logo_url("/logo.svg")
                .css("h1{color:red}")
                .build()
                .is_ok()
        );
    }

    #[test]
    fn the_policy_allows_exactly_the_page_script_and_style() {
        let built = Paywall::new().css("h1{color:red}").build().unwrap();
        let csp = built.csp().to_str().unwrap().to_owned();
        assert!(csp.contains(&sha256_source(SCRIPT)), "{csp}");
        assert!(
            csp.contains(&sha256_source(&format!("{STYLE}h1{{color:red}}"))),
            "{csp}"
        );
        let page = built.page(&[], Some("a <b>"), "http://x/y?a=\"1\"", "eyJ4");
        assert!(page.contains(&format!("<script>{SCRIPT}</script>")));
        assert!(page.contains(&format!("<style>{STYLE}h1{{color:red}}</style>")));
        assert!(page.contains("a &lt;b&gt;"));
        assert!(page.contains("http://x/y?a=&quot;1&quot;"));
    }
}
