//! `trellis-cni`: a chained CNI plugin that applies `trellis-init`'s rule plan inside a pod's netns.
//! Not implemented yet: the binary reports a CNI error for every command (see issue "CNI plugin").
fn main() {
    println!(r#"{{"cniVersion":"1.0.0","code":4,"msg":"trellis-cni is not implemented yet"}}"#);
    std::process::exit(1);
}
