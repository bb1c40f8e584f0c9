//! JWT authentication with `jsonwebtoken`.
//!
//! Keys come from a shared secret (HS256/384/512), a JWKS file, or a JWKS URL. A token must carry `sub`, `exp` and `iat`, be signed with one of the
//! allowed algorithms by a key of the same family (`kid` must match when the token names one),
//! carry a configured audience when audiences are configured (which keys from a JWKS URL require
//! unless waived), carry the configured issuer when one is set, not be used before its `nbf`, and
//! live no longer than [`AuthConfig::max_lifetime`]. A JWKS URL must be https (except on
//! loopback), and shared-secret (`oct`) keys are taken only from a file or the config, never
//! from a URL. `alg: none` cannot even be expressed in the header type and is
//! refused like any other malformed token.
//!
//! **JWKS refresh.** The URL is fetched once at start (a failure stops the start), then by one
//! background task only — single flight, however many requests arrive — every
//! [`AuthConfig::jwks_refresh`], and early when a token names an unknown `kid` (at most once per
//! [`AuthConfig::jwks_min_refetch`]). Requests never wait for a scheduled refresh: the cached
//! keys keep serving while one runs or fails, and a failing identity provider is retried with
//! backoff. Only a request whose `kid` is unknown waits for the refetch it caused (or the one
//! running), and no longer than [`UNKNOWN_KID_WAIT`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use walsync_sync::Identity;

/// The default smallest interval between two fetches of a JWKS URL caused by unknown `kid`s
/// (a stream of tokens with made-up kids must not turn walsync against the identity provider).
pub const MIN_REFETCH: Duration = Duration::from_secs(30);

/// The longest a request with an unknown `kid` waits for the refetch it caused: long enough
/// for an identity provider that answers, short enough that a hanging one does not hold
/// clients (they get 401 and retry).
pub const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);

/// The longest one fetch of the JWKS URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The first retry after a failed refresh; doubled at each failure up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

const ALLOWED: &[Algorithm] = &[
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing authorization header")]
    Missing,
    #[error("authorization header is not `Bearer <jwt>` or `Token <jwt>`")]
    Scheme,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("no key matches the token (kid {0:?})")]
    NoKey(Option<String>),
    #[error("token lifetime {0}s exceeds the maximum of {1}s")]
    Lifetime(u64, u64),
    #[error("token has no string `sub`")]
    Subject,
}

impl AuthError {
    /// Why, as one word of a fixed set (a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Scheme => "scheme",
            AuthError::Invalid(_) => "invalid",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::NoKey(_) => "no_key",
            AuthError::Lifetime(..) => "lifetime",
            AuthError::Subject => "subject",
        }
    }
}

/// Where keys come from, and what a token must satisfy.
#[derive(Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// A shared secret for HS256/384/512 (raw text).
    pub secret: Option<String>,
    /// A JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL.
    pub jwks_url: Option<String>,
    /// Seconds between refreshes of `jwks_url` (default 300).
    pub jwks_refresh_seconds: Option<u64>,
    /// Seconds at least between two early fetches of `jwks_url` caused by unknown `kid`s
    /// (default 30).
    pub jwks_min_refetch_seconds: Option<u64>,
    /// Accepted audiences; a token must name one of them. Empty: `aud` is not checked, which
    /// is refused with `jwks_url` unless `accept_any_audience` says so: identity providers
    /// (Firebase, Auth0, …) sign every tenant's tokens with the same keys.
    pub audience: Vec<String>,
    /// Accept tokens for any audience although keys come from `jwks_url`.
    pub accept_any_audience: bool,
    /// The required `iss`: when set, a token must carry exactly this issuer.
    pub issuer: Option<String>,
    /// The longest accepted `exp - iat`, in seconds (default 86,400).
    pub max_lifetime_seconds: Option<u64>,
    /// Seconds of clock skew tolerated (default 30).
    pub leeway_seconds: Option<u64>,
}

impl std::fmt::Debug for AuthConfig {
    /// Secrets are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("jwks_file", &self.jwks_file)
            .field("jwks_url", &self.jwks_url)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("max_lifetime_seconds", &self.max_lifetime_seconds)
            .finish()
    }
}

impl AuthConfig {
    pub fn max_lifetime(&self) -> Duration {
        Duration::from_secs(self.max_lifetime_seconds.unwrap_or(86_400))
    }

    pub fn jwks_refresh(&self) -> Duration {
        Duration::from_secs(self.jwks_refresh_seconds.unwrap_or(300).max(1))
    }

    pub fn jwks_min_refetch(&self) -> Duration {
        self.jwks_min_refetch_seconds
            .map_or(MIN_REFETCH, Duration::from_secs)
    }
}

struct Key {
    kid: Option<String>,
    /// The algorithm the JWK pins, if any.
    alg: Option<Algorithm>,
    key: DecodingKey,
    /// Fetched from the JWKS URL (replaced at each refresh).
    from_url: bool,
}

#[derive(Default)]
struct Keys {
    list: Vec<Key>,
    fetched: Option<Instant>,
}

/// Validates tokens.
pub struct Authenticator {
    inner: Arc<Inner>,
    /// The JWKS refresher, ended with the authenticator.
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        if let Some(task) = &self.refresher {
            task.abort();
        }
    }
}

/// What the authenticator and its refresher share.
struct Inner {
    config: AuthConfig,
    keys: RwLock<Keys>,
    http: Option<reqwest::Client>,
    /// Wakes the refresher early (an unknown `kid`).
    wake: tokio::sync::Notify,
    /// Counts the refresher's finished fetch attempts, successful or not.
    attempts: tokio::sync::watch::Sender<u64>,
    /// The refresher is fetching.
    in_flight: AtomicBool,
    /// The last early fetch asked for: when, and the attempt count at the time.
    forced: Mutex<Option<(Instant, u64)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("no key configured: set auth.secret, auth.jwks_file or auth.jwks_url")]
    NoKeys,
    #[error("jwks file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("jwks url: {0}")]
    Url(String),
    #[error("auth configuration: {0}")]
    Config(String),
}

/// A JWKS URL must be https, except on loopback (a local identity provider, tests).
fn check_jwks_url(url: &str) -> Result<(), KeyLoadError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| KeyLoadError::Url(format!("{url}: {e}")))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        scheme => Err(KeyLoadError::Config(format!(
            "auth.jwks_url must be https (it is {scheme}): keys fetched in the clear can be replaced on the way"
        ))),
    }
}

/// Longest token accepted: 16 KiB. Identity providers' tokens are a few KiB at most (a token
/// carrying many claims, such as group lists, stays under 8 KiB), and HTTP servers commonly cap
/// a header at 8-16 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let name = serde_json::to_value(jwk.common.key_algorithm?).ok()?;
    serde_json::from_value(name).ok()
}

fn keys_of(set: &JwkSet, from_url: bool) -> Vec<Key> {
    set.keys
        .iter()
        .filter(|jwk| {
            // A shared secret published at a URL is no secret: only local files hold `oct` keys.
            let shared = matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_));
            if shared && from_url {
                tracing::warn!(kid = ?jwk.common.key_id, "ignoring a shared-secret (oct) key from the jwks url");
            }
            !(shared && from_url)
        })
        .filter_map(|jwk| match DecodingKey::from_jwk(jwk) {
            Ok(key) => Some(Key {
                kid: jwk.common.key_id.clone(),
                alg: algorithm_of(jwk),
                key,
                from_url,
            }),
            Err(e) => {
                tracing::warn!(kid = ?jwk.common.key_id, error = %e, "skipping an unusable jwk");
                None
            }
        })
        .collect()
}

fn parse_jwks(text: &str) -> Result<JwkSet, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

impl Authenticator {
    /// Loads the configured keys (fetching the JWKS URL once).
    pub async fn new(config: AuthConfig) -> Result<Authenticator, KeyLoadError> {
        if let Some(url) = &config.jwks_url {
            check_jwks_url(url)?;
            if config.audience.is_empty() && !config.accept_any_audience {
                return Err(KeyLoadError::Config(
                    "auth.audience must be set when keys come from auth.jwks_url: identity providers sign \
                     other tenants' tokens with the same keys (set auth.accept_any_audience = true to accept any)"
                        .into(),
                ));
            }
        }
        let mut list = Vec::new();
        if let Some(secret) = &config.secret {
            list.push(Key {
                kid: None,
                alg: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                from_url: false,
            });
        }
        if let Some(path) = &config.jwks_file {
            let text = std::fs::read_to_string(path).map_err(|e| KeyLoadError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let set = parse_jwks(&text).map_err(|message| KeyLoadError::File {
                path: path.clone(),
                message,
            })?;
            list.extend(keys_of(&set, false));
        }
        let http = match &config.jwks_url {
            Some(_) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                Some(
                    reqwest::Client::builder()
                        .timeout(FETCH_TIMEOUT)
                        .build()
                        .map_err(|e| KeyLoadError::Url(e.to_string()))?,
                )
            }
            None => None,
        };
        let inner = Arc::new(Inner {
            config,
            keys: RwLock::new(Keys {
                list,
                fetched: None,
            }),
            http,
            wake: tokio::sync::Notify::new(),
            attempts: tokio::sync::watch::Sender::new(0),
            in_flight: AtomicBool::new(false),
            forced: Mutex::new(None),
        });
        let mut refresher = None;
        if inner.config.jwks_url.is_some() {
            inner.fetch().await?;
            refresher = Some(tokio::spawn(tracing::Instrument::instrument(
                inner.clone().refresh_forever(),
                tracing::info_span!("walsync-jwks"),
            )));
        }
        if inner.read_keys().list.is_empty() {
            return Err(KeyLoadError::NoKeys);
        }
        Ok(Authenticator { inner, refresher })
    }

    /// Validates the value of an `Authorization` header.
    pub async fn authenticate_header(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let header = header.ok_or(AuthError::Missing)?.trim();
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("Token "))
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::Scheme)?
            .trim();
        self.authenticate(token).await
    }

    /// Validates a token. Waits only when its `kid` is unknown, for the refetch that causes (at
    /// most [`UNKNOWN_KID_WAIT`]).
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        match self.inner.check(token) {
            Err(AuthError::NoKey(kid)) if self.inner.refetch_for_unknown_kid().await => {
                self.inner.check(token).map_err(|e| match e {
                    AuthError::NoKey(_) => AuthError::NoKey(kid),
                    e => e,
                })
            }
            r => r,
        }
    }
}

impl Inner {
    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The refresher: fetches every refresh interval, early when woken, and after a failure
    /// again with backoff; the cached keys serve meanwhile.
    async fn refresh_forever(self: Arc<Inner>) {
        let interval = self.config.jwks_refresh();
        let mut delay = interval;
        let mut retry = FIRST_RETRY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.wake.notified() => {}
            }
            self.in_flight.store(true, Ordering::SeqCst);
            let result = self.fetch().await;
            self.in_flight.store(false, Ordering::SeqCst);
            self.attempts.send_modify(|n| *n += 1);
            match result {
                Ok(()) => {
                    delay = interval;
                    retry = FIRST_RETRY;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?retry.min(interval), "could not refresh the jwks; the cached keys keep serving");
                    delay = retry.min(interval);
                    retry = (retry * 2).min(interval);
                }
            }
        }
    }

    /// Asks the refresher for an early fetch, or joins the one asked for or running; returns
    /// whether a fetch finished (waiting at most [`UNKNOWN_KID_WAIT`]). Rate limited: at most
    /// one early fetch per [`AuthConfig::jwks_min_refetch`] after the last fetch.
    async fn refetch_for_unknown_kid(&self) -> bool {
        if self.config.jwks_url.is_none() {
            return false;
        }
        // Subscribed before deciding: a fetch that ends after this point is seen.
        let mut attempts = self.attempts.subscribe();
        let now_count = *attempts.borrow_and_update();
        {
            let mut forced = self.forced.lock().unwrap_or_else(|p| p.into_inner());
            let pending = forced.is_some_and(|(_, count)| count == now_count);
            if !pending && !self.in_flight.load(Ordering::SeqCst) {
                let min = self.config.jwks_min_refetch();
                let last = [self.read_keys().fetched, forced.map(|(at, _)| at)]
                    .into_iter()
                    .flatten()
                    .max();
                if last.is_some_and(|at| at.elapsed() < min) {
                    return false;
                }
                *forced = Some((Instant::now(), now_count));
                self.wake.notify_one();
            }
        }
        matches!(
            tokio::time::timeout(UNKNOWN_KID_WAIT, attempts.changed()).await,
            Ok(Ok(()))
        )
    }

    /// Fetches the JWKS URL and replaces the keys it gave before.
    async fn fetch(&self) -> Result<(), KeyLoadError> {
        let (Some(url), Some(http)) = (&self.config.jwks_url, &self.http) else {
            return Ok(());
        };
        let text = http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| KeyLoadError::Url(e.to_string()))?
            .text()
            .await
            .map_err(|e| KeyLoadError::Url(e.to_string()))?;
        let set = parse_jwks(&text).map_err(KeyLoadError::Url)?;
        let fetched = keys_of(&set, true);
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.list.retain(|k| !k.from_url);
        keys.list.extend(fetched);
        keys.fetched = Some(Instant::now());
        Ok(())
    }

    fn check(&self, token: &str) -> Result<Identity, AuthError> {
        // Refused before any parsing: no identity provider's token comes near this.
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid(format!(
                "token of {} bytes; at most {MAX_TOKEN_BYTES} are accepted",
                token.len()
            )));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let alg = header.alg;
        if !ALLOWED.contains(&alg) {
            return Err(AuthError::Algorithm(alg));
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.config.leeway_seconds.unwrap_or(30);
        validation.validate_nbf = true;
        let mut required = vec!["sub", "exp", "iat"];
        if self.config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            required.push("aud");
            validation.set_audience(&self.config.audience);
        }
        if let Some(iss) = &self.config.issuer {
            required.push("iss");
            validation.set_issuer(&[iss]);
        }
        validation.set_required_spec_claims(&required);
        let keys = self.read_keys();
        let candidates = keys.list.iter().filter(|k| {
            k.key.family() == alg.family()
                && k.alg.is_none_or(|a| a == alg)
                && match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    // A token naming a kid matches only that key, or the shared secret.
                    (Some(_), None) => true,
                    (None, _) => true,
                }
        });
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(data) => return self.identity(data.claims),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(AuthError::Invalid(e.to_string())),
            None => Err(AuthError::NoKey(header.kid)),
        }
    }

    fn identity(&self, claims: serde_json::Value) -> Result<Identity, AuthError> {
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .ok_or(AuthError::Subject)?
            .to_owned();
        let num = |k: &str| claims.get(k).and_then(|v| v.as_u64());
        let (Some(exp), Some(iat)) = (num("exp"), num("iat")) else {
            return Err(AuthError::Invalid("exp and iat must be numbers".into()));
        };
        let max = self.config.max_lifetime().as_secs();
        let lifetime = exp.saturating_sub(iat);
        if lifetime > max {
            return Err(AuthError::Lifetime(lifetime, max));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if iat > now + self.config.leeway_seconds.unwrap_or(30) {
            return Err(AuthError::Invalid("token issued in the future".into()));
        }
        Ok(Identity {
            user_id: sub,
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(exp)),
            claims,
        })
    }
}

/// Mints an HS256 token for `user` (dev tokens: `walsync token`, the demo and tests).
pub fn mint_hs256(
    secret: &str,
    user: &str,
    audience: Option<&str>,
    lifetime: Duration,
) -> Result<String, AuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = serde_json::json!({
        "sub": user,
        "iat": now,
        "exp": now + lifetime.as_secs(),
    });
    if let Some(aud) = audience {
        claims["aud"] = serde_json::Value::String(aud.to_owned());
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| AuthError::Invalid(e.to_string()))
}
