//! Tokens: every accepted algorithm from a secret, a JWKS file and a JWKS URL; and every way a
//! token can be wrong.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use walsync_server::{AuthConfig, AuthError, Authenticator};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(sub: &str, aud: &str, lifetime: u64) -> serde_json::Value {
    serde_json::json!({"sub": sub, "aud": aud, "iat": now(), "exp": now() + lifetime})
}

fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    key: &EncodingKey,
    claims: &serde_json::Value,
) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).expect("sign")
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

const JWKS_SECRET: &[u8] = b"jwks-shared-secret-for-tests-0123456789";

/// One token per accepted asymmetric algorithm, signed by the fixture keys.
fn signed_tokens(c: &serde_json::Value) -> Vec<(Algorithm, String)> {
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("rsa");
    let ec256 = EncodingKey::from_ec_pem(&pem("ec256.pem")).expect("ec256");
    let ec384 = EncodingKey::from_ec_pem(&pem("ec384.pem")).expect("ec384");
    let ed = EncodingKey::from_ed_pem(&pem("ed25519.pem")).expect("ed");
    let hs = EncodingKey::from_secret(JWKS_SECRET);
    vec![
        (
            Algorithm::RS256,
            sign(Algorithm::RS256, Some("rsa-1"), &rsa, c),
        ),
        (
            Algorithm::RS384,
            sign(Algorithm::RS384, Some("rsa-1"), &rsa, c),
        ),
        (
            Algorithm::RS512,
            sign(Algorithm::RS512, Some("rsa-1"), &rsa, c),
        ),
        (
            Algorithm::ES256,
            sign(Algorithm::ES256, Some("ec256"), &ec256, c),
        ),
        (
            Algorithm::ES384,
            sign(Algorithm::ES384, Some("ec384"), &ec384, c),
        ),
        (
            Algorithm::EdDSA,
            sign(Algorithm::EdDSA, Some("ed-1"), &ed, c),
        ),
        (
            Algorithm::HS256,
            sign(Algorithm::HS256, Some("hs-1"), &hs, c),
        ),
    ]
}

fn jwks_file_config() -> AuthConfig {
    AuthConfig {
        jwks_file: Some(fixture("jwks.json")),
        audience: vec!["walsync".into()],
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn every_algorithm_from_a_jwks_file() {
    let auth = Authenticator::new(jwks_file_config()).await.expect("keys");
    for (alg, token) in signed_tokens(&claims("u1", "walsync", 600)) {
        let id = auth
            .authenticate(&token)
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(id.user_id, "u1");
        assert!(id.expires_at.is_some());
    }
}

#[tokio::test]
async fn a_kid_must_name_the_key_that_signed() {
    let auth = Authenticator::new(jwks_file_config()).await.expect("keys");
    let ec256 = EncodingKey::from_ec_pem(&pem("ec256.pem")).expect("ec256");
    let c = claims("u1", "walsync", 600);
    let unknown = sign(Algorithm::ES256, Some("nope"), &ec256, &c);
    assert!(matches!(
        auth.authenticate(&unknown).await,
        Err(AuthError::NoKey(_))
    ));
    // A P-256 signature presented under the P-384 key's id.
    let wrong = sign(Algorithm::ES256, Some("ec384"), &ec256, &c);
    assert!(auth.authenticate(&wrong).await.is_err());
}

#[tokio::test]
async fn hs_secrets_of_every_size() {
    let auth = Authenticator::new(AuthConfig {
        secret: Some("top-secret".into()),
        audience: vec!["walsync".into()],
        ..AuthConfig::default()
    })
    .await
    .expect("keys");
    let key = EncodingKey::from_secret(b"top-secret");
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let token = sign(alg, None, &key, &claims("u2", "walsync", 60));
        assert_eq!(
            auth.authenticate(&token).await.expect("valid").user_id,
            "u2"
        );
    }
    let other = EncodingKey::from_secret(b"guessed");
    let forged = sign(Algorithm::HS256, None, &other, &claims("u2", "walsync", 60));
    assert!(auth.authenticate(&forged).await.is_err());
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let auth = Authenticator::new(AuthConfig {
        secret: Some("top-secret".into()),
        audience: vec!["walsync".into()],
        max_lifetime_seconds: Some(3600),
        ..AuthConfig::default()
    })
    .await
    .expect("keys");
    let key = EncodingKey::from_secret(b"top-secret");
    let t = now();
    let cases = [
        (
            "expired",
            serde_json::json!({"sub":"u","aud":"walsync","iat":t-7200,"exp":t-3600}),
        ),
        (
            "wrong audience",
            serde_json::json!({"sub":"u","aud":"other","iat":t,"exp":t+60}),
        ),
        (
            "no audience",
            serde_json::json!({"sub":"u","iat":t,"exp":t+60}),
        ),
        (
            "no sub",
            serde_json::json!({"aud":"walsync","iat":t,"exp":t+60}),
        ),
        (
            "no iat",
            serde_json::json!({"sub":"u","aud":"walsync","exp":t+60}),
        ),
        (
            "no exp",
            serde_json::json!({"sub":"u","aud":"walsync","iat":t}),
        ),
        (
            "too long",
            serde_json::json!({"sub":"u","aud":"walsync","iat":t,"exp":t+7200}),
        ),
        (
            "from the future",
            serde_json::json!({"sub":"u","aud":"walsync","iat":t+3000,"exp":t+3500}),
        ),
        (
            "empty sub",
            serde_json::json!({"sub":"","aud":"walsync","iat":t,"exp":t+60}),
        ),
    ];
    for (what, c) in cases {
        let token = sign(Algorithm::HS256, None, &key, &c);
        assert!(
            auth.authenticate(&token).await.is_err(),
            "{what} was accepted"
        );
    }
    // alg none: header {"alg":"none"}, no signature.
    use base64_helper::b64;
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(
            serde_json::json!({"sub":"u","aud":"walsync","iat":t,"exp":t+60})
                .to_string()
                .as_bytes()
        )
    );
    assert!(auth.authenticate(&none).await.is_err(), "alg none accepted");
    for garbage in ["", "abc", "a.b.c", "Bearer x"] {
        assert!(auth.authenticate(garbage).await.is_err());
    }
    assert!(matches!(
        auth.authenticate_header(None).await,
        Err(AuthError::Missing)
    ));
    assert!(matches!(
        auth.authenticate_header(Some("Basic dTpw")).await,
        Err(AuthError::Scheme)
    ));
}

/// An HTTP server answering `/jwks.json` with the text in the returned cell (which a test may
/// change), counting the requests.
async fn serve_jwks(
    text: String,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<String>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let served = Arc::new(Mutex::new(text));
    let hits = Arc::new(AtomicUsize::new(0));
    let (body, counter) = (served.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let text = body.lock().expect("jwks").clone();
            async move { text }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, served, hits)
}

#[tokio::test]
async fn keys_from_a_jwks_url_are_fetched_and_refreshed_for_new_kids() {
    use std::sync::atomic::Ordering;
    let jwks = std::fs::read_to_string(fixture("jwks.json")).expect("jwks");
    let (addr, _, hits) = serve_jwks(jwks).await;
    let auth = Authenticator::new(AuthConfig {
        jwks_url: Some(format!("http://{addr}/jwks.json")),
        audience: vec!["walsync".into()],
        ..AuthConfig::default()
    })
    .await
    .expect("keys");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    for (alg, token) in signed_tokens(&claims("u3", "walsync", 600)) {
        let result = auth.authenticate(&token).await;
        if alg == Algorithm::HS256 {
            // The set's shared-secret (oct) key is no secret at a URL: it is not used.
            assert!(matches!(result, Err(AuthError::NoKey(_))), "{result:?}");
            continue;
        }
        assert_eq!(
            result.unwrap_or_else(|e| panic!("{alg:?}: {e}")).user_id,
            "u3"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "keys are cached");
    // An unknown kid right after a fetch does not hammer the URL.
    let ed = EncodingKey::from_ed_pem(&pem("ed25519.pem")).expect("ed");
    let unknown = sign(
        Algorithm::EdDSA,
        Some("rotated"),
        &ed,
        &claims("u3", "walsync", 600),
    );
    assert!(auth.authenticate(&unknown).await.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), 1, "refetch is rate limited");
    // An unreachable URL at start is a clear error.
    let err = Authenticator::new(AuthConfig {
        jwks_url: Some("http://127.0.0.1:9/jwks.json".into()),
        audience: vec!["walsync".into()],
        ..AuthConfig::default()
    })
    .await
    .expect_err("unreachable");
    assert!(err.to_string().contains("jwks url"), "{err}");
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn a_jwks_url_is_refetched_after_its_refresh_interval_and_rotated_keys_take_over() {
    use std::sync::atomic::Ordering;
    // The fixture set's public keys, one at a time: the issuer rotates from RSA to EC.
    let fixture_set: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("jwks.json")).expect("jwks"))
            .expect("json");
    let set = |kid: &str| {
        let key = fixture_set["keys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|k| k["kid"] == kid))
            .cloned()
            .expect("fixture key");
        serde_json::json!({ "keys": [key] }).to_string()
    };
    let (addr, served, hits) = serve_jwks(set("rsa-1")).await;
    let auth = Authenticator::new(AuthConfig {
        jwks_url: Some(format!("http://{addr}/jwks.json")),
        jwks_refresh_seconds: Some(1),
        audience: vec!["walsync".into()],
        ..AuthConfig::default()
    })
    .await
    .expect("keys");
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("rsa");
    let ec = EncodingKey::from_ec_pem(&pem("ec256.pem")).expect("ec");
    let c = claims("u4", "walsync", 600);
    let old = sign(Algorithm::RS256, Some("rsa-1"), &rsa, &c);
    let new = sign(Algorithm::ES256, Some("ec256"), &ec, &c);
    assert_eq!(
        auth.authenticate(&old).await.expect("old key").user_id,
        "u4"
    );

    // The issuer rotates its key; after the refresh interval the next token fetches the set again.
    *served.lock().expect("jwks") = set("ec256");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        auth.authenticate(&new).await.expect("new key").user_id,
        "u4"
    );
    assert!(hits.load(Ordering::SeqCst) >= 2, "refetched");
    // The retired key no longer verifies anything.
    assert!(matches!(
        auth.authenticate(&old).await,
        Err(AuthError::NoKey(Some(kid))) if kid == "rsa-1"
    ));
    // A token signed with the retired key under the new kid fails.
    assert!(
        auth.authenticate(&sign(Algorithm::RS256, Some("ec256"), &rsa, &c))
            .await
            .is_err()
    );
}

/// Identity providers' settings: issuer and audience required, `nbf` honoured, keys from a
/// JWKS URL only over https (but on loopback) and never shared secrets, and an audience required
/// whenever keys come from a URL.
#[tokio::test]
async fn issuer_audience_and_key_source_policies() {
    let secret = "policy-secret-0123456789-0123456789";
    let auth = Authenticator::new(AuthConfig {
        secret: Some(secret.into()),
        audience: vec!["walsync".into()],
        issuer: Some("https://issuer.example/".into()),
        ..AuthConfig::default()
    })
    .await
    .expect("keys");
    let key = EncodingKey::from_secret(secret.as_bytes());
    let with = |extra: serde_json::Value| {
        let mut c = claims("u5", "walsync", 600);
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        sign(Algorithm::HS256, None, &key, &c)
    };
    let good = with(serde_json::json!({"iss": "https://issuer.example/"}));
    assert_eq!(auth.authenticate(&good).await.expect("good").user_id, "u5");
    for (why, token) in [
        ("no issuer", with(serde_json::json!({}))),
        (
            "another issuer",
            with(serde_json::json!({"iss": "https://evil.example/"})),
        ),
        (
            "not valid yet",
            with(serde_json::json!({"iss": "https://issuer.example/", "nbf": now() + 3600})),
        ),
    ] {
        assert!(auth.authenticate(&token).await.is_err(), "{why}");
    }
    let valid_since =
        with(serde_json::json!({"iss": "https://issuer.example/", "nbf": now() - 10}));
    assert!(
        auth.authenticate(&valid_since).await.is_ok(),
        "nbf in the past"
    );

    // A JWKS URL: https except on loopback; an audience unless explicitly waived.
    let err = Authenticator::new(AuthConfig {
        jwks_url: Some("http://idp.example/jwks.json".into()),
        audience: vec!["walsync".into()],
        ..AuthConfig::default()
    })
    .await
    .expect_err("plain http");
    assert!(err.to_string().contains("must be https"), "{err}");
    let jwks = std::fs::read_to_string(fixture("jwks.json")).expect("jwks");
    let (addr, _, _) = serve_jwks(jwks).await;
    let url = format!("http://{addr}/jwks.json");
    let err = Authenticator::new(AuthConfig {
        jwks_url: Some(url.clone()),
        ..AuthConfig::default()
    })
    .await
    .expect_err("no audience");
    assert!(
        err.to_string().contains("auth.audience must be set"),
        "{err}"
    );
    Authenticator::new(AuthConfig {
        jwks_url: Some(url),
        accept_any_audience: true,
        ..AuthConfig::default()
    })
    .await
    .expect("waived explicitly");
}

mod base64_helper {
    /// base64url without padding, for hand-made tokens.
    pub(crate) fn b64(input: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

/// Tokens shaped as Supabase Auth, Auth0, Firebase Auth and Keycloak issue them, with the
/// settings the README gives for each: accepted, and the same provider's token for another
/// project, tenant or realm refused.
#[tokio::test]
async fn identity_provider_tokens_of_each_shape() {
    let jwks = std::fs::read_to_string(fixture("jwks.json")).expect("jwks");
    let (addr, _, _) = serve_jwks(jwks).await;
    let url = format!("http://{addr}/jwks.json");
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("rsa");
    let supabase_secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    let t = now();
    struct Case {
        name: &'static str,
        config: AuthConfig,
        good: String,
        foreign: String,
    }
    let rs = |claims: serde_json::Value| sign(Algorithm::RS256, Some("rsa-1"), &rsa, &claims);
    let hs = |claims: serde_json::Value| {
        sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(supabase_secret.as_bytes()),
            &claims,
        )
    };
    let supabase = |project: &str| {
        serde_json::json!({
            "iss": format!("https://{project}.supabase.co/auth/v1"), "sub": "5f0c8a1e-0f4e-4c7e-9d55-6b0a2c7e4d11",
            "aud": "authenticated", "role": "authenticated", "email": "ada@example.com",
            "session_id": "4b8f", "is_anonymous": false, "iat": t, "exp": t + 3600,
        })
    };
    let auth0 = |api: &str| {
        serde_json::json!({
            "iss": "https://tenant.eu.auth0.com/", "sub": "auth0|64f1c2",
            "aud": [api, "https://tenant.eu.auth0.com/userinfo"], "azp": "Zk3p", "scope": "openid profile",
            "iat": t, "exp": t + 3600,
        })
    };
    let firebase = |project: &str| {
        serde_json::json!({
            "iss": format!("https://securetoken.google.com/{project}"), "aud": project,
            "auth_time": t, "user_id": "kR2u", "sub": "kR2u", "iat": t, "exp": t + 3600,
            "firebase": {"identities": {}, "sign_in_provider": "anonymous"},
        })
    };
    let keycloak = |realm: &str| {
        serde_json::json!({
            "iss": format!("https://kc.example.com/realms/{realm}"), "sub": "0b7e6c3a-58c4-4d4a-9a3e-2f1d",
            "aud": ["walsync-app", "account"], "azp": "walsync-app", "typ": "Bearer",
            "realm_access": {"roles": ["offline_access"]}, "iat": t, "exp": t + 300,
        })
    };
    let cases = [
        Case {
            name: "supabase",
            config: AuthConfig {
                secret: Some(supabase_secret.into()),
                issuer: Some("https://abcd.supabase.co/auth/v1".into()),
                audience: vec!["authenticated".into()],
                ..AuthConfig::default()
            },
            good: hs(supabase("abcd")),
            foreign: hs(supabase("other")),
        },
        Case {
            name: "auth0",
            config: AuthConfig {
                jwks_url: Some(url.clone()),
                issuer: Some("https://tenant.eu.auth0.com/".into()),
                audience: vec!["https://api.walsync.example".into()],
                ..AuthConfig::default()
            },
            good: rs(auth0("https://api.walsync.example")),
            foreign: rs(auth0("https://api.other.example")),
        },
        Case {
            name: "firebase",
            config: AuthConfig {
                jwks_url: Some(url.clone()),
                issuer: Some("https://securetoken.google.com/walsync-app".into()),
                audience: vec!["walsync-app".into()],
                ..AuthConfig::default()
            },
            good: rs(firebase("walsync-app")),
            foreign: rs(firebase("someone-else")),
        },
        Case {
            name: "keycloak",
            config: AuthConfig {
                jwks_url: Some(url.clone()),
                issuer: Some("https://kc.example.com/realms/app".into()),
                audience: vec!["walsync-app".into()],
                ..AuthConfig::default()
            },
            good: rs(keycloak("app")),
            foreign: rs(keycloak("other")),
        },
    ];
    for case in cases {
        let auth = Authenticator::new(case.config).await.expect(case.name);
        let who = auth
            .authenticate(&case.good)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert!(!who.user_id.is_empty(), "{}", case.name);
        assert!(
            auth.authenticate(&case.foreign).await.is_err(),
            "{}: another project's token",
            case.name
        );
    }
}

/// A JWKS server that answers its first request with `first`, then the text in the returned
/// cell; while `hang` is set, a request is held (its connection stays open) instead. Counts the
/// requests received and answered.
struct Idp {
    addr: std::net::SocketAddr,
    served: std::sync::Arc<std::sync::Mutex<String>>,
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn idp(text: String) -> Idp {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let served = Arc::new(Mutex::new(text));
    let hang = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (body, h, r, a) = (
        served.clone(),
        hang.clone(),
        received.clone(),
        answered.clone(),
    );
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (body, h, a) = (body.clone(), h.clone(), a.clone());
            r.fetch_add(1, Ordering::SeqCst);
            async move {
                if h.load(Ordering::SeqCst) {
                    // Far longer than any bound of the authenticator: the fetch times out.
                    tokio::time::sleep(Duration::from_secs(300)).await;
                }
                a.fetch_add(1, Ordering::SeqCst);
                body.lock().expect("jwks").clone()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Idp {
        addr,
        served,
        hang,
        received,
        answered,
    }
}

fn fixture_set(kids: &[&str]) -> String {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("jwks.json")).expect("jwks"))
            .expect("json");
    let keys: Vec<serde_json::Value> = all["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| kids.iter().any(|kid| k["kid"] == *kid))
        .cloned()
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen");
}

/// An identity provider that hangs after its first answer holds up no request: the refresh
/// runs in the background, one fetch however many requests arrive, and the cached keys keep
/// answering; a request with an unknown kid joins the running fetch and gives up after a
/// short bound.
#[tokio::test]
async fn a_hanging_identity_provider_holds_up_no_request() {
    use std::sync::atomic::Ordering;
    let idp = idp(fixture_set(&["rsa-1"])).await;
    let auth = std::sync::Arc::new(
        Authenticator::new(AuthConfig {
            jwks_url: Some(format!("http://{}/jwks.json", idp.addr)),
            jwks_refresh_seconds: Some(1),
            audience: vec!["walsync".into()],
            ..AuthConfig::default()
        })
        .await
        .expect("keys"),
    );
    assert_eq!(idp.answered.load(Ordering::SeqCst), 1);
    idp.hang.store(true, Ordering::SeqCst);
    // The refresh a second later hangs.
    until("the background refresh", || {
        idp.received.load(Ordering::SeqCst) == 2
    })
    .await;

    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("rsa");
    let ed = EncodingKey::from_ed_pem(&pem("ed25519.pem")).expect("ed");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let auth = auth.clone();
        let c = claims(&format!("u{i}"), "walsync", 600);
        let token = if i % 10 == 9 {
            // An unknown kid: it waits for the running fetch, at most a short bound.
            sign(Algorithm::EdDSA, Some("ed-unknown"), &ed, &c)
        } else {
            sign(Algorithm::RS256, Some("rsa-1"), &rsa, &c)
        };
        tasks.push(tokio::spawn(
            async move { (i, auth.authenticate(&token).await) },
        ));
    }
    for task in tasks {
        let (i, result) = task.await.expect("task");
        if i % 10 == 9 {
            assert!(matches!(result, Err(AuthError::NoKey(_))), "{result:?}");
        } else {
            assert_eq!(result.expect("cached key").user_id, format!("u{i}"));
        }
    }
    // Every request was answered while the one refresh was still hanging: none waited for it,
    // and no request started a fetch of its own.
    assert_eq!(
        idp.answered.load(Ordering::SeqCst),
        1,
        "the refresh still hangs"
    );
    assert_eq!(
        idp.received.load(Ordering::SeqCst),
        2,
        "one fetch in flight"
    );
}

/// Fifty requests with a kid the cached set lacks cause one refetch between them, and all are
/// answered with the key it brings.
#[tokio::test]
async fn concurrent_unknown_kids_cause_one_refetch() {
    use std::sync::atomic::Ordering;
    let idp = idp(fixture_set(&["rsa-1"])).await;
    let auth = std::sync::Arc::new(
        Authenticator::new(AuthConfig {
            jwks_url: Some(format!("http://{}/jwks.json", idp.addr)),
            jwks_min_refetch_seconds: Some(0),
            audience: vec!["walsync".into()],
            ..AuthConfig::default()
        })
        .await
        .expect("keys"),
    );
    // The issuer adds a key; tokens signed with it arrive at once.
    *idp.served.lock().expect("jwks") = fixture_set(&["rsa-1", "ec256"]);
    let ec = EncodingKey::from_ec_pem(&pem("ec256.pem")).expect("ec");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let auth = auth.clone();
        let token = sign(
            Algorithm::ES256,
            Some("ec256"),
            &ec,
            &claims(&format!("u{i}"), "walsync", 600),
        );
        tasks.push(tokio::spawn(async move { auth.authenticate(&token).await }));
    }
    for task in tasks {
        task.await.expect("task").expect("the refetched key");
    }
    assert_eq!(idp.received.load(Ordering::SeqCst), 2, "one refetch");
}

/// A failing identity provider is retried with backoff while the cached keys keep serving, and
/// its keys are taken again once it answers.
#[tokio::test]
async fn a_failing_identity_provider_is_retried_and_cached_keys_serve_meanwhile() {
    use std::sync::atomic::Ordering;
    let idp = idp(fixture_set(&["rsa-1"])).await;
    let auth = Authenticator::new(AuthConfig {
        jwks_url: Some(format!("http://{}/jwks.json", idp.addr)),
        jwks_refresh_seconds: Some(1),
        audience: vec!["walsync".into()],
        ..AuthConfig::default()
    })
    .await
    .expect("keys");
    // The provider answers garbage for a while.
    *idp.served.lock().expect("jwks") = "<html>maintenance</html>".into();
    until("two failed refreshes", || {
        idp.answered.load(Ordering::SeqCst) >= 3
    })
    .await;
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("rsa");
    let ec = EncodingKey::from_ec_pem(&pem("ec256.pem")).expect("ec");
    let old = sign(
        Algorithm::RS256,
        Some("rsa-1"),
        &rsa,
        &claims("u1", "walsync", 600),
    );
    assert_eq!(auth.authenticate(&old).await.expect("cached").user_id, "u1");
    // It recovers with a rotated set: the next refresh takes it.
    *idp.served.lock().expect("jwks") = fixture_set(&["ec256"]);
    let new = sign(
        Algorithm::ES256,
        Some("ec256"),
        &ec,
        &claims("u2", "walsync", 600),
    );
    let seen = idp.answered.load(Ordering::SeqCst);
    until("a refresh after recovery", || {
        idp.answered.load(Ordering::SeqCst) > seen
    })
    .await;
    // The refresh that answered may still be replacing the keys: give it a moment.
    for _ in 0..100 {
        if auth.authenticate(&new).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the rotated key was never taken");
}

/// Key confusion (an HS256 token keyed with an asymmetric key's public material, naming that
/// key), algorithms the key does not have, and tokens too large to be real: all refused.
#[tokio::test]
async fn confused_and_oversized_tokens_are_refused() {
    let auth = Authenticator::new(jwks_file_config()).await.expect("keys");
    let c = claims("u1", "walsync", 600);
    let jwks: serde_json::Value = serde_json::from_slice(&pem("jwks.json")).expect("jwks fixture");
    let rsa_jwk = jwks["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["kid"] == "rsa-1"))
        .expect("rsa-1")
        .clone();
    let n = rsa_jwk["n"].as_str().expect("n").to_owned();
    // Whatever an attacker could take for the RSA key's bytes, as an HMAC secret.
    for secret in [
        rsa_jwk.to_string().into_bytes(),
        jwks.to_string().into_bytes(),
        n.clone().into_bytes(),
        pem("rsa.pem"),
    ] {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let forged = sign(alg, Some("rsa-1"), &EncodingKey::from_secret(&secret), &c);
            assert!(
                auth.authenticate(&forged).await.is_err(),
                "{alg:?} keyed with the rsa key's material was accepted"
            );
        }
    }
    // An EC key's kid on an RSA signature, an RSA kid on an EdDSA one.
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("rsa");
    let ed = EncodingKey::from_ed_pem(&pem("ed25519.pem")).expect("ed");
    for token in [
        sign(Algorithm::RS256, Some("ec256"), &rsa, &c),
        sign(Algorithm::EdDSA, Some("rsa-1"), &ed, &c),
        sign(Algorithm::PS256, Some("rsa-1"), &rsa, &c),
    ] {
        assert!(auth.authenticate(&token).await.is_err());
    }
    // Too large to be real, however well formed: refused before it is parsed.
    let mut fat = c.clone();
    fat["padding"] = serde_json::Value::String("x".repeat(64 * 1024));
    let fat = sign(Algorithm::RS256, Some("rsa-1"), &rsa, &fat);
    match auth.authenticate(&fat).await {
        Err(AuthError::Invalid(why)) => assert!(why.contains("at most"), "{why}"),
        other => panic!("a 64 KiB token: {other:?}"),
    }
    // A header nested deeply, and one that is not JSON.
    use base64_helper::b64;
    let deep = format!(
        "{}.{}.c2ln",
        b64(format!("{}{}", "[".repeat(5000), "]".repeat(5000)).as_bytes()),
        b64(c.to_string().as_bytes())
    );
    assert!(auth.authenticate(&deep).await.is_err());
    let binary = format!("{}.{}.c2ln", b64(&[0xff, 0xfe, 0x00]), b64(b"{}"));
    assert!(auth.authenticate(&binary).await.is_err());
}
