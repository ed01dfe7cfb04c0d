//! Client -> weft-proxy -> weft-proxy -> echo backends, all fed by weftd from a folder of YAML.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use weft_e2e::{Client, Quickstart, binomial_bounds};

#[test]
fn split_holds_then_follows_an_edit_without_failing_requests() {
    let mut q = Quickstart::new("split", 21);
    q.start_weftd();
    q.start_hello();
    q.start_weft_proxy(10, "client");

    let n = 1000;
    let (v1, v2, failures) = q.split(n);
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(v1 + v2, n);
    let (lo, hi) = binomial_bounds(n, 0.2);
    assert!(
        (lo..=hi).contains(&v2),
        "v2 served {v2} of {n}, expected 20% within [{lo}, {hi}]"
    );

    // Keep traffic flowing while the split is edited to 0/100.
    let stop = Arc::new(AtomicBool::new(false));
    let egress = q.egress();
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = Client::new(egress);
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = c.get("hello", "/");
                seen.push((
                    Instant::now(),
                    r.map(|r| (r.status, r.header("x-echo-name").unwrap_or("").to_string()))
                        .map_err(|e| e.to_string()),
                ));
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let edited = Instant::now();
    q.set_split(0, 100);
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.join().expect("traffic thread");

    let failed: Vec<_> = seen
        .iter()
        .filter(|(_, r)| !matches!(r, Ok((200, _))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the change: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    let after: Vec<_> = seen
        .iter()
        .filter(|(t, _)| *t > edited + Duration::from_secs(2))
        .collect();
    assert!(
        after.len() > 50,
        "too little traffic after the change to judge: {}",
        after.len()
    );
    let still_v1 = after
        .iter()
        .filter(|(_, r)| matches!(r, Ok((_, name)) if name == "hello-v1"))
        .count();
    assert_eq!(
        still_v1, 0,
        "requests still reached v1 two seconds after the edit"
    );
    let first_all_v2 = seen
        .iter()
        .rposition(|(_, r)| matches!(r, Ok((_, name)) if name == "hello-v1"))
        .map(|i| seen[i].0.duration_since(edited));
    eprintln!(
        "last v1 response {first_all_v2:?} after the edit; {} requests during the change, none failed",
        seen.len()
    );
}

#[test]
fn invalid_objects_are_reported_and_the_rest_keeps_serving() {
    let mut q = Quickstart::new("invalid", 22);
    q.start_weftd();
    q.start_hello();
    q.start_weft_proxy(10, "client");
    q.write_file(
        "broken.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: broken }\nspec:\n  hosts: [hello]\n  http:\n  - route:\n    - { destination: { host: hello }, weight: 150 }\n",
    );
    let debug = q.debug();
    let rejected = weft_e2e::wait_until(Duration::from_secs(3), || {
        let v = weft_e2e::http::get_json(debug, "/debug/configz")?;
        v["rejected"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .expect("weftd reports the broken object");
    let e = &rejected[0];
    assert!(e["file"].as_str().unwrap().ends_with("broken.yaml"), "{e}");
    assert_eq!(e["object"], "VirtualService/default/broken");
    assert_eq!(e["field"], "spec.http[0].route[0].weight");
    let log = q.weftd.as_ref().unwrap().logs();
    assert!(
        log.contains("broken.yaml")
            && log.contains("VirtualService/default/broken")
            && log.contains("spec.http[0].route[0].weight"),
        "{log}"
    );
    // The valid VirtualService still routes.
    let (v1, v2, failures) = q.split(200);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(v1 > 0 && v2 > 0);
}
