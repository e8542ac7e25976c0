//! Server configuration: defaults < file < `TOKEN_BROKER_*` environment.
//! TODO(api helper).
