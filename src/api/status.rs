//! Maps any [`crate::error::ServiceError`] to a `tonic::Status` with
//! `google.rpc.ErrorInfo` (domain `tokenbroker`). TODO(api helper).
