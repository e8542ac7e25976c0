//! The protobuf codec of the generated tokenbroker services and clients
//! (`build.rs` names it): tonic_prost's, except for a message that does not
//! decode. tonic_prost answers INTERNAL for any of them; here a request the
//! server cannot decode is the caller's mistake, INVALID_ARGUMENT with
//! reason [`MALFORMED_REQUEST`], and only an undecodable response (seen by
//! the client) stays INTERNAL. Neither status quotes the message's bytes.

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::error::{ErrorCode, ServiceError};
use crate::proto::v1;

/// Reason of a request whose bytes are not its method's request message.
pub const MALFORMED_REQUEST: &str = "MALFORMED_REQUEST";

/// [`tonic_prost::ProstCodec`] with honest decode errors (see the module
/// doc); encodes `T`, decodes `U`.
#[derive(Debug, Clone)]
pub struct ApiCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ApiCodec<T, U> {
    fn default() -> Self {
        ApiCodec(ProstCodec::new())
    }
}

impl<T, U> Codec for ApiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Decoded + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ApiDecoder(std::marker::PhantomData)
    }
}

/// Decodes `U`, answering a failure as `U`'s [`Decoded`] impl says.
#[derive(Debug, Clone)]
pub struct ApiDecoder<U>(std::marker::PhantomData<U>);

impl<U: Message + Default + Decoded> Decoder for ApiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| U::undecodable(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// A message type the tokenbroker services decode: requests on the server,
/// responses on the client. Says whose fault a message that does not
/// decode is.
pub trait Decoded {
    /// The status for `error` (prost's description names message and field
    /// types, never the bytes).
    fn undecodable(error: &prost::DecodeError) -> Status;
}

/// A request whose bytes are not a valid `message` (a proto full name).
#[derive(Debug, thiserror::Error)]
#[error("the request is not a valid {message}: {error}")]
pub struct MalformedRequest {
    /// The method's request message, e.g. `tokenbroker.v1.CreateLeaseRequest`.
    pub message: &'static str,
    /// What prost found wrong.
    pub error: prost::DecodeError,
}

impl ServiceError for MalformedRequest {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
    fn reason(&self) -> &'static str {
        MALFORMED_REQUEST
    }
}

/// Requests: INVALID_ARGUMENT, `MALFORMED_REQUEST`.
macro_rules! requests {
    ($($t:ident),* $(,)?) => {$(
        impl Decoded for v1::$t {
            fn undecodable(error: &prost::DecodeError) -> Status {
                super::status::to_status(&MalformedRequest {
                    message: concat!("tokenbroker.v1.", stringify!($t)),
                    error: error.clone(),
                })
            }
        }
    )*};
}

/// Responses (decoded by the client): INTERNAL, the server's fault.
macro_rules! responses {
    ($($t:ident),* $(,)?) => {$(
        impl Decoded for v1::$t {
            fn undecodable(error: &prost::DecodeError) -> Status {
                Status::new(
                    Code::Internal,
                    format!(
                        concat!("the server's answer is not a valid tokenbroker.v1.", stringify!($t), ": {}"),
                        error
                    ),
                )
            }
        }
    )*};
}

requests!(
    CreateLeaseRequest,
    GetLeaseRequest,
    ListLeasesRequest,
    RenewLeaseRequest,
    RevokeLeaseRequest,
    RevokeLeasesRequest,
    AdminListLeasesRequest,
    ListAuditEventsRequest,
    ForceRevokeLeaseRequest,
    LookupTokenRequest,
    GetCredentialRequest,
    WatchCredentialRequest,
    RotateCredentialRequest,
    ListCredentialsRequest,
);

responses!(
    Lease,
    ListLeasesResponse,
    RevokeLeasesResponse,
    ListAuditEventsResponse,
    CredentialVersion,
    ListCredentialsResponse,
);

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt as _;

    #[test]
    fn an_undecodable_request_is_invalid_argument_without_its_bytes() {
        let error = v1::CreateLeaseRequest::decode(&b"\xff\xff\xff\xff\xff secret"[..])
            .expect_err("garbage does not decode");
        let status = v1::CreateLeaseRequest::undecodable(&error);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("the request is not a valid tokenbroker.v1.CreateLeaseRequest: "),
            "{}",
            status.message()
        );
        assert!(!status.message().contains("secret"));
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, MALFORMED_REQUEST);
    }

    #[test]
    fn an_undecodable_response_is_internal() {
        let error = v1::Lease::decode(&b"\xff"[..]).expect_err("garbage does not decode");
        assert_eq!(v1::Lease::undecodable(&error).code(), Code::Internal);
    }
}
