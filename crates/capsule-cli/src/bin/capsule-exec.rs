fn main() -> std::process::ExitCode {
    capsule_cli::capsule_exec_main()
}
