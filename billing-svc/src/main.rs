//! The `billing-svc` binary. See `billing-svc --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    service_kit::main_helper::run(
        "billing-svc",
        billing_svc::EXTRA_HELP,
        billing_svc::DEFAULTS,
        |config| async move {
            let table = billing_svc::cost_table_from_env()
                .map_err(|e| format!("IGNY8_COST_TABLE_FILE: {e}"))?;
            let options = billing_svc::BillingOptions::from_env(&config.database_url)?;
            let app = billing_svc::build_with(config, table, options)
                .await
                .map_err(|e| e.to_string())?;
            app.run_until_stopped(service_kit::shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        },
    )
}
