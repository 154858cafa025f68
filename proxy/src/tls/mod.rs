//! TLS on the data path: mutual TLS between sidecars with SPIFFE identities ([`mtls`]), TLS
//! originated to a destination as a DestinationRule's `tls` asks ([`origination`]), and the
//! ClientHello parser that reads a connection's server name and ALPN before any TLS stack sees
//! it ([`client_hello`]).

pub mod client_hello;
pub mod mtls;
pub mod origination;
