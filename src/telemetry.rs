//! Logging and tracing set-up. TODO.
