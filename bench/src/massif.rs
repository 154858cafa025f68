//! Reading valgrind massif heap snapshots (`massif.out` files, and the `detailed_snapshot` a
//! running process writes through `vgdb`): which allocation sites hold the bytes, and which
//! trellis function they were allocated under.
//!
//! The site of an allocation is its innermost frame that is not allocator plumbing (`RawVec`
//! growth, `__rust_alloc`): `BTreeMap::insert` says more than `finish_grow`. The owner is the
//! innermost `trellis_*` frame, which tells the typed config from the runtime state.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

/// Frames that only say "memory was allocated", never what for.
const PLUMBING: [&str; 6] = [
    "alloc::raw_vec::",
    "alloc::alloc::",
    "__rust_alloc",
    "__rust_realloc",
    "__rdl_",
    "RawVec",
];

/// One snapshot's heap: totals and the bytes of every distinct allocation stack.
#[derive(Debug, Clone, PartialEq)]
pub struct Heap {
    pub heap_bytes: u64,
    pub extra_bytes: u64,
    /// (stack from the allocation site outwards, bytes live with exactly that stack).
    pub stacks: Vec<(Vec<String>, u64)>,
}

/// The snapshot of a massif file whose `heap_tree` is `kind` (`peak`, or the last `detailed`).
pub fn snapshot(text: &str, kind: &str) -> Result<Heap> {
    let snapshots: Vec<&str> = text.split("#-----------\nsnapshot=").skip(1).collect();
    let wanted = format!("heap_tree={kind}\n");
    let chosen = snapshots
        .iter()
        .rev()
        .find(|s| s.contains(&wanted))
        .with_context(|| format!("no snapshot with heap_tree={kind}"))?;
    let field = |name: &str| -> Result<u64> {
        chosen
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("snapshot without {name}"))?
            .parse()
            .with_context(|| format!("{name} is not a number"))
    };
    let tree = chosen
        .split_once(&wanted)
        .map(|(_, tree)| tree)
        .unwrap_or_default();
    Ok(Heap {
        heap_bytes: field("mem_heap_B")?,
        extra_bytes: field("mem_heap_extra_B")?,
        stacks: leaf_stacks(tree)?,
    })
}

/// The heap tree's leaves with their full stacks. Lines are `nK: BYTES frame`, indented one
/// space per level; the root (level 0) is the allocation functions themselves.
fn leaf_stacks(tree: &str) -> Result<Vec<(Vec<String>, u64)>> {
    let mut path: Vec<String> = Vec::new();
    let mut stacks = Vec::new();
    for line in tree.lines() {
        let depth = line.len() - line.trim_start().len();
        let Some(rest) = line.trim_start().strip_prefix('n') else {
            break; // the next snapshot's separator
        };
        let (children, rest) = rest
            .split_once(": ")
            .context("heap tree line without ': '")?;
        let children: usize = children.parse().context("heap tree child count")?;
        let (bytes, frame) = rest.split_once(' ').unwrap_or((rest, ""));
        let bytes: u64 = bytes.parse().context("heap tree byte count")?;
        if depth > path.len() {
            bail!("heap tree skips a level at {line:?}");
        }
        path.truncate(depth);
        path.push(frame_name(frame));
        if children == 0 && depth > 0 {
            // The root (the allocation functions) is not part of any stack.
            stacks.push((path[1..].to_vec(), bytes));
        }
    }
    Ok(stacks)
}

/// `0x71F127: alloc::…::insert (in /path)` → `alloc::…::insert`.
fn frame_name(frame: &str) -> String {
    let name = frame
        .split_once(": ")
        .filter(|(addr, _)| addr.starts_with("0x"))
        .map_or(frame, |(_, name)| name);
    let name = name.rsplit_once(" (in ").map_or(name, |(name, _)| name);
    name.trim().to_owned()
}

/// The innermost frame that is not allocator plumbing.
pub fn site(stack: &[String]) -> &str {
    stack
        .iter()
        .find(|f| !PLUMBING.iter().any(|p| f.contains(p)))
        .or(stack.first())
        .map_or("?", String::as_str)
}

/// The innermost trellis frame: whose data it is.
pub fn owner(stack: &[String]) -> &str {
    stack
        .iter()
        .find(|f| f.contains("trellis_"))
        .map_or("(no trellis frame)", String::as_str)
}

/// Bytes per (site, owner) at two moments (peak, rest), largest at rest first.
pub fn by_site(peak: &Heap, rest: &Heap) -> Vec<(String, String, u64, u64)> {
    let mut rows: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for (heap, at_rest) in [(peak, false), (rest, true)] {
        for (stack, bytes) in &heap.stacks {
            let key = (site(stack).to_owned(), owner(stack).to_owned());
            let entry = rows.entry(key).or_default();
            if at_rest {
                entry.1 += bytes;
            } else {
                entry.0 += bytes;
            }
        }
    }
    let mut rows: Vec<_> = rows
        .into_iter()
        .map(|((site, owner), (p, r))| (site, owner, p, r))
        .collect();
    rows.sort_by(|a, b| b.3.cmp(&a.3).then(b.2.cmp(&a.2)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
desc: --massif-out-file=x
cmd: trellis-proxy
time_unit: i
#-----------
snapshot=0
#-----------
time=0
mem_heap_B=0
mem_heap_extra_B=0
mem_stacks_B=0
heap_tree=empty
#-----------
snapshot=1
#-----------
time=10
mem_heap_B=1300
mem_heap_extra_B=40
mem_stacks_B=0
heap_tree=peak
n3: 1300 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
 n1: 1000 0x71F127: alloc::collections::btree::map::BTreeMap<K,V,A>::insert (in /x/trellis-proxy)
  n1: 1000 0x72DD8F: trellis_config::proxy::ProxyConfig::from_json (in /x/trellis-proxy)
   n0: 1000 0xA3BA14: main (in /x/trellis-proxy)
 n2: 200 0x73C476: alloc::raw_vec::RawVecInner<A>::finish_grow (in /x/trellis-proxy)
  n1: 150 0x73BD09: alloc::raw_vec::RawVec<T,A>::grow_one (in /x/trellis-proxy)
   n0: 150 0x79EAC7: trellis_proxy::upstream::Cluster::new (in /x/trellis-proxy)
  n0: 50 in 3 places, all below massif's threshold (1.00%)
 n0: 100 in 7 places, all below massif's threshold (1.00%)
#-----------
snapshot=2
#-----------
time=20
mem_heap_B=1000
mem_heap_extra_B=30
mem_stacks_B=0
heap_tree=detailed
n1: 1000 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
 n1: 1000 0x71F127: alloc::collections::btree::map::BTreeMap<K,V,A>::insert (in /x/trellis-proxy)
  n0: 1000 0x72DD8F: trellis_config::proxy::ProxyConfig::from_json (in /x/trellis-proxy)
";

    #[test]
    fn the_peak_snapshot_yields_every_leaf_stack_with_its_bytes() {
        let peak = snapshot(FILE, "peak").unwrap();
        assert_eq!((peak.heap_bytes, peak.extra_bytes), (1300, 40));
        let bytes: u64 = peak.stacks.iter().map(|(_, b)| b).sum();
        assert_eq!(bytes, 1300);
        assert_eq!(
            peak.stacks[0].0,
            vec![
                "alloc::collections::btree::map::BTreeMap<K,V,A>::insert",
                "trellis_config::proxy::ProxyConfig::from_json",
                "main"
            ]
        );
        assert_eq!(peak.stacks.len(), 4);
    }

    #[test]
    fn sites_skip_allocator_plumbing_and_owners_are_trellis_frames() {
        let peak = snapshot(FILE, "peak").unwrap();
        let table: [(usize, &str, &str); 3] = [
            (
                0,
                "alloc::collections::btree::map::BTreeMap<K,V,A>::insert",
                "trellis_config::proxy::ProxyConfig::from_json",
            ),
            (
                1,
                "trellis_proxy::upstream::Cluster::new",
                "trellis_proxy::upstream::Cluster::new",
            ),
            (
                3,
                "in 7 places, all below massif's threshold (1.00%)",
                "(no trellis frame)",
            ),
        ];
        for (i, want_site, want_owner) in table {
            let stack = &peak.stacks[i].0;
            assert_eq!(site(stack), want_site, "{stack:?}");
            assert_eq!(owner(stack), want_owner, "{stack:?}");
        }
    }

    #[test]
    fn rows_compare_peak_and_rest_per_site() {
        let rows = by_site(
            &snapshot(FILE, "peak").unwrap(),
            &snapshot(FILE, "detailed").unwrap(),
        );
        assert_eq!(
            rows[0],
            (
                "alloc::collections::btree::map::BTreeMap<K,V,A>::insert".to_owned(),
                "trellis_config::proxy::ProxyConfig::from_json".to_owned(),
                1000,
                1000
            )
        );
        assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), 1300);
        assert_eq!(rows.iter().map(|r| r.3).sum::<u64>(), 1000);
        assert!(snapshot(FILE, "nonsense").is_err());
    }
}
