//! The ADS server driven by a real gRPC client in-process: subscriptions, ACKs, NACKs, pushes on
//! change, and delta's changed-only responses.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_xds_proto::envoy::config::core::v3::Node;
use weft_xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use weft_xds_proto::pb::google::rpc::Status as RpcStatus;
use weft_xds_proto::type_url;

use super::*;
use crate::generate::tests::{QUICKSTART, config};
use crate::model::Mesh;

const CLIENT: &str = "sidecar~127.0.0.10~client.default~default.svc.cluster.local";

fn snapshot(yaml: &str, generation: u64) -> Arc<MeshSnapshot> {
    Arc::new(MeshSnapshot::new(
        Mesh::build(&config(yaml)),
        generation,
        vec![],
    ))
}

/// A delta ADS stream opened with `first`.
async fn delta_stream(
    url: String,
    first: DeltaDiscoveryRequest,
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<weft_xds_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryServiceClient::connect(url)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

async fn start(
    yaml: &str,
) -> (
    String,
    Arc<StatusRegistry>,
    watch::Sender<Arc<MeshSnapshot>>,
) {
    let (tx, rx) = watch::channel(snapshot(yaml, 1));
    let status = Arc::new(StatusRegistry::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = XdsServer::new(rx, status.clone()).into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), status, tx)
}

fn node() -> Option<Node> {
    Some(Node {
        id: CLIENT.into(),
        ..Default::default()
    })
}

async fn next<T>(s: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a response in time")
        .unwrap()
        .unwrap()
}

async fn nothing<T: std::fmt::Debug>(s: &mut tonic::Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        panic!("expected no response, got {m:?}");
    }
}

#[tokio::test]
async fn sotw_answers_records_acks_and_nacks_and_pushes_changes() {
    let (url, status, mesh) = start(QUICKSTART).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(url)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: node(),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    let cds = next(&mut stream).await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    assert_eq!(cds.resources.len(), 3);
    // ACK: recorded, not answered.
    tx.send(DiscoveryRequest {
        version_info: cds.version_info.clone(),
        response_nonce: cds.nonce.clone(),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // EDS for two names: exactly those come back.
    let names = vec![
        "outbound|8080|v1|hello.default.svc.cluster.local".to_string(),
        "outbound|8080|v2|hello.default.svc.cluster.local".to_string(),
    ];
    tx.send(DiscoveryRequest {
        resource_names: names.clone(),
        type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let eds = next(&mut stream).await;
    assert_eq!(eds.type_url, type_url::CLUSTER_LOAD_ASSIGNMENT);
    assert_eq!(eds.resources.len(), 2);
    // NACK it.
    tx.send(DiscoveryRequest {
        response_nonce: eds.nonce.clone(),
        type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
        resource_names: names.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "ClusterLoadAssignment x: nope".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    nothing(&mut stream).await;
    let conns = status.snapshot();
    let c = &conns[0];
    assert_eq!(c.proxy, CLIENT);
    assert_eq!(c.types["CDS"].acks, 1);
    assert_eq!(c.types["CDS"].acked_nonce, cds.nonce);
    assert_eq!(c.types["EDS"].nacks, 1);
    assert_eq!(
        c.types["EDS"].last_nack.as_ref().unwrap().message,
        "ClusterLoadAssignment x: nope"
    );
    assert_eq!(status.nack_log().len(), 1);

    // An endpoint change pushes EDS only (CDS content is unchanged).
    let moved = QUICKSTART.replace("127.0.0.12", "127.0.0.13");
    mesh.send(snapshot(&moved, 2)).unwrap();
    let push = next(&mut stream).await;
    assert_eq!(push.type_url, type_url::CLUSTER_LOAD_ASSIGNMENT);
    assert_ne!(push.version_info, eds.version_info);
    // After the NACK the proxy runs its old assignments: this push is complete.
    assert_eq!(push.resources.len(), 2);
    tx.send(DiscoveryRequest {
        version_info: push.version_info.clone(),
        response_nonce: push.nonce.clone(),
        type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
        resource_names: names.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    nothing(&mut stream).await;
    // The next endpoint change sends only the assignment that changed (v2's), as SotW allows
    // for EDS.
    mesh.send(snapshot(&QUICKSTART.replace("127.0.0.12", "127.0.0.14"), 3))
        .unwrap();
    let push = next(&mut stream).await;
    assert_eq!(push.resources.len(), 1);
    let cla: weft_xds_proto::envoy::config::endpoint::v3::ClusterLoadAssignment =
        weft_xds_proto::unpack(&push.resources[0]).unwrap();
    assert_eq!(cla.cluster_name, names[1]);
    nothing(&mut stream).await;
}

#[tokio::test]
async fn delta_sends_only_changes_and_removals() {
    let (url, status, mesh) = start(QUICKSTART).await;
    let (tx, mut stream) = delta_stream(
        url,
        DeltaDiscoveryRequest {
            node: node(),
            type_url: type_url::CLUSTER.into(),
            ..Default::default()
        },
    )
    .await;
    let first = next(&mut stream).await;
    assert_eq!(
        first.resources.len(),
        3,
        "wildcard subscription gets every cluster"
    );
    tx.send(DeltaDiscoveryRequest {
        response_nonce: first.nonce.clone(),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    nothing(&mut stream).await;
    assert_eq!(status.snapshot()[0].types["CDS"].acks, 1);

    // Dropping the DestinationRule removes the two subset clusters and changes nothing else.
    let start = QUICKSTART.find("kind: DestinationRule").unwrap();
    let end = start + QUICKSTART[start..].find("---").unwrap();
    let without_dr = format!(
        "{}apiVersion: v1\nkind: ConfigMap\nmetadata: {{ name: x }}\n{}",
        &QUICKSTART[..start].trim_end_matches("apiVersion: networking.istio.io/v1\n"),
        &QUICKSTART[end..]
    );
    mesh.send(snapshot(&without_dr, 2)).unwrap();
    let change = next(&mut stream).await;
    assert!(
        change.resources.is_empty(),
        "unchanged clusters are not resent: {:?}",
        change.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    let mut removed = change.removed_resources.clone();
    removed.sort();
    assert_eq!(
        removed,
        [
            "outbound|8080|v1|hello.default.svc.cluster.local",
            "outbound|8080|v2|hello.default.svc.cluster.local"
        ]
    );
}

#[tokio::test]
async fn a_node_without_an_istio_id_is_refused_with_the_expected_form() {
    let (url, _, _mesh) = start(QUICKSTART).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(url)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "envoy-1".into(),
            ..Default::default()
        }),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("sidecar~<ip>~"), "{}", err.message());
}

/// The snapshot weftd makes after `before` for `yaml`: the mesh built incrementally when only
/// endpoints changed, the generations of `before` reused.
fn follow(before: &Arc<MeshSnapshot>, yaml: &str, generation: u64) -> Arc<MeshSnapshot> {
    let mesh = Mesh::build_after(&before.mesh, Arc::new(config(yaml)));
    Arc::new(MeshSnapshot::after(before, mesh, generation, vec![]))
}

#[tokio::test]
async fn delta_pushes_an_endpoint_change_as_the_one_assignment_that_changed() {
    let (url, _status, mesh) = start(QUICKSTART).await;
    let names = vec![
        "outbound|8080||hello.default.svc.cluster.local".to_string(),
        "outbound|8080|v1|hello.default.svc.cluster.local".to_string(),
        "outbound|8080|v2|hello.default.svc.cluster.local".to_string(),
    ];
    let (tx, mut stream) = delta_stream(
        url,
        DeltaDiscoveryRequest {
            node: node(),
            type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
            resource_names_subscribe: names.clone(),
            ..Default::default()
        },
    )
    .await;
    let first = next(&mut stream).await;
    assert_eq!(first.resources.len(), 3);
    tx.send(DeltaDiscoveryRequest {
        response_nonce: first.nonce.clone(),
        type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    nothing(&mut stream).await;

    // v2's endpoint moves: its assignment and the service-wide one change, v1's does not.
    let before = mesh.borrow().clone();
    let moved = QUICKSTART.replace("127.0.0.12", "127.0.0.14");
    mesh.send(follow(&before, &moved, 2)).unwrap();
    let push = next(&mut stream).await;
    let mut got: Vec<&str> = push.resources.iter().map(|r| r.name.as_str()).collect();
    got.sort();
    let mut want = [names[0].as_str(), names[2].as_str()];
    want.sort();
    assert_eq!(got, want);
    assert!(push.removed_resources.is_empty());
    let v2 = push.resources.iter().find(|r| r.name == names[2]).unwrap();
    let cla: weft_xds_proto::envoy::config::endpoint::v3::ClusterLoadAssignment =
        weft_xds_proto::unpack(v2.resource.as_ref().unwrap()).unwrap();
    assert!(format!("{cla:?}").contains("127.0.0.14"), "{cla:?}");
    tx.send(DeltaDiscoveryRequest {
        response_nonce: push.nonce.clone(),
        type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The same config again: a new snapshot, nothing to send.
    let before = mesh.borrow().clone();
    mesh.send(follow(&before, &moved, 3)).unwrap();
    nothing(&mut stream).await;
}
