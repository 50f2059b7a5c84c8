//! Verifying tokens with the keys of a real OpenID Connect provider: the certified
//! `oidc-provider` of `deploy/oidc-dev`, started on loopback for each test. Genuine tokens come
//! from its token endpoint; forged ones are signed with its own keys (got from its admin route)
//! or an attacker's, to show that only what the provider issued, as it issued it, gets in.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use service_kit::auth::{AuthConfig, AuthError, Authenticator, OidcConfig, Role, VerificationKey};
use service_kit::dev_provider::{DevProvider, ProviderKey, ProviderSlot};

const ALGORITHMS: [&str; 4] = ["RS256", "PS256", "ES256", "EdDSA"];

/// A provider signing with a fresh key of each of `algs`, with a client per algorithm (named
/// after it, secret `secret`) whose tokens are for tenant `acme` with the role `teller`.
async fn provider(algs: &[&str]) -> DevProvider {
    let clients: Vec<Value> = ALGORITHMS
        .iter()
        .map(|alg| {
            json!({"client_id": alg, "client_secret": "secret", "alg": alg,
                          "tenant": "acme", "roles": ["teller"]})
        })
        .collect();
    DevProvider::start(0, &json!({"algs": algs, "clients": clients}))
        .await
        .expect("start the provider")
}

/// A verifier of `issuer`'s tokens, keeping its keys fresh in the background.
fn verifier(issuer: &str, refresh: Duration, min_refresh: Duration) -> Arc<Authenticator> {
    let auth = Arc::new(
        Authenticator::new(&AuthConfig {
            key: VerificationKey::Oidc(OidcConfig {
                refresh,
                min_refresh,
                ..OidcConfig::new(issuer)
            }),
            ..AuthConfig::for_provider(issuer)
        })
        .expect("verifier"),
    );
    tokio::spawn(auth.clone().keep_keys_fresh(std::future::pending()));
    auth
}

/// A verifier with the default intervals, once it loaded the keys.
async fn loaded_verifier(issuer: &str) -> Arc<Authenticator> {
    let auth = verifier(
        issuer,
        OidcConfig::new(issuer).refresh,
        OidcConfig::new(issuer).min_refresh,
    );
    until("the keys are loaded", || async { auth.keys_loaded() }).await;
    auth
}

/// Waits (up to 15 s) until `done` holds.
async fn until<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done().await {
        assert!(Instant::now() < deadline, "not within 15 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims as the provider would issue them to a teller of `acme`.
fn claims(issuer: &str) -> Value {
    json!({"sub": "mallory", "tenant": "acme", "roles": ["teller"], "iss": issuer,
           "aud": "ledger", "exp": now() + 600, "iat": now()})
}

fn encoding_key(key: &ProviderKey) -> EncodingKey {
    let pem = key.private_pem.as_bytes();
    match key.alg.as_str() {
        "ES256" => EncodingKey::from_ec_pem(pem),
        "EdDSA" => EncodingKey::from_ed_pem(pem),
        _ => EncodingKey::from_rsa_pem(pem),
    }
    .expect("the provider's private key")
}

/// A token with `header` and `claims`, signed with `key` in `header.alg`.
fn sign(header: Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn header(alg: Algorithm, kid: &str) -> Header {
    Header {
        kid: Some(kid.to_owned()),
        ..Header::new(alg)
    }
}

fn alg_of(token: &str) -> Algorithm {
    jsonwebtoken::decode_header(token).unwrap().alg
}

#[tokio::test]
async fn accepts_the_providers_tokens_in_each_algorithm() {
    let provider = provider(&ALGORITHMS).await;
    let auth = loaded_verifier(&provider.issuer).await;
    for (name, algorithm) in ALGORITHMS.iter().zip([
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::EdDSA,
    ]) {
        let token = provider.token(name, "secret", "teller").await.unwrap();
        assert_eq!(alg_of(&token), algorithm);
        let principal = auth
            .verify(&token)
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(principal.subject, *name);
        assert_eq!(principal.tenant, "acme");
        assert!(principal.roles.contains(&Role::Teller));
    }
}

#[tokio::test]
async fn a_key_added_at_the_provider_is_accepted_at_once() {
    let provider = provider(&["RS256"]).await;
    let auth = loaded_verifier(&provider.issuer).await;
    let before = provider.token("RS256", "secret", "teller").await.unwrap();
    auth.verify(&before).await.unwrap();
    let keys = provider.rotate(&["ES256"], &[]).await.unwrap();
    let after = provider.token("ES256", "secret", "teller").await.unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&after).unwrap().kid.as_deref(),
        Some(keys[0].kid.as_str())
    );
    let principal = auth
        .verify(&after)
        .await
        .expect("the new key, fetched at once");
    assert_eq!(principal.subject, "ES256");
    auth.verify(&before)
        .await
        .expect("the old key still published");
}

#[tokio::test]
async fn a_key_removed_at_the_provider_is_refused_after_the_next_fetch() {
    let provider = provider(&["RS256"]).await;
    // Refreshing often; and never for an unknown `kid` during the test, so that the removal
    // can only be seen through the periodic refresh.
    let auth = verifier(
        &provider.issuer,
        Duration::from_millis(300),
        Duration::from_secs(3600),
    );
    let old = provider.token("RS256", "secret", "teller").await.unwrap();
    until("the old token is accepted", || async {
        auth.verify(&old).await.is_ok()
    })
    .await;
    let old_kid = provider.keys().await.unwrap()[0].kid.clone();
    provider.rotate(&["RS256"], &[&old_kid]).await.unwrap();
    until("the old key is refused", || async {
        matches!(
            auth.verify(&old).await,
            Err(AuthError::InvalidToken("unknown signing key"))
        )
    })
    .await;
    let new = provider.token("RS256", "secret", "teller").await.unwrap();
    auth.verify(&new)
        .await
        .expect("the new key, fetched on schedule");
}

#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_the_keys_once_per_interval() {
    let provider = provider(&["RS256"]).await;
    let auth = verifier(
        &provider.issuer,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    );
    until("the keys are loaded", || async { auth.keys_loaded() }).await;
    let before = provider.jwks_requests().await.unwrap();
    // Made-up key ids; what signs them does not matter, as no key is found to check it.
    let key = EncodingKey::from_secret(b"the-attacker-s-own-secret-0123456789");
    let mut flood = tokio::task::JoinSet::new();
    for n in 0..200 {
        let token = sign(
            header(Algorithm::HS256, &format!("forged-{n}")),
            &claims(&provider.issuer),
            &key,
        );
        let auth = auth.clone();
        flood.spawn(async move { auth.verify(&token).await });
    }
    for outcome in flood.join_all().await {
        assert!(
            matches!(outcome, Err(AuthError::InvalidToken("unknown signing key"))),
            "{outcome:?}"
        );
    }
    assert_eq!(
        provider.jwks_requests().await.unwrap(),
        before + 1,
        "one fetch for the whole flood"
    );
}

/// `claims` with the fields of `patch` replaced.
fn patched(claims: &Value, patch: Value) -> Value {
    let mut claims = claims.clone();
    claims
        .as_object_mut()
        .unwrap()
        .extend(patch.as_object().unwrap().clone());
    claims
}

#[tokio::test]
async fn refuses_tokens_of_another_issuer_or_audience_and_expired_ones() {
    let provider = provider(&["RS256"]).await;
    let auth = loaded_verifier(&provider.issuer).await;
    let key = &provider.keys().await.unwrap()[0];
    let signing = encoding_key(key);
    let issued = claims(&provider.issuer);
    let signed = |claims: &Value| sign(header(Algorithm::RS256, &key.kid), claims, &signing);
    auth.verify(&signed(&issued))
        .await
        .expect("well-formed claims signed with the provider's key");
    let refused = [
        (
            patched(&issued, json!({"iss": "https://elsewhere.example"})),
            "wrong issuer",
        ),
        (
            patched(&issued, json!({"aud": "another-api"})),
            "wrong audience",
        ),
        (
            patched(&issued, json!({"aud": ["account", "another-api"]})),
            "wrong audience",
        ),
    ];
    for (claims, reason) in refused {
        let outcome = auth.verify(&signed(&claims)).await;
        assert!(
            matches!(outcome, Err(AuthError::InvalidToken(r)) if r == reason),
            "{claims}: {outcome:?}"
        );
    }
    let expired = patched(&issued, json!({"exp": now() - 60, "iat": now() - 660}));
    assert!(matches!(
        auth.verify(&signed(&expired)).await,
        Err(AuthError::ExpiredToken)
    ));
}

#[tokio::test]
async fn the_algorithm_comes_from_the_key_never_from_the_token() {
    let provider = provider(&["RS256"]).await;
    let auth = loaded_verifier(&provider.issuer).await;
    let key = &provider.keys().await.unwrap()[0];
    let issued = claims(&provider.issuer);
    // PS256 with the provider's own RSA key: a valid signature, in an algorithm the key is
    // not published for.
    let pss = sign(
        header(Algorithm::PS256, &key.kid),
        &issued,
        &encoding_key(key),
    );
    assert!(matches!(
        auth.verify(&pss).await,
        Err(AuthError::InvalidToken("algorithm not accepted"))
    ));
    // The classic confusion: HS256 keyed with the public key, which anyone can fetch.
    let hmac = sign(
        header(Algorithm::HS256, &key.kid),
        &issued,
        &EncodingKey::from_secret(key.public_pem.as_bytes()),
    );
    assert!(matches!(
        auth.verify(&hmac).await,
        Err(AuthError::InvalidToken("algorithm not accepted"))
    ));
}

#[tokio::test]
async fn a_token_cannot_bring_its_own_key() {
    let provider = provider(&["RS256"]).await;
    // The attacker's own provider, serving the attacker's keys where `jku` points.
    let attacker = self::provider(&["RS256"]).await;
    let auth = loaded_verifier(&provider.issuer).await;
    let their_key = &attacker.keys().await.unwrap()[0];
    let jwks: Value = reqwest::get(format!("{}/jwks", attacker.issuer))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let their_jwk: Jwk = serde_json::from_value(jwks["keys"][0].clone()).unwrap();
    let fetched_before = attacker.jwks_requests().await.unwrap();
    let issued = claims(&provider.issuer);
    let our_kid = provider.keys().await.unwrap()[0].kid.clone();
    for kid in [their_key.kid.as_str(), our_kid.as_str()] {
        let forged = [
            Header {
                jku: Some(format!("{}/jwks", attacker.issuer)),
                ..header(Algorithm::RS256, kid)
            },
            Header {
                x5u: Some(format!("{}/jwks", attacker.issuer)),
                ..header(Algorithm::RS256, kid)
            },
            Header {
                jwk: Some(their_jwk.clone()),
                ..header(Algorithm::RS256, kid)
            },
        ];
        for header in forged {
            let token = sign(header, &issued, &encoding_key(their_key));
            let outcome = auth.verify(&token).await;
            assert!(
                matches!(
                    outcome,
                    Err(AuthError::InvalidToken(
                        "unknown signing key" | "bad signature"
                    ))
                ),
                "{kid}: {outcome:?}"
            );
        }
    }
    assert_eq!(
        attacker.jwks_requests().await.unwrap(),
        fetched_before,
        "the attacker's JWKS is never fetched"
    );
}

#[tokio::test]
async fn a_provider_down_at_start_leaves_tokens_unchecked_until_it_is_up() {
    // Where the provider will listen once it starts.
    let slot = ProviderSlot::reserve().unwrap();
    let issuer = slot.issuer.clone();
    let auth = verifier(
        &issuer,
        OidcConfig::new(&issuer).refresh,
        OidcConfig::new(&issuer).min_refresh,
    );
    let early = sign(
        header(Algorithm::HS256, "any"),
        &claims(&issuer),
        &EncodingKey::from_secret(b"whatever-the-caller-likes-0123456789"),
    );
    assert!(!auth.keys_loaded());
    assert!(matches!(
        auth.verify(&early).await,
        Err(AuthError::KeysUnavailable)
    ));
    let provider = slot
        .start(&json!({"clients": [{"client_id": "c", "client_secret": "s", "tenant": "acme"}]}))
        .await
        .unwrap();
    assert_eq!(provider.issuer, issuer);
    until("the keys are loaded", || async { auth.keys_loaded() }).await;
    let token = provider.token("c", "s", "teller").await.unwrap();
    assert_eq!(auth.verify(&token).await.unwrap().tenant, "acme");
    assert!(matches!(
        auth.verify(&early).await,
        Err(AuthError::InvalidToken(_))
    ));
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_provider_is_down() {
    let provider = provider(&["RS256"]).await;
    let auth = verifier(
        &provider.issuer,
        Duration::from_millis(200),
        Duration::from_millis(0),
    );
    until("the keys are loaded", || async { auth.keys_loaded() }).await;
    let token = provider.token("RS256", "secret", "teller").await.unwrap();
    let key = encoding_key(&provider.keys().await.unwrap()[0]);
    let issuer = provider.issuer.clone();
    provider.stop().await;
    // An unknown `kid` makes the verifier try the provider, which is gone.
    let unknown = sign(header(Algorithm::RS256, "new-key"), &claims(&issuer), &key);
    assert!(matches!(
        auth.verify(&unknown).await,
        Err(AuthError::InvalidToken("unknown signing key"))
    ));
    assert!(auth.keys_loaded());
    assert_eq!(auth.verify(&token).await.unwrap().subject, "RS256");
}
