//! The gRPC edge: tonic services, the authentication interceptor, health,
//! reflection, and the one mapping of errors to `tonic::Status`.
//! TODO(api helper).

pub mod status;
