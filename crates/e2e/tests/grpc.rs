//! gRPC through the mesh: unary, server streaming and bidirectional
//! streaming calls, with status trailers intact.

use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trellis_e2e::TestMesh;

const GRPC_SERVICE: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: health}
spec:
  selector: {app: health}
  ports: [{port: 50051, protocol: grpc}]
"#;

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connects to the upstream listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_server_streaming_calls_keep_their_trailers() {
    let mesh = TestMesh::start().await;
    mesh.apply(GRPC_SERVICE).await.expect("apply");
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("catalog", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let _server_proxy = mesh.sidecar("health", &[("app", "health")], app_port).await;
    let (cport, _c) = trellis_e2e::demo_app("client", "v1", "client-0").await;
    let client_proxy = mesh
        .sidecar_with_upstream("client", cport, "health", 50051)
        .await;

    let mut client = HealthClient::new(channel(client_proxy.upstream_addrs[0]).await);
    // Unary, with an OK status in the trailers.
    let resp =
        trellis_testkit::eventually("a unary call succeeds", Duration::from_secs(10), || {
            let mut client = client.clone();
            async move {
                client
                    .check(HealthCheckRequest {
                        service: "catalog".into(),
                    })
                    .await
            }
        })
        .await;
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);
    // Unary with an error status: only the trailers carry it.
    let err = client
        .check(HealthCheckRequest {
            service: "nosuch".into(),
        })
        .await
        .expect_err("an unknown service is NotFound");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Server streaming: each status change arrives as a message.
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "catalog".into(),
        })
        .await
        .expect("watch starts")
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("catalog", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the change arrives")
        .unwrap()
        .unwrap();
    assert_eq!(second.status, ServingStatus::NotServing as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_streaming_passes_through() {
    use trellis_api::v1::proxy_api_client::ProxyApiClient;
    use trellis_api::v1::{control_message, proxy_message, ProxyMessage, Register, Subscribe};

    // The app speaks the proxy API's bidirectional stream, in plaintext:
    // it answers each message with a Config that echoes what it got.
    let mesh = TestMesh::start().await;
    mesh.apply(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports: [{port: 15010, protocol: grpc}]
"#,
    )
    .await
    .expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(trellis_api::v1::proxy_api_server::ProxyApiServer::new(
                EchoApi,
            ))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let _server_proxy = mesh.sidecar("api", &[("app", "api")], app_port).await;
    let (cport, _c) = trellis_e2e::demo_app("client", "v1", "client-0").await;
    let client_proxy = mesh
        .sidecar_with_upstream("client", cport, "api", 15010)
        .await;

    let client = ProxyApiClient::new(channel(client_proxy.upstream_addrs[0]).await);
    let register = ProxyMessage {
        msg: Some(proxy_message::Msg::Register(Register {
            instance: "fake-1".into(),
            workload: "fake".into(),
            namespace: "default".into(),
            inbound_addr: "127.0.0.1:1".into(),
            ..Default::default()
        })),
    };
    // Each try opens its own stream; the first that the far end answers wins.
    let (tx, mut down) =
        trellis_testkit::eventually("the stream opens", Duration::from_secs(10), || {
            let mut client = client.clone();
            let register = register.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                tx.send(register).await.map_err(|e| e.to_string())?;
                let down = client
                    .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                Ok::<_, String>((tx, down))
            }
        })
        .await;
    let config = |m: Option<trellis_api::v1::ControlMessage>| match m.and_then(|m| m.msg) {
        Some(control_message::Msg::Config(c)) => c,
        other => panic!("expected a config, got {other:?}"),
    };
    let first = config(down.message().await.expect("first message"));
    assert!(first.services.is_empty());
    // Up the stream again; the answer comes down the same stream.
    tx.send(ProxyMessage {
        msg: Some(proxy_message::Msg::Subscribe(Subscribe {
            services: vec!["default/widgets".into()],
        })),
    })
    .await
    .unwrap();
    let second = config(
        tokio::time::timeout(Duration::from_secs(5), down.message())
            .await
            .expect("the subscription is answered")
            .expect("a message"),
    );
    assert_eq!(second.services.len(), 1);
    assert_eq!(second.services[0].name, "widgets");
    assert!(second.version > first.version);
    // Closing our side ends the call cleanly, with trailers.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), down.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// A bidirectional-streaming gRPC app: every message up the stream gets a
/// Config down it, numbered, listing the services a Subscribe named.
struct EchoApi;

#[tonic::async_trait]
impl trellis_api::v1::proxy_api_server::ProxyApi for EchoApi {
    type StreamStream = std::pin::Pin<
        Box<
            dyn futures::Stream<Item = Result<trellis_api::v1::ControlMessage, tonic::Status>>
                + Send,
        >,
    >;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<trellis_api::v1::ProxyMessage>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        use trellis_api::v1::{
            control_message, proxy_message, Config, ControlMessage, ServiceConfig,
        };
        let mut up = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut version = 0;
            while let Ok(Some(msg)) = up.message().await {
                version += 1;
                let services = match msg.msg {
                    Some(proxy_message::Msg::Subscribe(s)) => s
                        .services
                        .iter()
                        .filter_map(|n| n.split_once('/'))
                        .map(|(ns, name)| ServiceConfig {
                            namespace: ns.into(),
                            name: name.into(),
                            ..Default::default()
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let config = Config {
                    version,
                    services,
                    ..Default::default()
                };
                if tx
                    .send(Ok(ControlMessage {
                        msg: Some(control_message::Msg::Config(config)),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // The client closed its side: end ours (status OK in the trailers).
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn sign(
        &self,
        _: tonic::Request<trellis_api::v1::SignRequest>,
    ) -> Result<tonic::Response<trellis_api::v1::SignResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}
