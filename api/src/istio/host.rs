//! Hosts as Istio reads them in `hosts`, `host` and `destination.host`: qualification of short
//! names, the syntax of wildcard hosts, and which hostnames a (wildcard) host covers.
//!
//! Qualification is Istio's `ResolveShortnameToFQDN` (`pkg/config/model.go`): `*` and IP
//! addresses are taken as written; a name without a dot is a service of the resource's
//! namespace (`reviews` → `reviews.<ns>.svc.cluster.local`) — a wildcard without a dot
//! (`*reviews`) included, as Istio does; any other name is taken as written.

use std::net::IpAddr;

use super::CLUSTER_DOMAIN;

/// The FQDN of the Kubernetes Service `name` in `namespace`.
pub fn service_fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// Qualifies a host written in a resource of `namespace` (see the module doc).
pub fn qualify(host: &str, namespace: &str) -> String {
    if host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        host.to_owned()
    } else {
        service_fqdn(host, namespace)
    }
}

/// Whether a (possibly wildcard) qualified host covers `hostname`: `*` covers every name,
/// `*.example.com` and `*example.com` the longer names ending so, any other host only itself.
pub fn matches(pattern: &str, hostname: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => hostname.len() > suffix.len() && hostname.ends_with(suffix),
        None => pattern == hostname,
    }
}

/// How specific a qualified host is, for picking one of several that cover a hostname (the
/// DestinationRule that applies): exact hosts beat wildcards, longer wildcards shorter ones.
pub fn specificity(pattern: &str) -> (bool, usize) {
    (!pattern.starts_with('*'), pattern.len())
}

/// A DNS-1123 label: 1–63 letters, digits and `-`, not starting or ending with `-`.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Istio's `ValidateWildcardDomain`: DNS labels, the first of which may be `*` or start with
/// `*` (`*.example.com`, `*example.com`).
pub fn is_wildcard_domain(host: &str) -> bool {
    if host.is_empty() || host.len() > 255 {
        return false;
    }
    let (first, rest) = match host.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (host, None),
    };
    let first_ok = first == "*" || is_dns_label(first.strip_prefix('*').unwrap_or(first));
    first_ok && rest.is_none_or(|rest| rest.split('.').all(is_dns_label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifies_as_istio_resolves_short_names() {
        let cases = [
            ("reviews", "shop", "reviews.shop.svc.cluster.local"),
            ("*reviews", "shop", "*reviews.shop.svc.cluster.local"),
            ("*", "shop", "*"),
            ("*.example.com", "shop", "*.example.com"),
            ("reviews.other", "shop", "reviews.other"),
            ("10.0.0.1", "shop", "10.0.0.1"),
            ("::1", "shop", "::1"),
        ];
        for (host, namespace, expected) in cases {
            assert_eq!(qualify(host, namespace), expected, "{host}");
        }
    }

    #[test]
    fn wildcards_match_by_suffix() {
        assert!(matches("*", "a.b"));
        assert!(matches("*.example.com", "api.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(matches("*example.com", "myexample.com"));
        assert!(matches("api.example.com", "api.example.com"));
        assert!(!matches("api.example.com", "web.example.com"));
    }

    #[test]
    fn wildcard_domains_have_the_star_first() {
        for good in ["*", "*.example.com", "*example.com", "reviews", "a-b.c"] {
            assert!(is_wildcard_domain(good), "{good}");
        }
        for bad in ["", "a.*.com", "*.*", "-a.com", "a..b", "a_b.com"] {
            assert!(!is_wildcard_domain(bad), "{bad}");
        }
    }
}
