//! Server reflection in both versions, the way tools use it: list the
//! services, then fetch the file that defines one — with no token.

use igny8_tests::*;
use prost::Message;
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_and_describe_without_a_token() {
    let db = TestDb::new(Backend::Sqlite).await;
    let billing = spawn_billing(&db).await;
    let settings = spawn_settings(&db).await;
    for (server, own, other) in [
        (
            &billing,
            igny8_proto::BILLING_SERVICE_NAME,
            igny8_proto::SETTINGS_SERVICE_NAME,
        ),
        (
            &settings,
            igny8_proto::SETTINGS_SERVICE_NAME,
            igny8_proto::BILLING_SERVICE_NAME,
        ),
    ] {
        // v1
        let mut client =
            v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
        let requests = [
            v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                )),
            },
            v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                        own.to_owned(),
                    ),
                ),
            },
        ];
        let mut replies = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("v1 reflection needs no token")
            .into_inner();
        let listed = replies
            .message()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .unwrap();
        let v1::server_reflection_response::MessageResponse::ListServicesResponse(list) = listed
        else {
            panic!("expected a service list, got {listed:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(
            names.contains(&own) && names.contains(&"grpc.health.v1.Health"),
            "{names:?}"
        );
        assert!(!names.contains(&other), "{names:?}");
        let file = replies
            .message()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .unwrap();
        let v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files) = file
        else {
            panic!("expected descriptors, got {file:?}");
        };
        let described = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
            .any(|f| f.service.iter().any(|s| own.ends_with(s.name())));
        assert!(described, "{own} is described over v1");

        // v1alpha: what grpcurl 1.8.x and many older tools speak.
        let mut alpha =
            v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut replies = alpha
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("v1alpha reflection needs no token")
            .into_inner();
        let listed = replies
            .message()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .unwrap();
        let v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list) =
            listed
        else {
            panic!("expected a service list, got {listed:?}");
        };
        assert!(list.service.iter().any(|s| s.name == own));
    }
}
