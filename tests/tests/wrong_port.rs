//! A call sent to the wrong port: each server knows only its own methods.
//! Any other method is UNIMPLEMENTED with a message naming the service this
//! port serves and where the other one usually listens, decided before any
//! token check, so the answer is the same with a good token, a bad one or
//! none, and nothing changes.

use igny8_proto::{
    billing::v1::{GetBalanceRequest, billing_service_client::BillingServiceClient},
    settings::v1::{
        CheckModuleRequest, GetModuleSettingsRequest, Module,
        settings_service_client::SettingsServiceClient,
    },
};
use igny8_tests::*;
use tonic::{Code, Status, transport::Channel};
use tonic_prost::ProstCodec;
use tonic_types::StatusExt;

const A1: i64 = 1;
const EDITOR: i64 = 10;

/// The tokens a caller might send: a valid one, a forged one, none.
fn tokens() -> [(&'static str, Option<String>); 3] {
    [
        ("a valid token", Some(access_token(EDITOR, Some(A1)))),
        ("a bad token", Some("not.a.jwt".to_owned())),
        ("no token", None),
    ]
}

fn with_token<T>(mut request: tonic::Request<T>, token: Option<&str>) -> tonic::Request<T> {
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
    }
    request
}

fn assert_not_served(status: &Status, who: &str, served: &str, other_port: &str, needle: &str) {
    assert_eq!(status.code(), Code::Unimplemented, "{who}: {status:?}");
    let message = status.message();
    for part in [served, other_port, needle] {
        assert!(message.contains(part), "{who}: {part:?} in {message:?}");
    }
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "UNKNOWN_METHOD", "{who}");
    assert_eq!(
        info.metadata.get("service").map(String::as_str),
        Some(served)
    );
}

/// Calls `path` on `channel` with an empty request message.
async fn raw_call(channel: Channel, path: &'static str, token: Option<&str>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let request = with_token(tonic::Request::new(GetBalanceRequest {}), token);
    grpc.unary::<_, GetBalanceRequest, _>(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        ProstCodec::default(),
    )
    .await
    .expect_err("a method this server does not serve")
}

async fn each_server_knows_only_its_own_methods(b: Backend) {
    let db = TestDb::new(b).await;
    db.account(A1).credits(100).create().await;
    db.user(EDITOR).account(A1).role("editor").create().await;
    let billing = spawn_billing(&db).await;
    let settings = spawn_settings(&db).await;

    for (who, token) in tokens() {
        let token = token.as_deref();
        // Billing on settings' port.
        let mut wrong = BillingServiceClient::new(settings.channel().await);
        let status = wrong
            .deduct(with_token(
                tonic::Request::new(deduct_credits(5, "wrong-port")),
                token,
            ))
            .await
            .expect_err("Deduct on settings' port");
        assert_not_served(
            &status,
            who,
            igny8_proto::SETTINGS_SERVICE_NAME,
            "port 50051",
            "igny8.billing.v1.BillingService/Deduct is not served on this port",
        );
        let status = wrong
            .get_balance(with_token(tonic::Request::new(GetBalanceRequest {}), token))
            .await
            .expect_err("GetBalance on settings' port");
        assert_not_served(
            &status,
            who,
            igny8_proto::SETTINGS_SERVICE_NAME,
            "port 50051",
            "GetBalance",
        );

        // Settings on billing's port.
        let mut wrong = SettingsServiceClient::new(billing.channel().await);
        let status = wrong
            .check_module(with_token(
                tonic::Request::new(CheckModuleRequest {
                    module: Module::Writer as i32,
                }),
                token,
            ))
            .await
            .expect_err("CheckModule on billing's port");
        assert_not_served(
            &status,
            who,
            igny8_proto::BILLING_SERVICE_NAME,
            "port 50052",
            "igny8.settings.v1.SettingsService/CheckModule is not served on this port",
        );

        // A method nobody serves: unknown here; on settings' port it still
        // names the billing service, so the hint is where billing listens.
        for (server, served, needle) in [
            (
                &billing,
                igny8_proto::BILLING_SERVICE_NAME,
                "unknown method igny8.billing.v1.BillingService/Steal",
            ),
            (
                &settings,
                igny8_proto::SETTINGS_SERVICE_NAME,
                "igny8.billing.v1.BillingService/Steal is not served on this port",
            ),
        ] {
            let status = raw_call(
                server.channel().await,
                "/igny8.billing.v1.BillingService/Steal",
                token,
            )
            .await;
            assert_not_served(&status, who, served, "usually listens on port", needle);
        }
    }

    // Nothing changed, and the right ports still answer.
    assert_eq!(db.balance(A1).await, 100);
    assert_eq!(db.ledger_sum(A1).await, (0, 0));
    let token = access_token(EDITOR, Some(A1));
    let balance = billing
        .billing(&token, None)
        .await
        .get_balance(GetBalanceRequest {})
        .await
        .expect("GetBalance on billing's port")
        .into_inner();
    assert_eq!(balance.balance, 100);
    settings
        .settings(&token, None)
        .await
        .get_module_settings(GetModuleSettingsRequest {})
        .await
        .expect("GetModuleSettings on settings' port");
}

on_both_backends!(each_server_knows_only_its_own_methods);
