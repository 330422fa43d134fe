//! The `settings-svc` binary. See `settings-svc --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    service_kit::main_helper::run(
        "settings-svc",
        "",
        settings_svc::DEFAULTS,
        |config| async move {
            let app = settings_svc::build(config)
                .await
                .map_err(|e| e.to_string())?;
            app.run_until_stopped(service_kit::shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        },
    )
}
