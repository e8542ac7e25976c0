//! `token-broker policy ...`: policy files for CI and review.

use std::path::PathBuf;

use clap::Subcommand;

use crate::policy::{self, SCHEMA};

/// `token-broker policy` subcommands.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Check a policy file against its JSON Schema and the semantic rules
    /// (for CI): prints OK, or each problem as `PATH: MESSAGE`
    /// (e.g. `rules[2].scopes[0]: unknown scope "vso.kode"`) and fails.
    Check {
        /// The policy YAML file.
        file: PathBuf,
    },
    /// Print the policy file's JSON Schema (draft 2020-12).
    Schema,
}

/// Runs a `policy` subcommand; what it prints goes to stdout. Errors: the
/// file cannot be read, or has problems (already printed, one a line).
pub fn run(command: PolicyCommand) -> Result<(), String> {
    match command {
        PolicyCommand::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let problems = policy::check(&text);
            if problems.is_empty() {
                println!("OK");
                return Ok(());
            }
            for problem in &problems {
                println!("{problem}");
            }
            Err(format!(
                "{}: {} problem{}",
                file.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            ))
        }
        PolicyCommand::Schema => {
            print!("{SCHEMA}");
            Ok(())
        }
    }
}
