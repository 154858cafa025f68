//! TLS on the data path: mutual TLS between sidecars with SPIFFE identities ([`mtls`]) and TLS
//! originated to a destination as a DestinationRule's `tls` asks ([`origination`]).

pub mod mtls;
pub mod origination;
