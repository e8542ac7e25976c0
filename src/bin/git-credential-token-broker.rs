//! `git-credential-token-broker`: `token-broker git-credential` under the
//! name git looks for when a helper is configured without `!`.

fn main() -> std::process::ExitCode {
    token_broker::cli::git_credential_main()
}
