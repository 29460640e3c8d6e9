//! The `meshca` binary: parse the command line, run the command, map the outcome to
//! an exit code (0 success, 2 usage or configuration error, 1 anything else).

use std::process::ExitCode;

use clap::Parser;
use meshca::cli::{AuditCommand, BootstrapTokenCommand, Cli, Command, LogFormat};
use meshca::commands::{self, Failure};

fn main() -> ExitCode {
    let cli = Cli::parse();
    meshca::logging::init(cli.log_format);
    commands::set_json_output(cli.log_format == LogFormat::Json);
    let result = match cli.command {
        Command::Init(args) => commands::init(args),
        Command::DevToken(args) => commands::dev_token(args).map(|token| println!("{token}")),
        Command::BootstrapToken { command: BootstrapTokenCommand::Create(args) } => {
            commands::bootstrap_token_create(args).map(|token| println!("{token}"))
        }
        Command::Audit { command: AuditCommand::Verify { file, keys, checkpoint } } => {
            commands::audit_verify(&file, &keys, checkpoint.as_deref())
        }
        Command::Audit { command: AuditCommand::Prove { file, keys, serial, checkpoint } } => {
            commands::audit_prove(&file, &keys, serial.as_deref(), checkpoint.as_deref())
        }
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(commands::serve(*args))),
        Command::Certify(args) => runtime().and_then(|rt| rt.block_on(commands::certify(args))),
        Command::Agent(args) => runtime().and_then(|rt| rt.block_on(commands::agent(args))),
        Command::Doctor(args) => runtime().and_then(|rt| rt.block_on(commands::doctor(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            commands::report_failure(&failure);
            ExitCode::from(failure.exit_code() as u8)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure { message: format!("cannot start the runtime: {e}"), usage: false })
}
