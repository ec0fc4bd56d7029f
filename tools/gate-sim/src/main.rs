//! `gate-sim`: behaves like a real gate controller, for demos, tests and
//! load. It decides online through the mesh and, when the mesh cannot be
//! reached, from its signed offline bundle; offline decisions are journaled in
//! the state directory and uploaded when the mesh answers again.
//!
//! Every decision is printed as one JSON line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use estate_gate_sdk::{GateController, Mode, Options, Outcome, Presented};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "gate-sim", version, about = "A simulated gate controller for the estate access mesh")]
struct Cli {
    /// The mesh (or gate service) endpoint.
    #[arg(long, env = "GATE_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// File holding the gate's token (issued with `meshctl token gate`).
    #[arg(long, env = "GATE_TOKEN_FILE")]
    token_file: PathBuf,
    /// Where the gate keeps its bundle, trusted keys and journal.
    #[arg(long, env = "GATE_STATE_DIR", default_value = "./gate-state")]
    state_dir: PathBuf,
    /// How long to wait for the mesh before deciding offline.
    #[arg(long, default_value_t = 1500)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Decide once: `card UID [FACILITY]`, `pin UNIT PIN`, `qr PAYLOAD`, `visitor CODE`.
    Decide {
        /// The presentation, as in a script line.
        #[arg(required = true, num_args = 1..)]
        presentation: Vec<String>,
    },
    /// Fetch, verify, store and acknowledge a fresh offline bundle.
    Bundle,
    /// Upload buffered offline decisions.
    Upload,
    /// What the gate holds locally.
    Status,
    /// Replay a script: one presentation per line (`card 04A1B2C3`,
    /// `pin <unit> 246810`, `qr EM1....`, `visitor CODE`), or `sleep MS`,
    /// `bundle`, `upload`; `#` starts a comment. `-` reads standard input.
    Replay {
        /// The script file.
        script: PathBuf,
        /// Follow the change stream while replaying.
        #[arg(long)]
        watch: bool,
        /// Replay the script this many times.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
}

fn parse_presentation(words: &[&str]) -> anyhow::Result<Presented> {
    match words {
        ["card", uid] => Ok(Presented::Card { uid: (*uid).to_owned(), facility_code: String::new() }),
        ["card", uid, fc] => Ok(Presented::Card { uid: (*uid).to_owned(), facility_code: (*fc).to_owned() }),
        ["pin", unit, pin] => Ok(Presented::Pin { unit_id: (*unit).to_owned(), pin: (*pin).to_owned() }),
        ["qr", payload] => Ok(Presented::Qr((*payload).to_owned())),
        ["visitor", code] => Ok(Presented::Visitor((*code).to_owned())),
        _ => anyhow::bail!(
            "cannot read {:?}: use `card UID [FACILITY]`, `pin UNIT PIN`, `qr PAYLOAD` or `visitor CODE`",
            words.join(" ")
        ),
    }
}

fn print(outcome: &Outcome) {
    let line = serde_json::json!({
        "mode": match outcome.mode { Mode::Online => "online", Mode::Offline => "offline" },
        "verdict": outcome.verdict.as_str_name(),
        "reason": outcome.reason.as_str_name(),
        "message": outcome.message,
        "credential_id": outcome.credential_id,
        "person_pseudonym": outcome.person_pseudonym,
        "decision_id": outcome.decision_id,
        "sequence": outcome.sequence,
    });
    println!("{line}");
}

async fn run_line(gate: &GateController, line: &str) -> anyhow::Result<()> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => Ok(()),
        [first, ..] if first.starts_with('#') => Ok(()),
        ["sleep", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().context("sleep takes milliseconds")?)).await;
            Ok(())
        }
        ["bundle"] => {
            let version = gate.refresh_bundle().await?;
            println!("{}", serde_json::json!({ "bundle_version": version }));
            Ok(())
        }
        ["upload"] => {
            let (accepted, duplicates) = gate.upload().await?;
            println!("{}", serde_json::json!({ "uploaded": accepted, "duplicates": duplicates }));
            Ok(())
        }
        words => {
            let outcome = gate.decide(&parse_presentation(words)?).await?;
            print(&outcome);
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| format!("cannot read the gate token at {}", cli.token_file.display()))?;
    let options = Options { timeout: Duration::from_millis(cli.timeout_ms), ..Options::default() };
    let gate = Arc::new(GateController::open(&cli.endpoint, &token, &cli.state_dir, options)?);
    match cli.command {
        Command::Decide { presentation } => {
            let words: Vec<&str> = presentation.iter().map(String::as_str).collect();
            print(&gate.decide(&parse_presentation(&words)?).await?);
        }
        Command::Bundle => run_line(&gate, "bundle").await?,
        Command::Upload => run_line(&gate, "upload").await?,
        Command::Status => {
            let s = gate.status()?;
            println!(
                "{}",
                serde_json::json!({
                    "bundle_version": s.bundle_version,
                    "bundle_expires_at_ms": s.bundle_expires_at_ms,
                    "bundle_entries": s.bundle_entries,
                    "pending_uploads": s.pending_uploads,
                    "uploaded_through": s.uploaded_through,
                })
            );
        }
        Command::Replay { script, watch, repeat } => {
            let text = if script.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&script).with_context(|| format!("cannot read {}", script.display()))?
            };
            let watcher = watch.then(|| gate.spawn_watch());
            for _ in 0..repeat {
                for line in text.lines() {
                    if let Err(e) = run_line(&gate, line).await {
                        eprintln!("gate-sim: {line}: {e}");
                    }
                }
            }
            if let Some(w) = watcher {
                w.abort();
            }
        }
    }
    Ok(())
}
