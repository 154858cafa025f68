//! `trellis-bench`: the load-benchmark runner (trellis-proxy against Envoy and a direct
//! connection). The runner itself is the benchmark issue's work; until it lands this binary
//! only says so, and `make bench` fails rather than report numbers it did not measure.

fn main() {
    eprintln!(
        "trellis-bench: the benchmark runner is not implemented yet (see the benchmark issue)"
    );
    std::process::exit(2);
}
