fn main() -> std::process::ExitCode {
    token_broker::cli::main()
}
