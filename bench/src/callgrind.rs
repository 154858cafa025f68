//! Reading `callgrind_annotate` output: the program's total instructions and each function's
//! exclusive count, grouped into the same categories as the perf profiles. Exclusive counts
//! cannot say who called `malloc` or `memcpy`, so those get categories of their own here.

use anyhow::{Context, Result};

use crate::perf::{Category, OTHER};

/// The total instructions (`PROGRAM TOTALS`) and the functions listed, largest first.
pub fn parse(annotated: &str) -> Result<(u64, Vec<(String, u64)>)> {
    let number = |text: &str| -> Option<u64> { text.trim().replace(',', "").parse().ok() };
    let total = annotated
        .lines()
        .find(|l| l.ends_with("PROGRAM TOTALS"))
        .and_then(|l| number(l.split('(').next()?))
        .context("callgrind_annotate output without PROGRAM TOTALS")?;
    let functions = annotated
        .lines()
        .skip_while(|l| !l.contains("file:function"))
        .filter_map(|l| {
            // "15,933,850 ( 9.10%)  ./malloc/./malloc/malloc.c:_int_free [/usr/lib/…/libc.so.6]"
            let (count, rest) = l.split_once('(')?;
            let count = number(count)?;
            let function = rest.split_once(")  ")?.1;
            let function = function.rsplit_once(" [").map_or(function, |(f, _)| f);
            Some((function.to_owned(), count))
        })
        .collect();
    Ok((total, functions))
}

/// Exclusive instructions per category (in the given order, then [`OTHER`], which also takes
/// the functions below callgrind_annotate's threshold).
pub fn by_category(
    total: u64,
    functions: &[(String, u64)],
    categories: &[Category],
) -> Vec<(String, u64)> {
    let mut sums = vec![0u64; categories.len()];
    let mut listed = 0;
    for (function, count) in functions {
        listed += count;
        if let Some(i) = categories
            .iter()
            .position(|c| c.patterns.iter().any(|p| function.contains(p)))
        {
            sums[i] += count;
        }
    }
    let categorised: u64 = sums.iter().sum();
    categories
        .iter()
        .map(|c| c.name.to_owned())
        .zip(sums)
        .chain([(OTHER.to_owned(), total.max(listed) - categorised)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANNOTATED: &str = "\
--------------------------------------------------------------------------------
Ir                   
--------------------------------------------------------------------------------
1,000,000 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
400,000 (40.00%)  ./malloc/./malloc/malloc.c:_int_free [/usr/lib/x86_64-linux-gnu/libc.so.6]
300,000 (30.00%)  ???:ring_core_0_17_14__aes_gcm_enc_update_vaes_avx2 [/x/trellis-proxy]
200,000 (20.00%)  ???:<rustls::conn::ConnectionCommon<T>>::write_tls [/x/trellis-proxy]
 50,000 ( 5.00%)  ???:tokio::runtime::park [/x/trellis-proxy]
";

    const CATEGORIES: &[Category] = &[
        Category {
            name: "allocator",
            patterns: &["malloc.c:"],
        },
        Category {
            name: "TLS",
            patterns: &["rustls::", "ring_core_"],
        },
        Category {
            name: "HTTP",
            patterns: &["hyper::"],
        },
    ];

    #[test]
    fn totals_and_functions_are_read_from_the_annotation() {
        let (total, functions) = parse(ANNOTATED).unwrap();
        assert_eq!(total, 1_000_000);
        assert_eq!(functions.len(), 4);
        assert_eq!(
            functions[1],
            (
                "???:ring_core_0_17_14__aes_gcm_enc_update_vaes_avx2".to_owned(),
                300_000
            )
        );
        assert!(parse("no totals here").is_err());
    }

    #[test]
    fn exclusive_counts_fall_into_categories_and_the_rest_is_other() {
        let (total, functions) = parse(ANNOTATED).unwrap();
        let table = [
            ("allocator", 400_000),
            ("TLS", 500_000),
            ("HTTP", 0),
            // tokio (listed, uncategorised) and the 50,000 below the threshold.
            (OTHER, 100_000),
        ];
        let got = by_category(total, &functions, CATEGORIES);
        assert_eq!(got.len(), table.len());
        for ((name, count), (want_name, want)) in got.iter().zip(table) {
            assert_eq!((name.as_str(), *count), (want_name, want));
        }
    }
}
