use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::prelude::*;

use super::token::{TokenError, TokenKey};
use super::tokenreview::{ReviewError, identity_from_review};
use super::*;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-ca-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

fn csr_for(sans: Vec<SanType>) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

/// Checks that `leaf` is signed by `issuer` and carries exactly `identity`.
fn assert_issued(leaf_pem: &str, issuer_der: &[u8], identity: &SpiffeId) {
    let leaf_der = &ders(leaf_pem)[0];
    let (_, leaf) = parse_x509_certificate(leaf_der).unwrap();
    let (_, issuer) = parse_x509_certificate(issuer_der).unwrap();
    leaf.verify_signature(Some(issuer.public_key()))
        .expect("the workload certificate verifies with the issuer's key");
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN must be critical with an empty subject");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect();
    assert_eq!(names, vec![format!("URI({identity})")]);
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
}

#[test]
fn spiffe_ids_parse_and_print() {
    let s = "spiffe://cluster.local/ns/bookinfo/sa/reviews";
    assert_eq!(SpiffeId::parse(s).unwrap().to_string(), s);
    for bad in [
        "spiffe://cluster.local/ns/bookinfo",
        "spiffe://cluster.local/ns//sa/x",
        "spiffe://cluster.local/sa/x/ns/y",
        "https://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b/extra",
    ] {
        assert_eq!(SpiffeId::parse(bad), None, "{bad}");
    }
}

#[test]
fn generated_root_is_persisted_privately_and_reloaded() {
    let dir = tmp("persist");
    let ca = Authority::load_or_create(CaOptions::new("cluster.local", &dir)).unwrap();
    let mode = std::fs::metadata(dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the CA key is readable by its owner only"
    );
    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let again = Authority::load_or_create(CaOptions::new("cluster.local", &dir)).unwrap();
    assert_eq!(
        ca.roots_pem(),
        again.roots_pem(),
        "a restart keeps the root"
    );
    // A certificate signed after the restart chains to the first root.
    let (_, csr) = csr_for(vec![uri("spiffe://cluster.local/ns/default/sa/hello")]);
    let chain = again.sign(&csr, &id("default", "hello"), 0).unwrap();
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], ca.roots_pem());
    assert_issued(&chain[0], &ders(ca.roots_pem())[0], &id("default", "hello"));
    let root_der = ders(ca.roots_pem()).remove(0);
    let (_, root) = parse_x509_certificate(&root_der).unwrap();
    assert!(root.is_ca());
}

#[test]
fn default_and_requested_lifetimes() {
    let dir = tmp("ttl");
    let ca = Authority::load_or_create(CaOptions::new("cluster.local", &dir)).unwrap();
    let ident = id("default", "hello");
    let (_, csr) = csr_for(vec![uri(&ident.to_string())]);
    let lifetime = |pem: &str| {
        let der = &ders(pem)[0];
        let (_, c) = parse_x509_certificate(der).unwrap();
        let v = c.validity();
        (v.not_after.timestamp() - v.not_before.timestamp()) as u64
    };
    // Default: 24 h (plus the minute of backdating).
    let day = lifetime(&ca.sign(&csr, &ident, 0).unwrap()[0]);
    assert!((24 * 3600..=24 * 3600 + 120).contains(&day), "{day}");
    let short = lifetime(&ca.sign(&csr, &ident, 120).unwrap()[0]);
    assert!((120..=240).contains(&short), "{short}");
    assert!(matches!(
        ca.sign(&csr, &ident, 365 * 24 * 3600),
        Err(CaError::TtlTooLong { .. })
    ));
    assert!(matches!(
        ca.sign(&csr, &ident, -5),
        Err(CaError::NegativeTtl(-5))
    ));
}

#[test]
fn requests_for_other_identities_and_bad_csrs_are_refused() {
    let dir = tmp("refuse");
    let ca = Authority::load_or_create(CaOptions::new("cluster.local", &dir)).unwrap();
    let me = id("default", "hello");
    let (_, other) = csr_for(vec![uri("spiffe://cluster.local/ns/kube-system/sa/admin")]);
    let e = ca.sign(&other, &me, 0).unwrap_err();
    assert!(matches!(e, CaError::WrongIdentity { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("ns/kube-system/sa/admin") && msg.contains("ns/default/sa/hello"),
        "{msg}"
    );
    // Another namespace, same service account name.
    let (_, ns) = csr_for(vec![uri("spiffe://cluster.local/ns/prod/sa/hello")]);
    assert!(matches!(
        ca.sign(&ns, &me, 0),
        Err(CaError::WrongIdentity { .. })
    ));
    // Extra names beside the identity.
    let (_, extra) = csr_for(vec![
        uri(&me.to_string()),
        SanType::DnsName("evil.example.com".try_into().unwrap()),
    ]);
    let msg = ca.sign(&extra, &me, 0).unwrap_err().to_string();
    assert!(msg.contains("DNS:evil.example.com"), "{msg}");
    // No identity at all.
    let (_, none) = csr_for(vec![]);
    assert!(
        ca.sign(&none, &me, 0)
            .unwrap_err()
            .to_string()
            .contains("no URI SAN")
    );
    // Not a CSR.
    let e = ca.sign("hello", &me, 0).unwrap_err();
    assert!(matches!(e, CaError::MalformedCsr(_)), "{e}");
    assert!(e.to_string().contains("PKCS#10"), "{e}");
    // A CSR whose signature was tampered with.
    let (_, good) = csr_for(vec![uri(&me.to_string())]);
    let der = pem_body(&good);
    let mut bad = der.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x55;
    let tampered = rcgen_pem("CERTIFICATE REQUEST", &bad);
    let e = ca.sign(&tampered, &me, 0).unwrap_err();
    assert!(matches!(e, CaError::MalformedCsr(_)), "{e}");
    // A CSR asking to be a CA.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(&me.to_string())];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_csr = params.serialize_request(&key).unwrap().pem().unwrap();
    assert!(
        ca.sign(&ca_csr, &me, 0)
            .unwrap_err()
            .to_string()
            .contains("CA certificate")
    );
}

fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()
}

fn rcgen_pem(label: &str, der: &[u8]) -> String {
    to_pem(der).replace("CERTIFICATE", label)
}

#[test]
fn plugged_in_intermediate_ca_signs_with_its_chain() {
    // An operator's root and an intermediate for this cluster, in Istio's cacerts layout.
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = Authority::root_params("corp", Duration::from_secs(3600 * 24 * 365));
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let int_params = Authority::root_params("cluster-1", Duration::from_secs(3600 * 24 * 30));
    let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let dir = tmp("plugged");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), to_pem(int.der())).unwrap();
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), to_pem(root.der())).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", to_pem(int.der()), to_pem(root.der())),
    )
    .unwrap();
    let mut opts = CaOptions::new("cluster.local", &tmp("plugged-state"));
    opts.plugged_dir = Some(dir.clone());
    let mut ca = Authority::load_or_create(opts).unwrap();
    let me = id("default", "hello");
    let (_, csr) = csr_for(vec![uri(&me.to_string())]);
    let chain = ca.sign(&csr, &me, 0).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_issued(&chain[0], int.der(), &me);
    assert_eq!(chain[1], to_pem(int.der()));
    assert_eq!(chain[2], to_pem(root.der()));
    assert!(
        !ca.rotate_if_due().unwrap(),
        "a plugged-in CA is not rotated by weftd"
    );
    // A broken plugged-in folder is an error naming the file.
    std::fs::write(dir.join("ca-key.pem"), "garbage").unwrap();
    let mut opts = CaOptions::new("cluster.local", &tmp("plugged-state"));
    opts.plugged_dir = Some(dir.clone());
    let e = Authority::load_or_create(opts).unwrap_err().to_string();
    assert!(e.contains("ca-key.pem"), "{e}");
}

#[test]
fn rotation_stages_the_new_root_before_it_signs() {
    let dir = tmp("rotate");
    let mut opts = CaOptions::new("cluster.local", &dir);
    opts.root_ttl = Duration::from_secs(3600);
    // Long enough that the restart below (which also checks for rotation) still sees step 1
    // on a busy machine; short enough for a test.
    opts.max_ttl = Duration::from_secs(5);
    let mut ca = Authority::load_or_create(opts).unwrap();
    let me = id("default", "hello");
    let (_, csr) = csr_for(vec![uri(&me.to_string())]);
    let before = ca.sign(&csr, &me, 1).unwrap();
    let old_root = ders(ca.roots_pem())[0].clone();
    assert!(!ca.rotate_if_due().unwrap(), "a fresh root is not rotated");
    ca.options.rotate_at_remaining = 1.0; // everything is "due"
    // Step 1: the new root is trusted, the old one still signs.
    assert!(ca.rotate_if_due().unwrap());
    let bundle = ders(ca.roots_pem());
    assert_eq!(bundle.len(), 2, "the signing root and the staged one");
    assert_eq!(bundle[0], old_root);
    let staged = bundle[1].clone();
    let during = ca.sign(&csr, &me, 1).unwrap();
    assert_issued(&during[0], &old_root, &me);
    let mode = std::fs::metadata(dir.join("next-ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A restart in between keeps the staged root.
    let reloaded = Authority::load_or_create(ca.options.clone()).unwrap();
    assert_eq!(ders(reloaded.roots_pem()), bundle);
    // Not before every older certificate could have been renewed (max_ttl, staged 5 minutes
    // back-dated, so at once here): step 2, the new root signs, the old stays trusted.
    std::thread::sleep(Duration::from_millis(5100));
    assert!(ca.rotate_if_due().unwrap());
    let bundle = ders(ca.roots_pem());
    assert_eq!(bundle, vec![staged.clone(), old_root.clone()]);
    let after = ca.sign(&csr, &me, 1).unwrap();
    assert_issued(&after[0], &staged, &me);
    assert_issued(&before[0], &old_root, &me);
    assert!(!dir.join("next-ca-key.pem").exists());
    // The promotion is persisted.
    ca.options.rotate_at_remaining = 0.2;
    let reloaded = Authority::load_or_create(ca.options.clone()).unwrap();
    assert_eq!(ders(reloaded.roots_pem()), bundle);
    let again = reloaded.sign(&csr, &me, 1).unwrap();
    assert_issued(&again[0], &staged, &me);
}

#[test]
fn join_tokens_prove_one_identity() {
    let dir = tmp("tokens");
    let key = TokenKey::load_or_create(&dir).unwrap();
    let mode = std::fs::metadata(dir.join("join-token-key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let t = key.issue("bookinfo", "reviews", Duration::from_secs(60));
    assert_eq!(
        key.verify(&t, "cluster.local").unwrap(),
        id("bookinfo", "reviews")
    );
    // The same key reloaded verifies it; another control plane's key does not.
    assert!(
        TokenKey::load(&dir)
            .unwrap()
            .verify(&t, "cluster.local")
            .is_ok()
    );
    let other = TokenKey::load_or_create(&tmp("tokens-other")).unwrap();
    assert_eq!(
        other.verify(&t, "cluster.local"),
        Err(TokenError::BadSignature)
    );
    // Changing the claims breaks the signature.
    let parts: Vec<&str> = t.split('.').collect();
    let forged_claims = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        br#"{"ns":"kube-system","sa":"admin","exp":99999999999}"#,
    );
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    assert_eq!(
        key.verify(&forged, "cluster.local"),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        key.verify("weft1.abc", "cluster.local"),
        Err(TokenError::Malformed)
    );
    let expired = key.issue("bookinfo", "reviews", Duration::ZERO);
    assert!(matches!(
        key.verify(&expired, "cluster.local"),
        Err(TokenError::Expired { .. })
    ));
}

fn recorded(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tokenreview")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn token_reviews_from_the_api_server() {
    let aud = vec!["istio-ca".to_string()];
    assert_eq!(
        identity_from_review(&recorded("authenticated.json"), "cluster.local", &aud).unwrap(),
        id("bookinfo", "bookinfo-productpage")
    );
    assert_eq!(
        identity_from_review(&recorded("invalid-token.json"), "cluster.local", &aud),
        Err(ReviewError::NotAuthenticated(
            "[invalid bearer token, token lookup failed]".into()
        ))
    );
    assert!(matches!(
        identity_from_review(&recorded("wrong-audience.json"), "cluster.local", &aud),
        Err(ReviewError::WrongAudience { .. })
    ));
    assert_eq!(
        identity_from_review(&recorded("user-token.json"), "cluster.local", &aud),
        Err(ReviewError::NotServiceAccount("kubernetes-admin".into()))
    );
    let e = identity_from_review(&recorded("forbidden.json"), "cluster.local", &aud).unwrap_err();
    assert!(e.to_string().contains("cannot create resource"), "{e}");
    // The request weftd sends.
    let req = tokenreview::review_request("tok", &aud);
    assert_eq!(req["spec"]["audiences"][0], "istio-ca");
    assert_eq!(req["apiVersion"], "authentication.k8s.io/v1");
}
