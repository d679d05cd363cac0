//! [`PaymentLayer`]: configuration and builder.

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::Address;
use http::request::Parts;
use serde_json::Map;
use tower_layer::Layer;

use crate::Network;
use crate::challenge::ChallengeKeys;
use crate::error::ConfigError;
use crate::hooks::PaymentHooks;
use crate::network::Asset;
use crate::nonce::{MemoryNonceStore, NonceStore};
use crate::proto::header::DEFAULT_MAX_HEADER_BYTES;
use crate::service::Payment;
use crate::settle::{SettlementMode, Settler, VerifyOnly};
use crate::verify::{EvmVerifier, Verifier};

use crate::config::{Idempotency, Inflight, Pricing, Shared};
pub use crate::config::{PricingFn, ResourceCheck};
pub use crate::option::PaymentOption;

/// Charges for the requests of the services it wraps, with x402. See the
/// [crate docs](crate) for the flow and an example.
#[derive(Clone)]
#[must_use]
pub struct PaymentLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PaymentLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentLayer").finish_non_exhaustive()
    }
}

impl PaymentLayer {
    /// Starts a configuration; finish it with [`PaymentLayerBuilder::build`].
    pub fn builder() -> PaymentLayerBuilder {
        PaymentLayerBuilder::default()
    }

    /// The configuration the layer's challenges are built from (read by the discovery
    /// manifest, so that the two can never disagree).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl<S> Layer<S> for PaymentLayer {
    type Service = Payment<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Payment::new(inner, self.shared.clone())
    }
}

/// One in-memory store for every layer of the process that was given none: a proof bought
/// for one route must not buy another route too.
fn default_store() -> Arc<dyn NonceStore> {
    static STORE: std::sync::OnceLock<Arc<MemoryNonceStore>> = std::sync::OnceLock::new();
    STORE
        .get_or_init(|| Arc::new(MemoryNonceStore::new()))
        .clone()
}

/// How the builder was told to bind challenges.
enum Binding {
    /// Not said: a random key of this process (refused next to a shared store).
    Default,
    /// `.bind_challenges(keys)`.
    Keys(Box<ChallengeKeys>),
    /// `.no_challenge_binding()`.
    Off,
}

/// Builder of a [`PaymentLayer`]. Every setter states its default.
#[must_use]
pub struct PaymentLayerBuilder {
    verifier: Arc<dyn Verifier>,
    store: Option<Arc<dyn NonceStore>>,
    settler: Arc<dyn Settler>,
    mode: SettlementMode,
    options: Vec<PaymentOption>,
    pricing: Option<Arc<PricingFn>>,
    pay_to: Option<Address>,
    price: Option<String>,
    asset: Option<Asset>,
    network: Option<Network>,
    max_timeout: Option<u64>,
    resource_base: Option<String>,
    description: Option<String>,
    mime_type: Option<String>,
    max_header_bytes: usize,
    expose_headers: bool,
    retry_after: Duration,
    accept_v1: bool,
    accept_v2: bool,
    hooks: Vec<Arc<dyn PaymentHooks>>,
    max_verifications: Option<usize>,
    resource_check: ResourceCheck,
    challenges: Binding,
    idempotency: Option<Idempotency>,
    idempotency_required: Option<bool>,
    idempotency_max_body: Option<usize>,
    prepaid: Option<crate::prepaid::Prepaid>,
    #[cfg(feature = "paywall")]
    paywall: Option<crate::paywall::Paywall>,
    bazaar: Option<crate::discovery::Bazaar>,
    service_name: Option<String>,
    tags: Option<Vec<String>>,
    icon_url: Option<String>,
    channels: Option<Arc<dyn crate::channel::Serve>>,
}

impl Default for PaymentLayerBuilder {
    fn default() -> Self {
        Self {
            verifier: Arc::new(EvmVerifier::new()),
            store: None,
            settler: Arc::new(VerifyOnly),
            mode: SettlementMode::AfterHandler,
            options: Vec::new(),
            pricing: None,
            pay_to: None,
            price: None,
            asset: None,
            network: None,
            max_timeout: None,
            resource_base: None,
            description: None,
            mime_type: None,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            expose_headers: false,
            retry_after: Duration::from_secs(5),
            accept_v1: true,
            accept_v2: true,
            hooks: Vec::new(),
            max_verifications: None,
            resource_check: ResourceCheck::default(),
            challenges: Binding::Default,
            idempotency: None,
            idempotency_required: None,
            idempotency_max_body: None,
            prepaid: None,
            #[cfg(feature = "paywall")]
            paywall: None,
            bazaar: None,
            service_name: None,
            tags: None,
            icon_url: None,
            channels: None,
        }
    }
}

impl PaymentLayerBuilder {
    setters! {
        /// Who gets paid (for the simple `price` form). Required with [`Self::price`].
        pub fn pay_to(address: Address) => pay_to = Some(address);

        /// The price of each request, e.g. `"$0.001"` (exact decimal in the asset's units).
        pub fn price(price: impl Into<String>) => price = Some(price.into());

        /// The network; with no [`Self::asset`], its USDC preset is the asset.
        pub fn network(network: Network) => network = Some(network);

        /// The token to be paid in (default: USDC of [`Self::network`]).
        pub fn asset(asset: Asset) => asset = Some(asset);

        /// `maxTimeoutSeconds` of the simple price (default 300).
        pub fn max_timeout(secs: u64) => max_timeout = Some(secs);
    }

    /// Adds a payment option to `accepts` (several may be offered, e.g. two networks).
    pub fn accept(mut self, option: PaymentOption) -> Self {
        self.options.push(option);
        self
    }

    /// Prices each request from its parts; `None` lets the request through for free. Replaces
    /// the static price and options.
    ///
    /// **The rule**: charge by default and return `None` only for paths you list as free,
    /// compared as the router will see them (`parts.uri.path()` unchanged, after any
    /// path-normalising layer placed outside this one). Never list the paid paths and let
    /// the rest through: a router or handler more lenient than the comparison (case,
    /// trailing slash, `//`, `%74`, `;params`) would serve the spellings it missed unpaid
    /// (`tests/paths.rs` shows both). A v2 proof pays only the path it was challenged for
    /// ([`Self::resource_check`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tower_x402::{Asset, PaymentLayer, PaymentOption};
    /// use tower_x402::primitives::address;
    /// let pay_to = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    /// let usdc = Asset::usdc_base_sepolia();
    /// let cheap: Arc<[PaymentOption]> = Arc::new([PaymentOption::exact(&usdc, "$0.001", pay_to).unwrap()]);
    /// let dear: Arc<[PaymentOption]> = Arc::new([PaymentOption::exact(&usdc, "$0.01", pay_to).unwrap()]);
    /// let layer = PaymentLayer::builder()
    ///     .pricing(move |parts| match parts.uri.path() {
    ///         "/health" => None,
    ///         p if p.starts_with("/premium") => Some(dear.clone()),
    ///         _ => Some(cheap.clone()),
    ///     })
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn pricing<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<Arc<[PaymentOption]>> + Send + Sync + 'static,
    {
        self.pricing = Some(Arc::new(f));
        self
    }

    setters! {
        /// Replaces the verifier (default: in-process [`EvmVerifier`], `exact` and `upto`, on the system clock).
        pub fn verifier(verifier: impl Verifier) => verifier = Arc::new(verifier);

        /// Replaces the replay guard (default: one [`MemoryNonceStore`] shared by every layer of
        /// the process). Instances behind one load balancer must share a store (Redis).
        pub fn nonce_store(store: impl NonceStore) => store = Some(Arc::new(store));

        /// Replaces the settler (default: [`VerifyOnly`], which moves no money).
        pub fn settler(settler: impl Settler) => settler = Arc::new(settler);

        /// When to settle relative to the handler (default [`SettlementMode::AfterHandler`]).
        pub fn settlement_mode(mode: SettlementMode) => mode = mode;

        /// Base URL for `resource.url` (e.g. `https://api.example.com`); the request path is
        /// appended. Default: `http://` + the request's `Host` + path.
        pub fn resource_base(base: impl Into<String>)
            => resource_base = Some(base.into().trim_end_matches('/').to_owned());

        /// Human description of what is sold (default none).
        pub fn description(text: impl Into<String>) => description = Some(text.into());

        /// MIME type of the paid response (default none).
        pub fn mime_type(mime: impl Into<String>) => mime_type = Some(mime.into());

        /// Largest payment header accepted, in bytes (default 8 KiB); larger gets 431.
        pub fn max_header_bytes(bytes: usize) => max_header_bytes = bytes;

        /// Adds `Access-Control-Expose-Headers: PAYMENT-REQUIRED, PAYMENT-RESPONSE,
        /// X-PAYMENT-RESPONSE` to every response of the layer, so browser clients can read them
        /// cross-origin (default off; your CORS layer must also allow the request headers).
        pub fn expose_headers(on: bool) => expose_headers = on;

        /// `Retry-After` sent with 503 when a dependency is down (default 5 s).
        pub fn retry_after(wait: Duration) => retry_after = wait;
    }

    /// Which protocol versions are accepted (default both). The 402 always carries both
    /// forms of the challenge.
    pub fn versions(mut self, v1: bool, v2: bool) -> Self {
        self.accept_v1 = v1;
        self.accept_v2 = v2;
        self
    }

    /// Adds a [lifecycle hook](crate::hooks) (none by default). Hooks run in the order
    /// added; one that refuses stops the flow.
    pub fn hook(mut self, hook: impl PaymentHooks) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    setters! {
        /// Caps the verifications in flight in this layer (default: no cap). Beyond it a paid
        /// request is answered 503 `overloaded` with `Retry-After` at once, before any signature
        /// work: back-pressure under a flood of (possibly bogus) proofs, and a bound on
        /// concurrent calls to a remote verifier.
        pub fn max_concurrent_verifications(max: usize) => max_verifications = Some(max);

        /// How a v2 proof's echoed `resource.url` must name the request it pays for (default
        /// [`ResourceCheck::Path`]: same path and query, any origin); one naming another resource
        /// is refused with 402 `resource_mismatch` before verification. [`ResourceCheck::Url`]
        /// compares scheme and host too, [`ResourceCheck::Off`] nothing.
        ///
        /// ```
        /// use tower_x402::{Network, PaymentLayer, ResourceCheck};
        /// use tower_x402::primitives::address;
        /// let layer = PaymentLayer::builder()
        ///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        ///     .price("$0.001")
        ///     .network(Network::BASE_SEPOLIA)
        ///     .resource_base("https://api.example.com")
        ///     .resource_check(ResourceCheck::Url)
        ///     .build()
        ///     .unwrap();
        /// # let _ = layer;
        /// ```
        pub fn resource_check(check: ResourceCheck) => resource_check = check;

        /// The keys that bind each v2 402 requirement to this resource, method and price with a
        /// signed, expiring challenge id in `extra.challenge`, which v2 clients echo back; a proof
        /// without a valid one gets 402 `invalid_challenge` or `challenge_expired`. v1 proofs
        /// cannot echo it and are served unbound unless
        /// [`ChallengeKeys::accept_unbound_v1`]`(false)`. See [`crate::challenge`].
        ///
        /// Binding is **on by default** with a random key of this process. Set the keys when
        /// several instances serve the same routes (every instance the same keys): a layer with a
        /// shared store and no keys does not build
        /// ([`ConfigError::ChallengeKeyRequired`]).
        ///
        /// ```
        /// use tower_x402::challenge::ChallengeKeys;
        /// use tower_x402::{Network, PaymentLayer};
        /// use tower_x402::primitives::address;
        /// let key = [7u8; 32]; // in production: 32 random bytes from your secret store
        /// let layer = PaymentLayer::builder()
        ///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        ///     .price("$0.001")
        ///     .network(Network::BASE_SEPOLIA)
        ///     .bind_challenges(ChallengeKeys::new(key))
        ///     .build()
        ///     .unwrap();
        /// # let _ = layer;
        /// ```
        pub fn bind_challenges(keys: ChallengeKeys) => challenges = Binding::Keys(Box::new(keys));
    }

    /// Turns challenge binding off (default on, see [`Self::bind_challenges`]): any valid
    /// proof for the route's requirements is accepted, whichever 402 (or none) it was made
    /// from; [`ResourceCheck`] still compares its `resource.url`. The 402 is then the same
    /// for every request and cached. For clients that cannot echo `extra` unchanged, or
    /// tests that sign requirements they built themselves.
    pub fn no_challenge_binding(mut self) -> Self {
        self.challenges = Binding::Off;
        self
    }

    setters! {
        /// Enables idempotent retries with the x402 `payment-identifier` extension (default off):
        /// the v2 challenge advertises it, and a v2 payment carrying an id is served once, its
        /// response replayed to retries with the same id and proof. See [`crate::idempotency`]
        /// for the rules. Instances behind a load balancer must share the store (Redis).
        ///
        /// ```
        /// use tower_x402::{Network, PaymentLayer};
        /// use tower_x402::idempotency::{Idempotency, MemoryIdempotencyStore};
        /// use tower_x402::primitives::address;
        /// let layer = PaymentLayer::builder()
        ///     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        ///     .price("$0.001")
        ///     .network(Network::BASE_SEPOLIA)
        ///     .idempotency(Idempotency::new(MemoryIdempotencyStore::new()).required(true))
        ///     .build()
        ///     .unwrap();
        /// ```
        ///
        /// A bare store is taken too (`.idempotency(store)`: ids optional, 64 KiB bodies).
        pub fn idempotency(idempotency: impl Into<Idempotency>)
            => idempotency = Some(idempotency.into());

        /// Requires a payment identifier in v2 payments (default `false`; advertised as
        /// `info.required`): a v2 payment without one gets 400 `payment_identifier_required`.
        /// v1 payments cannot carry one and are served without idempotency. Only with
        /// [`Self::idempotency`] (else [`build`](Self::build) fails): prefer
        /// [`Idempotency::required`](crate::idempotency::Idempotency::required).
        pub fn idempotency_required(required: bool) => idempotency_required = Some(required);

        /// Largest response body stored for replay (default 64 KiB). Larger and streaming bodies
        /// pass through unbuffered and are not replayable (see [`crate::idempotency`]). Only with
        /// [`Self::idempotency`] (else [`build`](Self::build) fails): prefer
        /// [`Idempotency::max_body`](crate::idempotency::Idempotency::max_body).
        pub fn idempotency_max_body(bytes: usize) => idempotency_max_body = Some(bytes);
    }

    /// Serves `batch-settlement` payments on the routes that offer
    /// [`PaymentOption::batch_settlement`] (default: none; an accepted batch-settlement option
    /// without it does not build, [`ConfigError::Contradictory`]; one from `.pricing` is
    /// refused per request as an unsupported scheme). A channel's proof is not claimed in the nonce store: the
    /// [`Channels`](crate::channel::serve::Channels) engine takes the channel's lease, checks
    /// the voucher against its state, submits a deposit through its escrow, runs the handler
    /// and commits what it charged (the full price, or what the handler metered on the
    /// [`upto::Usage`](crate::upto::Usage) in its request extensions). A `refund` payload is
    /// served without the handler. See [`crate::channel`].
    ///
    /// ```
    /// use tower_x402::channel::serve::{Channels, Escrow};
    /// use tower_x402::channel::store::MemoryChannelStore;
    /// use tower_x402::{Asset, PaymentLayer, PaymentOption};
    /// use tower_x402::primitives::{Address, U256};
    ///
    /// fn layer(escrow: impl Escrow) -> PaymentLayer {
    ///     let option = PaymentOption::batch_settlement(
    ///         &Asset::usdc_base_sepolia(),
    ///         U256::from(1_000),
    ///         Address::repeat_byte(0x11),
    ///         Address::repeat_byte(0x22), // the receiver authorizer's address
    ///         900,
    ///         tower_x402::channel::AssetTransferMethod::Eip3009,
    ///     )
    ///     .unwrap();
    ///     PaymentLayer::builder()
    ///         .accept(option)
    ///         .channels(Channels::new(MemoryChannelStore::new(), escrow))
    ///         .build()
    ///         .unwrap()
    /// }
    /// ```
    pub fn channels<S, X>(mut self, channels: crate::channel::serve::Channels<S, X>) -> Self
    where
        S: crate::channel::store::ChannelStore,
        X: crate::channel::serve::Escrow,
    {
        self.channels = Some(Arc::new(channels));
        self
    }

    setters! {
        /// Sells a prepaid [`Bundle`](crate::prepaid::Bundle) instead of single calls (default
        /// off): the 402 asks for the bundle price and declares `sign-in-with-x`; later calls sign
        /// in with `SIGN-IN-WITH-X` and spend the credit. Requires [`Self::resource_base`]. See
        /// [`crate::prepaid`].
        pub fn prepaid(prepaid: impl Into<crate::prepaid::Prepaid>)
            => prepaid = Some(prepaid.into());

        /// Serves browsers an HTML page that says what the route costs and pays from their
        /// wallet, instead of the 402 JSON (default off; other clients get the same 402 either
        /// way). See [`crate::paywall`].
        #[cfg(feature = "paywall")]
        #[cfg_attr(docsrs, doc(cfg(feature = "paywall")))]
        pub fn paywall(paywall: crate::paywall::Paywall) => paywall = Some(paywall);

        /// Describes how to call the route and what it returns, for discovery: the v2 challenge
        /// carries it as `extensions.bazaar`, as `@x402/extensions` declares it, and a
        /// [`Manifest`](crate::discovery::Manifest) lists it (default none). See
        /// [`crate::discovery`].
        pub fn bazaar(bazaar: crate::discovery::Bazaar) => bazaar = Some(bazaar);

        /// Human name of the service, sent as `resource.serviceName` for discovery catalogues
        /// (default none). Printable ASCII, 1 to 32 characters, else [`build`](Self::build) fails.
        pub fn service_name(name: impl Into<String>) => service_name = Some(name.into());
    }

    /// Topical tags, sent as `resource.tags` for discovery catalogues (default none): at most
    /// 5, each printable ASCII of 1 to 32 characters, no two equal ignoring case, else
    /// [`build`](Self::build) fails.
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags = Some(tags.into_iter().map(Into::into).collect());
        self
    }

    /// Absolute `https://` (or `http://`) URL of the service's icon, sent as
    /// `resource.iconUrl` (default none). A URL that catalogues would drop (IP literal,
    /// `localhost`, user info, over 2048 bytes) makes [`build`](Self::build) fail.
    pub fn icon_url(mut self, url: impl Into<String>) -> Self {
        self.icon_url = Some(url.into());
        self
    }

    /// Validates the configuration and builds the layer.
    ///
    /// # Errors
    /// See [`ConfigError`]: nothing to sell, a bad price, a zero `pay_to`, a missing asset.
    pub fn build(self) -> Result<PaymentLayer, ConfigError> {
        if self.pricing.is_some() && (self.price.is_some() || !self.options.is_empty()) {
            return Err(ConfigError::Contradictory(
                ".pricing(f) decides every request's options: drop .price(..) / .accept(..), or drop .pricing",
            ));
        }
        if self.channels.is_none()
            && self
                .options
                .iter()
                .any(|o| o.requirements().scheme == crate::channel::SCHEME)
        {
            return Err(ConfigError::Contradictory(
                "a batch-settlement option needs .channels(..) to serve its payments",
            ));
        }
        let mut options = self.options;
        let price = self
            .prepaid
            .as_ref()
            .and_then(|p| p.price())
            .map(str::to_owned)
            .or(self.price);
        if let Some(price) = &price {
            let asset = match (&self.asset, self.network) {
                (Some(a), _) => a.clone(),
                (None, Some(n)) => Asset::usdc(n).ok_or(ConfigError::NoAsset)?,
                (None, None) => return Err(ConfigError::NoAsset),
            };
            let pay_to = self.pay_to.ok_or(ConfigError::PayTo)?;
            let mut opt = PaymentOption::exact(&asset, price, pay_to)?;
            if let Some(secs) = self.max_timeout {
                opt = opt.with_max_timeout(secs)?;
            }
            options.insert(0, opt);
        }
        // A dynamic price is checked per request (see `service::charge`).
        if self.mode == SettlementMode::BeforeHandler && options.iter().any(PaymentOption::is_upto)
        {
            return Err(ConfigError::UptoBeforeHandler);
        }
        let pricing = match self.pricing {
            Some(f) => Pricing::Dynamic(f),
            None if options.is_empty() => return Err(ConfigError::NoOptions),
            None => Pricing::Static(options.into()),
        };
        let prepaid = match self.prepaid {
            Some(p) => Some(p.build(self.resource_base.as_deref())?),
            None => None,
        };
        let store = self.store.unwrap_or_else(default_store);
        let challenges = match self.challenges {
            Binding::Keys(keys) => Some(*keys),
            Binding::Off => None,
            Binding::Default => {
                // A key of this process only: ids it issues fail on every other instance.
                let shared = store.is_shared()
                    || self.settler.is_shared()
                    || self
                        .idempotency
                        .as_ref()
                        .is_some_and(|i| i.store.is_shared())
                    || prepaid.as_ref().is_some_and(|p| p.is_shared());
                if shared {
                    return Err(ConfigError::ChallengeKeyRequired);
                }
                Some(ChallengeKeys::process().map_err(|_| ConfigError::NoRandomness)?)
            }
        };
        // A v1 payload cannot echo a challenge id: a bound layer takes it only if told to.
        let accept_v1 = self.accept_v1
            && challenges
                .as_ref()
                .is_none_or(ChallengeKeys::accepts_unbound_v1);
        if !accept_v1 && !self.accept_v2 {
            return Err(ConfigError::NoVersion);
        }
        let idempotency = match self.idempotency {
            Some(mut idem) => {
                idem.required = self.idempotency_required.unwrap_or(idem.required);
                idem.max_body = self.idempotency_max_body.unwrap_or(idem.max_body);
                Some(idem)
            }
            None if self.idempotency_required.is_some() || self.idempotency_max_body.is_some() => {
                return Err(ConfigError::Contradictory(
                    "idempotency_required / idempotency_max_body do nothing without .idempotency(store)",
                ));
            }
            None => None,
        };
        let mut extensions = Map::new();
        if let Some(i) = &idempotency {
            extensions.insert(
                crate::idempotency::EXTENSION.to_owned(),
                crate::idempotency::declaration(i.required),
            );
        }
        if let Some(bazaar) = &self.bazaar {
            extensions.insert(crate::discovery::BAZAAR.to_owned(), bazaar.declaration()?);
        }
        let service = crate::discovery::service_meta(self.service_name, self.tags, self.icon_url)?;
        if self.bazaar.is_some() {
            // Clients echo the extensions and the resource in their payment header.
            let echoed = serde_json::to_string(&extensions).map_or(0, |s| s.len())
                + [
                    &self.description,
                    &self.mime_type,
                    &service.name,
                    &service.icon_url,
                ]
                .iter()
                .map(|s| s.as_ref().map_or(0, String::len))
                .sum::<usize>()
                + service
                    .tags
                    .iter()
                    .flatten()
                    .map(|t| t.len() + 3)
                    .sum::<usize>();
            crate::discovery::check_echo(echoed, self.max_header_bytes)?;
        }
        // No extension offered, no `extensions` field: the challenge stays as it was.
        let extensions = (!extensions.is_empty()).then_some(extensions);
        Ok(PaymentLayer {
            shared: Arc::new(Shared {
                verifier: self.verifier,
                store,
                settler: self.settler,
                mode: self.mode,
                pricing,
                resource_base: self.resource_base,
                description: self.description,
                mime_type: self.mime_type,
                service,
                max_header_bytes: self.max_header_bytes,
                expose_headers: self.expose_headers,
                retry_after: self.retry_after,
                accept_v1,
                accept_v2: self.accept_v2,
                hooks: self.hooks.into(),
                inflight: self.max_verifications.map(Inflight::new),
                resource_check: self.resource_check,
                challenges,
                #[cfg(feature = "paywall")]
                paywall: self
                    .paywall
                    .map(crate::paywall::Paywall::build)
                    .transpose()?,
                idempotency,
                extensions,
                prepaid,
                channels: self.channels,
            }),
        })
    }
}
