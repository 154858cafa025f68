//! `exportTo`, the namespaces a VirtualService, DestinationRule or ServiceEntry is visible to:
//! absent or `*` = every namespace, `.` = the resource's own, `~` = none, else the listed
//! namespaces. What the webhook refuses in the list and what the compiler makes of it.

use std::collections::BTreeSet;

use super::host::is_dns_label;

/// Whether a resource of `owner_namespace` with this `exportTo` is visible in
/// `client_namespace`.
pub fn exported_to(export_to: &[String], owner_namespace: &str, client_namespace: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|target| match target.as_str() {
            "*" => true,
            "." => owner_namespace == client_namespace,
            "~" => false,
            other => other == client_namespace,
        })
}

/// The problems Istio's webhook refuses in an `exportTo` list: each with the index of the
/// entry at fault, or `None` for the list as a whole.
pub fn problems(export_to: &[String]) -> Vec<(Option<usize>, String)> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, namespace) in export_to.iter().enumerate() {
        if !seen.insert(namespace.as_str()) {
            problems.push((Some(i), format!("{namespace:?} is listed twice")));
        } else if !matches!(namespace.as_str(), "." | "*" | "~") && !is_dns_label(namespace) {
            problems.push((
                Some(i),
                format!("{namespace:?} is not \".\", \"*\", \"~\" or a namespace name"),
            ));
        }
    }
    for exclusive in ["*", "~"] {
        if export_to.len() > 1 && export_to.iter().any(|n| n == exclusive) {
            problems.push((
                None,
                format!("{exclusive:?} cannot be combined with other namespaces"),
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn visibility() {
        let cases = [
            (list(&[]), "a", "b", true),
            (list(&["*"]), "a", "b", true),
            (list(&["."]), "a", "a", true),
            (list(&["."]), "a", "b", false),
            (list(&["~"]), "a", "a", false),
            (list(&["b", "c"]), "a", "c", true),
        ];
        for (export, owner, client, expected) in cases {
            assert_eq!(exported_to(&export, owner, client), expected, "{export:?}");
        }
    }

    #[test]
    fn refused_lists() {
        assert!(problems(&list(&[".", "shop"])).is_empty());
        assert_eq!(problems(&list(&["a", "a"]))[0].0, Some(1));
        assert_eq!(problems(&list(&["Bad_Name"]))[0].0, Some(0));
        assert_eq!(problems(&list(&["*", "a"]))[0].0, None);
    }
}
