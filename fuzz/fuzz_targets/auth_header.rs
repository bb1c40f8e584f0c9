//! Feeds arbitrary bytes to the `Authorization` header parser and the token validator, as a
//! request's header reaches them (a header value, read as text when it is text). None may
//! panic, and nothing but a token signed with the configured secret is accepted.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use walsync_server::{AuthConfig, Authenticator};

struct Fixture {
    runtime: tokio::runtime::Runtime,
    auth: Authenticator,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let auth = runtime
            .block_on(Authenticator::new(AuthConfig {
                secret: Some("fuzz-secret".into()),
                ..AuthConfig::default()
            }))
            .expect("authenticator");
        Fixture { runtime, auth }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let text = value.to_str().unwrap_or("");
    let result = f.runtime.block_on(f.auth.authenticate_header(Some(text)));
    // Random bytes never forge a signature with the secret.
    assert!(result.is_err(), "accepted {text:?}");
});
